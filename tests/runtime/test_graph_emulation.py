"""CUDA-graph bookkeeping, replayed on the CPU (``cuda_graphs="emulate"``): graphs captured ahead of the steps,
one pool, replays that re-execute the recorded operators on the static input buffers (host values frozen at
capture, as on a GPU), unchanged inputs not copied, failures raised.
The real-GPU versions at the end run where CUDA is available."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import schedules
from l2c_kernels.runtime import CudaGraphError
from l2c_kernels.runtime.plan import collapsible_steps
from tests.runtime.test_compile_schedule import run_steps
from tests.tiny_models import cfg_batch, dit_inputs, pixart_inputs, rel_err, tiny_dit, tiny_pixart

TS = [951, 851, 751, 651, 551, 451, 351, 251]


def _cases():
    dit = tiny_dit(layers=2)
    pix = tiny_pixart(layers=2)
    return [(dit, schedules.uniform(dit, TS, 3, forecast="quadratic"), dit_inputs(batch=2)),
            (pix, schedules.tgate(pix, TS, gate_step=3, sp_interval=1), cfg_batch(pixart_inputs(batch=4)))]


@pytest.mark.parametrize("case", [0, 1])
def test_replays_equal_eager_and_graphs_are_captured_before_step_one(case):
    m, s, inputs = _cases()[case]
    eager = l2c.compile_schedule(m, s, cuda_graphs=False)
    emu = l2c.compile_schedule(m, s, cuda_graphs="emulate")
    emu(**dict(inputs, timestep=torch.full((inputs["hidden_states"].shape[0],), TS[0])))
    plans = emu.distinct_plans()
    collapsed = len({emu.plans[i].key for i, c in enumerate(collapsible_steps(s)) if c})
    assert emu.num_graphs() == plans + collapsed  # every plan (and collapsed variant) captured at step 0
    emu.reset()
    backend = emu._graphs.backend
    for gen in range(2):
        got, want = run_steps(emu, s, inputs), run_steps(eager, s, inputs)
        for k, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) < 1e-6, (gen, k)
    assert backend.replays == 2 * len(TS) + 1 and emu.num_graphs() == plans + collapsed
    assert emu.summary()["graph_backend"] == "emulated"
    assert len({id(emu._graphs.pool)}) == 1 and emu._graphs.pool is not None


def test_unchanged_inputs_not_copied_changed_ones_are():
    m = tiny_pixart(layers=2)
    s = schedules.uniform(m, TS, 2)
    emu = l2c.compile_schedule(m, s, cuda_graphs="emulate")
    eager = l2c.compile_schedule(m, s, cuda_graphs=False)
    base = pixart_inputs(batch=2)
    emu.capture(**base)
    graphs = emu._graphs
    start = graphs.input_copies
    for k, t in enumerate(TS):  # a new latent tensor and timestep per step, the same text embedding object
        inp = dict(base, hidden_states=base["hidden_states"] + 0.01 * k, timestep=torch.full((2,), t))
        a, b = emu(**inp).sample, eager(**inp).sample
        assert rel_err(a, b) < 1e-6
    assert graphs.input_copies - start == 2 * len(TS)
    # an in-place change of an input that was not copied again must be seen (its version counter moved)
    emu.reset()
    eager.reset()
    enc = base["encoder_hidden_states"]
    enc.mul_(1.5)
    inp = dict(base, timestep=torch.full((2,), TS[0]))
    assert rel_err(emu(**inp).sample, eager(**inp).sample) < 1e-6


def test_a_host_value_changed_after_capture_is_frozen_in_the_replay_as_on_a_gpu():
    """The emulation replays recorded operators, not the Python function: a host number read at capture (a Python
    float, a forecast weight) stays what it was, as a CUDA graph keeps it; eager sees the new one. A runtime that
    read such a value inside a graph would differ from eager here -- the compiled schedules do not (the test above,
    and the one below with every forecast)."""
    from l2c_kernels.runtime.cuda_graphs import GraphCache

    host = {"w": 2.0}

    def fn(args):
        return args["x"] * host["w"] + 1.0

    g = GraphCache.for_mode("emulate")
    x = torch.arange(4.0)
    g.capture(("step",), {"x": x}, fn, state=[])
    assert torch.equal(g.run(("step",), {"x": x}, fn), x * 2 + 1)
    host["w"] = 3.0                                       # changed after capture
    assert torch.equal(g.run(("step",), {"x": x}, fn), x * 2 + 1)   # the graph still multiplies by 2
    assert torch.equal(fn({"x": x}), x * 3 + 1)           # eager sees 3
    y = torch.ones(4)
    assert torch.equal(g.run(("step",), {"x": y}, fn), y * 2 + 1)   # new input values do reach the replay


def test_a_host_read_of_a_device_value_during_capture_is_refused():
    from l2c_kernels.runtime.cuda_graphs import GraphCache

    def fn(args):
        return args["x"] * 2 if bool(args["x"].sum() > 0) else args["x"]

    with pytest.raises(CudaGraphError, match="reads a device value on the host during capture"):
        GraphCache.for_mode("emulate").capture(("s",), {"x": torch.ones(3)}, fn, state=[])


@pytest.mark.parametrize("forecast", ["linear", "quadratic", "taylor"])
def test_forecast_weights_are_not_host_values_a_graph_freezes_wrongly(forecast):
    """Every forecast's weights differ from step to step; with graphs (frozen at capture) the schedule's outputs equal
    eager ones over two generations, so no weight is read on the host inside a step's graph."""
    m = tiny_dit(layers=2)
    s = schedules.uniform(m, TS, 3, forecast=forecast)
    inputs = dit_inputs(batch=2)
    eager = l2c.compile_schedule(m, s, cuda_graphs=False)
    emu = l2c.compile_schedule(m, s, cuda_graphs="emulate")
    for _ in range(2):
        for k, (a, b) in enumerate(zip(run_steps(emu, s, inputs), run_steps(eager, s, inputs))):
            assert rel_err(a, b) < 1e-6, k
    assert emu._graphs.backend.replays >= len(TS) - 1


def test_capture_failure_is_raised_not_eager(monkeypatch):
    m = tiny_dit(layers=2)
    s = schedules.uniform(m, TS, 2)
    emu = l2c.compile_schedule(m, s, cuda_graphs="emulate")

    def broken(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(emu._graphs.backend, "capture", broken)
    with pytest.raises(CudaGraphError, match="cuda_graphs=False"):
        emu(**dit_inputs(batch=2, t=TS[0]))
    assert emu.num_graphs() == 0


def test_capture_needs_graph_inputs_and_cpu_auto_stays_eager():
    m = tiny_dit(layers=2)
    s = l2c.Schedule.full(m, TS)
    with pytest.raises(ValueError, match="CUDA device"):
        l2c.compile_schedule(m, s).capture(**dit_inputs())
    auto = l2c.compile_schedule(m, s)
    for _ in range(2):
        run_steps(auto, s, dit_inputs())
    assert auto.num_graphs() == 0


def test_emulated_capture_does_not_write_caches():
    """A real capture records kernels without running them; the emulation restores every cache after its run."""
    m = tiny_dit(layers=2)
    s = schedules.uniform(m, TS, 2)
    emu = l2c.compile_schedule(m, s, cuda_graphs="emulate")
    inputs = dit_inputs(batch=2)
    emu.capture(**inputs)
    caches = next(iter(emu._caches.values()))
    before = [t.clone() for t in caches.all_buffers()]
    backend = emu._graphs.backend
    out = backend.capture(lambda a: emu._run_plan(emu.steps[0], a, caches), inputs, None, caches.all_buffers())[1]
    assert all(torch.equal(a, b) for a, b in zip(before, caches.all_buffers()))
    assert torch.isnan(out).all()


# ------------------------------------------------------------------------------------------------ real GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
@pytest.mark.parametrize("case", [0, 1])
def test_cuda_capture_ahead_matches_eager(case):
    m, s, inputs = _cases()[case]
    m = m.cuda()
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    eager = l2c.compile_schedule(m, s, cuda_graphs=False)
    graphed = l2c.compile_schedule(m, s, cuda_graphs=True, cfg_collapse="assume")
    n = graphed.capture(**dict(inputs, timestep=torch.full((inputs["hidden_states"].shape[0],), TS[0], device="cuda")))
    assert n >= graphed.distinct_plans()
    for _ in range(2):
        got, want = run_steps(graphed, s, inputs), run_steps(eager, s, inputs)
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))
    assert graphed.num_graphs() == n  # nothing captured lazily


@cuda
def test_cuda_auto_captures_at_the_second_generation():
    m = tiny_dit(layers=2).cuda()
    s = schedules.uniform(m, TS, 2)
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in dit_inputs().items()}
    auto = l2c.compile_schedule(m, s)
    run_steps(auto, s, inputs)
    assert auto.num_graphs() == 0
    auto(**dict(inputs, timestep=torch.full((2,), TS[0], device="cuda")))
    assert auto.num_graphs() == auto.distinct_plans()
