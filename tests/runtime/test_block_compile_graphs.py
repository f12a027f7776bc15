"""CUDA graphs at block level, replayed on the CPU (``cuda_graphs="emulate"``: a capture records without changing
any cache, a replay runs on the static input buffers only): every step plan captured at step 0 for each pass,
replays equal to the eager block runtime, unchanged inputs not copied, changed ones copied, capture failures
raised, a step whose caches were not filled refused. The real-GPU versions at the end run where CUDA is."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels.runtime import CudaGraphError
from l2c_kernels.runtime.cached_transformer import compile_blocks
from tests.families.conftest import TIMESTEPS, built, generate, max_err
from tests.family_configs import FAMILIES


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def half_reuse(model, forecast="none"):
    nb = l2c.Schedule.full(model, TIMESTEPS, branches=["block"]).num_blocks
    mask = [[s == 0 or (s + b) % 2 == 0 for b in range(nb)] for s in range(len(TIMESTEPS))]
    return l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=["block"], forecast=forecast)


def scale_of(outs) -> float:
    return max(1.0, max(float(o.abs().max()) for o in outs))


@pytest.mark.parametrize("name,forecast", [("flux-dev", "linear"), ("sd3-medium", "none")])
def test_replays_equal_eager_and_every_plan_is_captured_at_step_zero(name, forecast):
    fam, model = FAMILIES[name], built(name)
    sched = half_reuse(model, forecast)
    eager = compile_blocks(model, sched)
    emu = compile_blocks(model, sched, cuda_graphs="emulate")
    backend = emu._graphs.backend
    for gen in range(2):
        got = generate(lambda s, kw: emu(**kw), fam)
        if gen == 0:
            assert emu.num_graphs() == emu.distinct_plans() == len(set(emu._plan_of))
            assert backend.replays == len(TIMESTEPS)  # nothing ran outside a graph, step 0 included
        want = generate(lambda s, kw: eager(**kw), fam)
        # a replay runs the same ops on copies of the same inputs
        assert max_err(got, want) <= 1e-6 * scale_of(want), gen
    assert backend.replays == 2 * len(TIMESTEPS) and emu.num_graphs() == emu.distinct_plans()
    assert backend.captured_runs == emu.distinct_plans()
    sm = l2c.summary(emu)
    assert sm["graph_backend"] == "emulated" and sm["cuda_graphs"] == emu.distinct_plans() and sm["generations"] == 2


def test_unchanged_inputs_are_not_copied_changed_ones_are():
    fam, model = FAMILIES["flux-dev"], built("flux-dev")
    sched = half_reuse(model)
    emu, eager = compile_blocks(model, sched, cuda_graphs="emulate"), compile_blocks(model, sched)
    cond = fam.inputs(2, 0)  # text tokens, pooled text, ids and guidance: the same objects at every step
    x = fam.latents(2, 0)
    emu.capture(**fam.call_kwargs(x, TIMESTEPS[0], cond))
    graphs = emu._graphs
    start = graphs.input_copies
    for k, t in enumerate(TIMESTEPS):  # new latents and a new timestep tensor per step
        kw = fam.call_kwargs(x + 0.01 * k, t, cond)
        a, b = emu(**kw)[0], eager(**kw)[0]
        assert max_err([a], [b]) <= 1e-6 * scale_of([b])
    assert graphs.input_copies - start == 2 * len(TIMESTEPS)
    # an input changed in place (not a new object) is seen: its version counter moved
    emu.reset()
    eager.reset()
    cond["encoder_hidden_states"].mul_(1.5)
    kw = fam.call_kwargs(x, TIMESTEPS[0], cond)
    a, b = emu(**kw)[0], eager(**kw)[0]
    assert max_err([a], [b]) <= 1e-6 * scale_of([b])
    assert graphs.input_copies - start == 2 * len(TIMESTEPS) + 3


def test_output_container_is_the_familys():
    fam, model = FAMILIES["flux-schnell"], built("flux-schnell")
    emu = compile_blocks(model, half_reuse(model), cuda_graphs="emulate")
    kw = fam.call_kwargs(fam.latents(1, 0), TIMESTEPS[0], fam.inputs(1, 0))
    del kw["return_dict"]
    out, ref = emu(**kw), model(**kw)
    assert emu._graphs.backend.replays == 1
    assert type(out) is type(ref) and max_err([out.sample], [ref.sample]) <= 1e-6 * scale_of([ref.sample])


def test_two_passes_per_step_have_their_own_caches_and_graphs():
    """Wan's pipeline calls the transformer for the conditional and the unconditional text in turn: each pass has
    its own caches, so its own graphs (captured at its first call)."""
    fam, wan = FAMILIES["wan2.1-t2v"], built("wan2.1-t2v")
    sched = half_reuse(wan)
    emu, eager = compile_blocks(wan, sched, cuda_graphs="emulate"), compile_blocks(wan, sched)
    x, conds = fam.latents(1, 0), [fam.inputs(1, 0), fam.inputs(1, 7)]
    for k, t in enumerate(TIMESTEPS):
        for p in range(2):
            kw = fam.call_kwargs(x, t, conds[p])
            got, want = emu(**kw)[0], eager(**kw)[0]
            assert (emu.current_step, emu.current_pass) == (k, p)
            assert max_err([got], [want]) <= 1e-6 * scale_of([want])
        x = x - 0.2 * got
    assert emu.num_graphs() == 2 * emu.distinct_plans()
    assert emu._graphs.backend.replays == 2 * len(TIMESTEPS)
    sm = emu.summary()
    assert sm["steps_run"] == len(TIMESTEPS) and sm["calls"] == 2 * len(TIMESTEPS) and sm["generations"] == 1


def test_capture_failure_is_raised_not_run_eagerly(monkeypatch):
    fam, model = FAMILIES["flux-schnell"], built("flux-schnell")
    emu = compile_blocks(model, half_reuse(model), cuda_graphs="emulate")

    def broken(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(emu._graphs.backend, "capture", broken)
    with pytest.raises(CudaGraphError, match="cuda_graphs=False"):
        emu(**fam.call_kwargs(fam.latents(1, 0), TIMESTEPS[0], fam.inputs(1, 0)))
    assert emu.num_graphs() == 0


def test_capture_needs_graphs_and_cpu_auto_stays_eager():
    fam, model = FAMILIES["flux-schnell"], built("flux-schnell")
    sched = half_reuse(model)
    kw = fam.call_kwargs(fam.latents(1, 0), TIMESTEPS[0], fam.inputs(1, 0))
    with pytest.raises(ValueError, match="CUDA device"):
        compile_blocks(model, sched).capture(**kw)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        compile_blocks(model, sched, cuda_graphs="yes")
    auto = compile_blocks(model, sched)
    for _ in range(2):
        generate(lambda s, kw: auto(**kw), fam, batch=1)
    assert auto.num_graphs() == 0


def test_emulated_capture_leaves_caches_and_a_jump_to_an_unfilled_step_is_refused():
    fam, model = FAMILIES["flux-schnell"], built("flux-schnell")
    emu = compile_blocks(model, half_reuse(model), cuda_graphs="emulate")
    kw = fam.call_kwargs(fam.latents(1, 0), TIMESTEPS[0], fam.inputs(1, 0))
    assert emu.capture(**kw) == emu.distinct_plans()
    caches = next(iter(emu._caches.values()))
    before = [t.clone() for t in caches.buffers.values()]
    out = emu._graphs.backend.capture(emu._graph_fn(0, caches), emu._call_args((), kw), None,
                                      list(caches.buffers.values()))[1]
    assert all(torch.equal(a, b) for a, b in zip(before, caches.buffers.values()))  # a capture writes nothing
    assert torch.isnan(out).all()
    emu.reset()
    emu.set_step(1)  # step 1 reuses what step 0 stores; step 0 did not run in this generation
    with pytest.raises(l2c.ScheduleError, match="steps \\[0\\] did not run"):
        emu(**fam.call_kwargs(fam.latents(1, 0), TIMESTEPS[1], fam.inputs(1, 0)))


def test_graphs_and_compiled_blocks_together():
    fam, model = FAMILIES["flux-schnell"], built("flux-schnell")
    sched = half_reuse(model)
    both = compile_blocks(model, sched, cuda_graphs="emulate", torch_compile=dict(backend="eager"))
    eager = compile_blocks(model, sched)
    got = generate(lambda s, kw: both(**kw), fam, batch=1)
    want = generate(lambda s, kw: eager(**kw), fam, batch=1)
    assert max_err(got, want) <= 1e-6 * scale_of(want)
    assert both.num_graphs() == both.distinct_plans() and both.compiled_variants() >= 3


@pytest.mark.parametrize("name", ["flux-schnell", "sd3.5-medium"])
def test_branch_level_mmdit_schedules_replay_too(name):
    """SD3 / Flux branch-level schedules run on the block-level module's subclass: the same graphs and checks, with
    and without compiled unit work."""
    from tests.mmdit_branches.hook_reference import HookBranchReference
    from tests.mmdit_branches.test_branch_runtime import random_mask
    from l2c_kernels.adapters.mmdit_branches import branch_names

    fam, model = FAMILIES[name], built(name)
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, random_mask(model, seed=3), branches=branch_names(model))
    emu = compile_blocks(model, sched, cuda_graphs="emulate")
    assert type(emu).__name__ == "BranchCachedTransformer"
    ref = generate(HookBranchReference(model, sched).step, fam, batch=1)
    for _ in range(2):
        got = generate(lambda s, kw: emu(**kw), fam, batch=1)
        assert max_err(ref, got) <= 1e-5 * scale_of(ref)
    assert emu.num_graphs() == emu.distinct_plans() and emu._graphs.backend.replays == 2 * len(TIMESTEPS)
    assert emu.summary()["level"] == "branch"
    both = compile_blocks(model, sched, cuda_graphs="emulate", torch_compile=dict(backend="eager"))
    for _ in range(2):  # graphs of compiled unit work, as at block level
        got = generate(lambda s, kw: both(**kw), fam, batch=1)
        assert max_err(ref, got) <= 1e-5 * scale_of(ref)
    assert both.num_graphs() == both.distinct_plans() and both.compiled_variants() >= 2


# ------------------------------------------------------------------------------------------------ real GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _cuda_kwargs(fam, x, t, cond):
    return {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in fam.call_kwargs(x, t, cond).items()}


def _generate_cuda(fast, fam, batch=1):
    x, cond = fam.latents(batch, 0).cuda(), {k: v.cuda() for k, v in fam.inputs(batch, 0).items()}
    outs = []
    for k, t in enumerate(TIMESTEPS):
        out = fast(**_cuda_kwargs(fam, x, t, cond))[0]
        outs.append(out)
        x = x - 0.2 * out
    return outs


@cuda
@pytest.mark.parametrize("name", ["flux-dev", "sd3-medium"])
def test_cuda_capture_ahead_matches_eager(name):
    fam, model = FAMILIES[name], FAMILIES[name].build(seed=0).cuda()
    sched = half_reuse(model)
    eager = compile_blocks(model, sched, cuda_graphs=False)
    graphed = compile_blocks(model, sched, cuda_graphs=True)
    cond = {k: v.cuda() for k, v in fam.inputs(1, 0).items()}
    n = graphed.capture(**_cuda_kwargs(fam, fam.latents(1, 0).cuda(), TIMESTEPS[0], cond))
    assert n == graphed.distinct_plans()
    for _ in range(2):
        got, want = _generate_cuda(graphed, fam), _generate_cuda(eager, fam)
        assert max_err(got, want) <= 1e-5 * scale_of(want)
    assert graphed.num_graphs() == n  # nothing captured lazily


@cuda
def test_cuda_auto_captures_at_the_second_generation():
    fam, model = FAMILIES["flux-schnell"], FAMILIES["flux-schnell"].build(seed=0).cuda()
    auto = compile_blocks(model, half_reuse(model))
    _generate_cuda(auto, fam)
    assert auto.num_graphs() == 0
    _generate_cuda(auto, fam)
    assert auto.num_graphs() == auto.distinct_plans()
