"""The per-step path does no device sync: no .item(), torch.equal, bool() of a tensor, ... from the runtime's own
code (counted through patched functions), and the step comes from a call counter where no timestep is read."""
from __future__ import annotations

import sys

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import schedules
from tests.runtime.test_compile_schedule import run_steps
from tests.tiny_models import cfg_batch, dit_inputs, pixart_inputs, rel_err, tiny_dit, tiny_pixart

TS = [951, 851, 751, 651, 551, 451, 351, 251]
# documented host reads that never run on device tensors: the DiT adapter's per-timestep embedding cache
# (CPU eager only)
_CPU_ONLY = {"_timestep_embeddings"}


class SyncCounter:
    """Counts calls of functions that read a tensor on the host, made directly from l2c_kernels code."""

    NAMES = [(torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "__bool__"), (torch.Tensor, "__float__"),
             (torch.Tensor, "__int__"), (torch.Tensor, "cpu"), (torch.Tensor, "numpy"), (torch.Tensor, "nonzero"),
             (torch, "equal"), (torch, "allclose"), (torch.cuda, "synchronize")]

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        for owner, name in self.NAMES:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, fn, name):
        def counted(*a, **k):
            f = sys._getframe(1)
            if "l2c_kernels" in f.f_code.co_filename and f.f_code.co_name not in _CPU_ONLY:
                self.calls.append((name, f.f_code.co_name))
            return fn(*a, **k)

        return counted


def _tgate_and_forecast():
    pix = tiny_pixart(layers=2)
    tg = schedules.tgate(pix, TS, gate_step=3, sp_interval=1)
    dit = tiny_dit(layers=2)
    fc = schedules.uniform(dit, TS, 2, forecast="quadratic")
    return [(pix, tg, cfg_batch(pixart_inputs(batch=4))), (dit, fc, dit_inputs(batch=2))]


def test_no_sync_on_the_device_path(monkeypatch):
    """timestep_check='off' is what a GPU run does with device tensors: nothing is read on the host."""
    cases = _tgate_and_forecast()
    mods = [l2c.compile_schedule(m, s, timestep_check="off", cfg_collapse="assume") for m, s, _ in cases]
    counter = SyncCounter(monkeypatch)
    for mod, (_, s, inputs) in zip(mods, cases):
        for _ in range(2):
            run_steps(mod, s, inputs)
    assert counter.calls == []
    assert mods[0].collapsed_calls > 0  # the collapse path ran, without a comparison


def test_the_counter_sees_added_syncs(monkeypatch):
    """The same run in strict mode reads timesteps and compares CFG halves: the counter must see it."""
    (m, s, inputs), _ = _tgate_and_forecast()
    mod = l2c.compile_schedule(m, s, timestep_check="strict")
    counter = SyncCounter(monkeypatch)
    run_steps(mod, s, inputs)
    assert ("__float__", "_host_timestep") in counter.calls and ("equal", "_collapse") in counter.calls
    assert mod.collapsed_calls > 0


def test_host_mode_reads_only_timesteps_and_cpu_halves(monkeypatch):
    (m, s, inputs), _ = _tgate_and_forecast()
    mod = l2c.compile_schedule(m, s)
    counter = SyncCounter(monkeypatch)
    run_steps(mod, s, inputs)
    # host mode on CPU tensors: the timestep, the CFG halves and the latents' finiteness are read (free there)
    assert {fn for _, fn in counter.calls} <= {"_host_timestep", "_collapse", "_check_latents"}
    assert sum(fn == "_host_timestep" for _, fn in counter.calls) == len(TS)  # one read per step
    assert sum(fn == "_check_latents" for _, fn in counter.calls) == len(TS)  # one finiteness check per call


def test_counter_mode_follows_calls_and_wraps_to_a_new_generation():
    """Without timestep reads the step is the call count: wrong timesteps do not matter, and after the last
    step the next call starts a new generation (same outputs as the timestep-driven run)."""
    m = tiny_dit(layers=2)
    s = schedules.uniform(m, TS, 2, forecast="linear")
    inputs = dit_inputs(batch=2)
    ref = run_steps(l2c.compile_schedule(m, s), s, inputs)
    off = l2c.compile_schedule(m, s, timestep_check="off")
    for gen in range(2):
        for k in range(len(TS)):
            out = off(**dict(inputs, timestep=torch.full((2,), TS[k]))).sample
            assert off.current_step == k
            assert rel_err(out, ref[k]) < 1e-6, (gen, k)
    assert off.summary()["generations"] == 2


def test_host_timestep_moves_to_its_step_and_jump_is_checked():
    m = tiny_dit(layers=2)
    s = schedules.uniform(m, TS, 2)
    mod = l2c.compile_schedule(m, s)
    inputs = dit_inputs(batch=2)
    mod(**dict(inputs, timestep=torch.full((2,), TS[0])))
    mod(**dict(inputs, timestep=torch.full((2,), TS[2])))  # skips step 1: step 2 computes, nothing missing
    assert mod.current_step == 2
    mod.reset()
    mod.set_step(3)  # step 3 reuses what step 2 stored, in a generation that ran nothing
    with pytest.raises(l2c.ScheduleError, match="not filled"):
        mod(**inputs)


def test_bad_options_named():
    m = tiny_dit(layers=2)
    s = l2c.Schedule.full(m, TS)
    with pytest.raises(ValueError, match="timestep_check"):
        l2c.compile_schedule(m, s, timestep_check="sometimes")
    with pytest.raises(ValueError, match="cfg_collapse"):
        l2c.compile_schedule(m, s, cfg_collapse="maybe")
    with pytest.raises(ValueError, match="cuda_graphs"):
        l2c.compile_schedule(m, s, cuda_graphs="later")
