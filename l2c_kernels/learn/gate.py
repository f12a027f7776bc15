"""Choosing T-GATE's gate step from data.

Instead of a hand-set ``gate_step``, :func:`auto_gate` samples a few calibration prompts with full
compute and records every block's cross-attention output (forward hooks on ``attn2``, so custom
attention processors stay in place). Two curves can decide the gate:

- ``"attn2_change"``: the cross-attention output's step-to-step relative change,
  ``mean over blocks of ||y_s - y_(s-1)|| / ||y_(s-1)||`` (T-GATE's convergence argument);
- ``"output"`` (default): the error of the final calibration samples when gating at each step,
  relative to full compute (after the gate the CFG halves are identical, so guidance is gone from the
  remaining steps: this is what the gate really costs).

The gate is the first step from which the curve stays below ``tol`` (:func:`select_gate`):
cross-attention is computed at steps ``0 .. gate_step - 1`` and the CFG mean of step
``gate_step - 1`` is reused after that.

    from l2c_kernels.learn.gate import auto_gate
    g = auto_gate("pixart-digits", 25, "dpm++")
    sched = schedules.tgate(bundle.transformer, g.timesteps, gate_step=g)    # or auto_tgate("pixart-digits", 25, "dpm++")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

#: Default tolerance on the per-step relative change of the cross-attention output, stated for
#: 25 steps. With ``per_step_scaling=True`` (default) it is scaled by ``25 / num_inference_steps``
#: so the same convergence level is asked of any step count (a step of a 50-step sampler moves
#: about half as far as one of a 25-step sampler).
DEFAULT_TOL = 0.05
REFERENCE_STEPS = 25
#: Default tolerance of the ``"output"`` criterion: relative RMS error of the final calibration samples
#: against full compute (for the bundled digits, 0.1 is about 27 dB PSNR).
DEFAULT_OUTPUT_TOL = 0.1


@dataclass
class GateResult:
    """A gate chosen from measurements on calibration prompts."""

    gate_step: int                 # steps 0..gate_step-1 compute cross-attention
    curve: list[float]             # the curve the gate was selected on (see auto_gate), indexed by step
    tol: float                     # the tolerance the curve was compared with (after step scaling)
    timesteps: list[float]         # the sampler's timesteps (call order) the curve was measured on
    per_block: list[list[float]] = field(default_factory=list)  # [step][block] relative change
    scheduler: str | None = None
    prompts: list[str] = field(default_factory=list)
    criterion: str = "attn2_change"
    attn2_change: list[float] = field(default_factory=list)  # the cross-attention change curve, always measured

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def to_dict(self) -> dict:
        def rnd(c):
            return [None if not math.isfinite(v) else round(v, 6) for v in c]

        return dict(gate_step=self.gate_step, criterion=self.criterion, tol=round(self.tol, 6),
                    scheduler=self.scheduler, prompts=list(self.prompts), curve=rnd(self.curve),
                    attn2_change=rnd(self.attn2_change))

    def check_timesteps(self, timesteps: Sequence) -> None:
        from ..schedule import same_timestep

        ts = [float(t) for t in timesteps]
        if len(ts) != self.num_steps or not all(same_timestep(a, b) for a, b in zip(ts, self.timesteps)):
            raise ValueError(f"the gate was measured for {self.num_steps} steps with timesteps {self.timesteps}, "
                             f"not for {ts}; measure it with the same num_inference_steps and scheduler")


def select_gate(curve: Sequence[float], tol: float, min_gate: int = 1) -> int:
    """The first step ``g >= min_gate`` such that ``curve[s] < tol`` for every ``s >= g``.

    ``curve[s]`` is the change of the cross-attention output from step ``s - 1`` to step ``s``; reusing
    the output of step ``g - 1`` from step ``g`` on is what the gate does. Returns ``len(curve)`` (never
    gate) when the last step still changes by ``tol`` or more.
    """
    n = len(curve)
    if n == 0:
        raise ValueError("empty curve")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    min_gate = max(1, int(min_gate))
    g = n
    for s in range(n - 1, min_gate - 1, -1):
        v = float(curve[s])
        if not (v < tol):  # nan counts as not converged
            break
        g = s
    return g


def _hook_cross_attention(model, record: dict):
    from ..adapters import adapter_for

    handles = []
    for b, block in enumerate(adapter_for(model).blocks(model)):
        attn2 = getattr(block, "attn2", None)
        if attn2 is None:
            raise ValueError(f"{type(model).__name__} has no cross-attention (attn2) to measure")

        def hook(mod, args, out, b=b):
            record[b] = (out[0] if isinstance(out, tuple) else out).detach().float().clone()

        handles.append(attn2.register_forward_hook(hook))
    return handles


def _denoiser(obj, num_inference_steps, scheduler, prompts, labels, num_samples, cfg, seed):
    from ..sampling.conditioning import denoiser_for

    if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
        raise ValueError(f"num_inference_steps must be an integer >= 2, got {num_inference_steps!r}")
    if isinstance(obj, str):
        from ..sampling.conditioning import load_named

        obj = load_named(obj)
    if scheduler is None:   # a model may say which sampler its T-GATE settings were measured with
        scheduler = getattr(obj, "tgate_scheduler", None)
    den = denoiser_for(obj, num_samples, cfg, scheduler, seed=seed, labels=labels, prompts=prompts)
    if den.cfg <= 1.0:
        raise ValueError("T-GATE's gate is measured with classifier-free guidance on (cfg > 1)")
    return obj, den


@torch.no_grad()
def measure_cross_attention_change(obj, num_inference_steps: int, scheduler=None, *, prompts=None,
                                   labels=None, num_samples: int = 8, cfg: float | None = None,
                                   seed: int = 0) -> tuple[list[float], list[list[float]], list[float]]:
    """Sample ``obj`` (bundled model, its name, or a PixArt pipeline) with full compute and classifier-free
    guidance and return ``(curve, per_block, timesteps)``: the step-to-step relative change of every
    block's cross-attention output (mean over blocks, and per block) and the sampler's timesteps.

    ``scheduler``: None (a pipeline's own sampler; DPM-Solver++ for a bundled model), a name (``ddim``,
    ``dpm++``, ``euler``, ...) or a diffusers scheduler, refused when it does not fit the model. ``prompts`` are the calibration captions (required for a pipeline; for a bundled model the
    default is captions of ``num_samples`` digits drawn with ``seed``).
    """
    curve, per_block, timesteps, _ = _measure_change(obj, num_inference_steps, scheduler, prompts, labels,
                                                     num_samples, cfg, seed)
    return curve, per_block, timesteps


def _measure_change(obj, num_inference_steps, scheduler, prompts, labels, num_samples, cfg, seed):
    obj, den = _denoiser(obj, num_inference_steps, scheduler, prompts, labels, num_samples, cfg, seed)
    model = den.transformer
    noise = den.noise(seed)
    record: dict = {}
    per_block: list[list[float]] = []
    prev: dict = {}

    def on_step(s):
        cur = dict(record)
        if not prev:
            per_block.append([math.inf] * len(cur))
        else:
            per_block.append([float((cur[b] - prev[b]).norm() / prev[b].norm().clamp_min(1e-12))
                              for b in sorted(cur)])
        prev.clear()
        prev.update(cur)
        record.clear()

    handles = _hook_cross_attention(model, record)
    try:
        final, timesteps = den.sample_with(model, num_inference_steps, noise, on_step)
    finally:
        for h in handles:
            h.remove()
    curve = [math.inf] + [sum(row) / len(row) for row in per_block[1:]]
    return curve, per_block, timesteps, (obj, den, noise, final)


@torch.no_grad()
def auto_gate(obj, num_inference_steps: int, scheduler=None, *, prompts=None, labels=None,
              criterion: str = "output", tol: float | None = None, per_step_scaling: bool = True,
              min_gate: int = 1, num_samples: int = 8, cfg: float | None = None, seed: int = 0,
              full_curve: bool = False, sp_interval: int = 1, fi_interval: int = 1, warm_up: int = 0) -> GateResult:
    """Pick T-GATE's ``gate_step`` for ``obj`` (bundled model, its name, or a PixArt pipeline) and sampler.

    One full-compute run on the calibration prompts records every block's cross-attention output
    (forward hooks on ``attn2``); its step-to-step relative change is always returned as
    ``attn2_change``. The gate is then the first step from which a curve stays below ``tol``
    (:func:`select_gate`), with the curve chosen by ``criterion``:

    - ``"attn2_change"``: the cross-attention output's step-to-step relative change (T-GATE's
      convergence argument). ``tol`` (default :data:`DEFAULT_TOL`) is stated for 25 steps and, with
      ``per_step_scaling``, scaled by ``25 / num_inference_steps``.
    - ``"output"`` (default): for each candidate gate ``g`` the calibration prompts are sampled again
      with the gate at ``g`` (compiled, CFG collapse on; ``sp_interval``/``fi_interval``/``warm_up`` as
      the schedule will use them) and ``curve[g]`` is the relative RMS error of the final samples
      against full compute. ``tol`` (default :data:`DEFAULT_OUTPUT_TOL`) bounds that error. Gates are
      tried from the last step down and the search stops at the first one over the tolerance
      (``full_curve=True`` measures every gate). This measures what the gate does: after it, the CFG
      halves are identical, so guidance is gone from the remaining steps, which no convergence of the
      cross-attention output alone can tell.

    Returns a :class:`GateResult` with the gate, the curve used and ``attn2_change``.
    """
    if criterion not in ("output", "attn2_change"):
        raise ValueError(f"criterion must be 'output' or 'attn2_change', got {criterion!r}")
    change, per_block, timesteps, (obj, den, noise, ref) = _measure_change(
        obj, num_inference_steps, scheduler, prompts, labels, num_samples, cfg, seed)
    n = num_inference_steps
    if criterion == "attn2_change":
        tol = DEFAULT_TOL if tol is None else tol
        eff_tol = tol * REFERENCE_STEPS / n if per_step_scaling else tol
        curve = change
    else:
        from .. import schedules
        from ..runtime import compile_schedule

        eff_tol = DEFAULT_OUTPUT_TOL if tol is None else tol
        curve = [math.nan] * n
        curve[0] = math.inf
        model = den.transformer
        scale = ref.norm()
        for g in range(n - 1, max(1, int(min_gate)) - 1, -1):
            sched = schedules.tgate(model, timesteps, gate_step=g, sp_interval=sp_interval,
                                    fi_interval=fi_interval, warm_up=warm_up)
            out, _ = den.sample_with(compile_schedule(model, sched), n, noise)
            curve[g] = float((out - ref).norm() / scale.clamp_min(1e-12))
            if curve[g] >= eff_tol and not full_curve:
                break
    gate = select_gate(curve, eff_tol, min_gate=min_gate)
    return GateResult(gate_step=gate, curve=curve, tol=eff_tol, timesteps=timesteps, per_block=per_block,
                      scheduler=type(den.make_scheduler()).__name__ if scheduler is None else
                      scheduler if isinstance(scheduler, str) else type(scheduler).__name__,
                      prompts=list(prompts) if prompts is not None else [], criterion=criterion,
                      attn2_change=change)


def auto_tgate(obj, num_inference_steps: int, scheduler=None, *, sp_interval: int = 3,
               fi_interval: int = 1, warm_up: int = 2, **gate_kwargs):
    """A T-GATE :class:`~l2c_kernels.Schedule` for ``obj`` with the gate chosen by :func:`auto_gate`
    (``gate_kwargs``: ``prompts``, ``criterion``, ``tol``, ``min_gate``, ...; the ``"output"`` criterion
    measures with these self-attention intervals). The chosen gate and its curves are kept in the
    schedule's ``params["auto_gate"]``."""
    from ..schedules import tgate
    from ..sampling.conditioning import load_named

    if isinstance(obj, str):
        obj = load_named(obj)
    g = auto_gate(obj, num_inference_steps, scheduler, sp_interval=sp_interval, fi_interval=fi_interval,
                  warm_up=warm_up, **gate_kwargs)
    model = getattr(obj.transformer, "original_model", obj.transformer)
    return tgate(model, g.timesteps, gate_step=g, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up)


__all__ = ["GateResult", "auto_gate", "auto_tgate", "measure_cross_attention_change", "select_gate",
           "DEFAULT_TOL", "DEFAULT_OUTPUT_TOL"]
