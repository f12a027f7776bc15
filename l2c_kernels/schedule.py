"""Static cache schedules: which branch of which block is computed at which sampling step.

A :class:`Schedule` is pure data. For every sampler step (in call order, identified by the
timestep the pipeline passes) and every transformer block it says, per branch
(``attn1`` self-attention, ``attn2`` cross-attention, ``ff`` MLP), whether the branch is
computed (``C``) or its cached raw output is reused (``R``); or that the whole block is
skipped and its cached residual ``out - in`` re-added (``B``, FORA/DeepCache style).

On disk a schedule is versioned, human-readable JSON::

    {"format": "l2c-schedule", "version": 1, "model_class": "DiTTransformer2DModel",
     "num_blocks": 12, "branches": ["attn1", "ff"], "timesteps": [981, 961, ...],
     "plan": [["CC", "CC", ...], ["CR", "B", ...], ...],   # [step][block] -> one letter per branch, or "B"
     "method": "learned", "params": {...}, "branch_flops": {"attn1": ..., "ff": ...}}

``"forecast"`` says what a reused branch contributes: ``"none"`` (default) its last computed output;
``"linear"`` the first-order extrapolation from its last two computations at steps ``s0 < s1``,
``y1 + (s - s1) / (s1 - s0) * (y1 - y0)`` at step ``s`` (the last output while only one exists);
``"quadratic"`` the parabola through its last three computations (linear while only two exist);
``"taylor"`` TaylorSeer's second-order expansion from the same three, ``y2 + h d1 + h^2 / 2 d2`` with
backward differences per step ``d1 = (y2 - y1) / (s2 - s1)``, ``d2 = (d1 - (y1 - y0) / (s1 - s0)) / (s2 - s1)``
and ``h = s - s2`` (it bends less than the parabola; linear while only two exist).
All are fixed by the schedule before sampling, so any runs inside one CUDA graph per step plan.

``"sampler"`` (optional; files without it load as before) records the sampler the schedule was made
for: ``{"class": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "mu": 0.82, "config": {...}}``
(:func:`sampler_info`). The rule for timesteps: a call's timestep picks the step whose timestep it
is (within float rounding, or the one step it is a bfloat16 / float16 rounding of: :meth:`Schedule.step_index`);
any other timestep is an error naming the schedule's sampler and steps.
To run a schedule with other timesteps, :meth:`Schedule.retimed` (or :meth:`Schedule.for_scheduler`)
maps it **by step index** -- step ``k`` of the schedule runs at the ``k``-th new timestep -- and allows
that only when the step count is the same and the new sampler differs at most in its timestep shift
(:data:`SHIFT_KEYS`: ``shift``, Flux/SD3's resolution-dependent ``mu`` and its dynamic-shift settings,
``flow_shift``): a flow-matching schedule learned at one resolution runs at another with the same step
count. Another step count or another sampler (class or any other setting) raises
:class:`ScheduleError` naming both samplers.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

FORMAT = "l2c-schedule"
VERSION = 1
KNOWN_BRANCHES = ("attn1", "attn2", "ff", "ff_context", "block")  # ff_context: SD3/Flux text-stream MLP
BLOCK_UNIT = "block"  # block-level schedules: branches ["block"], one letter per block (C compute, R reuse)
#: the levels a schedule can run at (``l2c_kernels.adapters.level_for`` decides a model's): a DiT / PixArt block's
#: branches, whole blocks (the pattern table), the units of SD3 / Flux two-stream blocks
BRANCH_LEVEL, BLOCK_LEVEL, TWO_STREAM_LEVEL = "branch", "block", "two_stream_branch"
LEVELS = (BRANCH_LEVEL, BLOCK_LEVEL, TWO_STREAM_LEVEL)
FORECASTS = ("none", "linear", "quadratic", "taylor")
COMPUTE, REUSE, BLOCK = "C", "R", "B"


class ScheduleError(ValueError):
    """A schedule that is malformed or does not fit the model it is used with."""


#: the families layer (``l2c_kernels.adapters``) that reads a model's layout; it registers itself on import, so the
#: format imports no adapter
_FAMILIES = None


def register_families(adapter_for) -> None:
    """How the format reads a model's layout: ``adapter_for(model, branches)`` (the adapter of the level those
    branches mean; ``l2c_kernels.adapters`` registers it when imported; ``import l2c_kernels`` does)."""
    global _FAMILIES
    _FAMILIES = adapter_for


def _families():
    assert _FAMILIES is not None, "no model families are registered to read the model's layout: import l2c_kernels"
    return _FAMILIES


def _model_facts(model, branches=None, ad=None) -> tuple[str, int, list[str], dict]:
    """Class name, block count, branches and per-branch costs of ``model`` at the level ``branches`` mean (``ad``:
    that level's adapter, when the caller has it already)."""
    ad = _families()(model, branches) if ad is None else ad
    inner = getattr(model, "original_model", model)
    return type(inner).__name__, ad.num_blocks(inner), ad.branches(inner), ad.branch_flops(inner)


@dataclass
class Schedule:
    """A static cache schedule; see the module docstring for the format."""

    timesteps: list[int]
    plan: list[list[str]]
    branches: list[str]
    num_blocks: int
    model_class: str = ""
    method: str = "manual"
    params: dict = field(default_factory=dict)
    branch_flops: dict = field(default_factory=dict)
    attn2_cache: str = "per_sample"  # or "cfg_mean" (T-GATE: cache the mean of the CFG halves)
    forecast: str = "none"           # or "linear" / "quadratic" / "taylor": extrapolate reused outputs (docstring)
    unit_flops: list = field(default_factory=list)  # block-level: FLOPs of each block (budget weights), or empty
    unit_branch_flops: list = field(default_factory=list)  # [block][branch] FLOPs (0: branch not in that block), or empty
    sampler: dict = field(default_factory=dict)     # the sampler it was made for (sampler_info), or empty

    def __post_init__(self):
        self.timesteps = [_as_number(t, f"timesteps[{i}]") for i, t in enumerate(_sequence(self.timesteps, "timesteps"))]
        self.plan = [list(_sequence(step, f"plan[{s}]")) for s, step in enumerate(_sequence(self.plan, "plan"))]
        self.branches = list(_sequence(self.branches, "branches"))
        self._check()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mask(cls, model, timesteps: Sequence[int], mask, branches: Sequence[str] | None = None,
                  block_reuse=None, method: str = "manual", params: dict | None = None,
                  attn2_cache: str = "per_sample", forecast: str = "none",
                  unit_flops: Sequence[float] | None = None, sampler: dict | None = None,
                  unit_branch_flops: Sequence[Sequence[float]] | None = None) -> "Schedule":
        """Build from ``mask[step][block][branch]`` (True = compute) for ``model``.

        ``block_reuse[step][block]`` (optional, True = skip the whole block and re-add its cached
        residual) overrides the branch mask for that block and step.

        Block level (``branches=["block"]``, the default for models without a branch adapter, e.g. Flux):
        ``mask[step][block]`` may be one bool per block; ``unit_flops`` gives each block's cost (e.g. counted
        by ``runtime.block_flops.measure_block_flops``), else it is estimated from the block's weights.

        Branch level on SD3 / Flux (opt-in: name the branches, see ``adapters.mmdit_branches``): the branches
        are the union over the block kinds; one a block does not have is written ``C``; ``unit_branch_flops``
        (``[block][branch]``, e.g. from ``runtime.branch_wrappers.measure_branch_flops``) weighs each unit,
        else it is estimated for the family's default token counts.
        """
        ad = _families()(model, branches)   # the adapter of the level these branches mean
        model_class, nblocks, model_branches, flops = _model_facts(model, branches, ad)
        branches = list(branches) if branches is not None else model_branches
        if ad.level == BLOCK_LEVEL:
            mask = [[[v] if isinstance(v, bool) or not hasattr(v, "__len__") else v for v in row]
                    for row in _to_nested(mask)]
        unknown = [b for b in branches if b not in model_branches]
        if unknown:
            raise ScheduleError(f"branches {unknown} do not exist in {model_class}; it has {model_branches}")
        mask = _to_nested(mask)
        if len(mask) != len(timesteps):
            raise ScheduleError(f"mask has {len(mask)} steps but {len(timesteps)} timesteps were given")
        plan = []
        for s, step in enumerate(mask):
            if len(step) != nblocks:
                raise ScheduleError(f"mask step {s} has {len(step)} blocks; {model_class} has {nblocks}")
            row = []
            for b, br in enumerate(step):
                if block_reuse is not None and bool(_to_nested(block_reuse)[s][b]):
                    row.append(BLOCK)
                    continue
                if len(br) != len(branches):
                    raise ScheduleError(f"mask[{s}][{b}] has {len(br)} entries; expected one per branch {branches}")
                row.append("".join(COMPUTE if bool(v) else REUSE for v in br))
            plan.append(row)
        # branches the model has but the mask leaves out are always computed
        if branches != model_branches:
            idx = {b: i for i, b in enumerate(branches)}
            plan = [[e if e == BLOCK else "".join(e[idx[b]] if b in idx else COMPUTE for b in model_branches)
                     for e in row] for row in plan]
        if ad.level == BLOCK_LEVEL:
            unit_flops = [float(f) for f in (unit_flops if unit_flops is not None
                                                  else ad.unit_flops(getattr(model, "original_model", model)))]
        if ad.level == TWO_STREAM_LEVEL:  # branches a block does not have are written C (not applicable)
            app = ad.applicable(getattr(model, "original_model", model))
            plan = [[e if e == BLOCK else "".join(c if ok else COMPUTE for c, ok in zip(e, app[b]))
                     for b, e in enumerate(row)] for row in plan]
            if unit_branch_flops is None:
                unit_branch_flops = ad.unit_branch_flops(getattr(model, "original_model", model))
        ubf = [[float(v) for v in r] for r in unit_branch_flops] if unit_branch_flops is not None else []
        return cls(timesteps=list(timesteps), plan=plan, branches=model_branches, num_blocks=nblocks,
                   model_class=model_class, method=method, params=dict(params or {}),
                   branch_flops=flops, attn2_cache=attn2_cache, forecast=forecast,
                   unit_flops=list(unit_flops or []), sampler=dict(sampler or {}), unit_branch_flops=ubf)

    @classmethod
    def full(cls, model, timesteps: Sequence[int], branches: Sequence[str] | None = None,
             sampler: dict | None = None) -> "Schedule":
        """The schedule that computes everything (output equals the original model's); ``branches=["block"]``
        makes a block-level one for a model that also has a branch adapter."""
        _, nblocks, model_branches, _ = _model_facts(model, branches)
        asked = list(branches) if branches is not None else model_branches   # from_mask names any that do not exist
        mask = [[[True] * len(asked)] * nblocks for _ in timesteps]
        return cls.from_mask(model, timesteps, mask, branches=asked, method="full", sampler=sampler)

    # ------------------------------------------------------------------ queries
    @property
    def is_block_level(self) -> bool:
        """Whether this schedule decides whole blocks (``branches == ["block"]``)."""
        return self.branches == [BLOCK_UNIT]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def compute_mask(self) -> list[list[list[bool]]]:
        """``[step][block][branch]`` -> True where the branch is computed (False when reused or block-reused)."""
        return [[[e != BLOCK and e[i] == COMPUTE for i in range(len(self.branches))] for e in row]
                for row in self.plan]

    def step_index(self, timestep: int, after: int | None = None) -> int:
        """Index of ``timestep`` in call order (the first occurrence after step ``after`` if given). A timestep
        that matches none within float rounding is the step it is a low-precision image of, if exactly one
        (:func:`_low_precision_images`: the pipeline passed it in bfloat16 / float16); otherwise
        :class:`ScheduleError`."""
        t = _as_number(timestep)
        start = 0 if after is None else after + 1
        for i in list(range(start, self.num_steps)) + list(range(0, start)):
            if same_timestep(self.timesteps[i], t):
                return i
        near = [i for i, images in enumerate(_low_precision_images(tuple(self.timesteps)))
                if any(same_timestep(v, t) for v in images)]
        if len(near) == 1:  # a timestep rounded to bfloat16 / float16 by the pipeline (Flux: t / 1000 in bf16)
            return near[0]
        made_for = f" of {describe_sampler(self.sampler)}" if self.sampler else ""
        raise ScheduleError(
            f"timestep {t} is not in this schedule. The schedule was made for {self.num_steps} steps{made_for} with "
            f"timesteps {self.timesteps}; make a schedule for the sampler's timesteps "
            f"(e.g. the same num_inference_steps and scheduler), or, when only the sampler's shift differs "
            f"(e.g. Flux or SD3 at another resolution), map it by step index with schedule.retimed(...) / "
            f"schedule.for_scheduler(...)")

    def retimed(self, timesteps: Sequence, sampler: dict | None = None) -> "Schedule":
        """This schedule for other ``timesteps`` (made by ``sampler``, a :func:`sampler_info` dict), mapped
        by step index: step ``k`` runs at ``timesteps[k]``. Allowed only for the same step count and a
        sampler that differs at most in its shift (:data:`SHIFT_KEYS`); otherwise :class:`ScheduleError`
        names both samplers. A schedule that records no sampler (older files) or a call without
        ``sampler`` checks the step count only (the result then records no sampler)."""
        new = [_as_number(t, f"timesteps[{i}]") for i, t in enumerate(_sequence(timesteps, "timesteps"))]
        mine = describe_sampler(self.sampler) if self.sampler else "an unrecorded sampler"
        theirs = describe_sampler(sampler) if sampler else "the new sampler"
        if len(new) != self.num_steps:
            raise ScheduleError(f"cannot map this schedule by step index: it was made for {self.num_steps} steps of "
                                f"{mine}, but {theirs} has {len(new)} steps; make a schedule for that step count")
        if self.sampler and sampler:
            diff = sampler_differences(self.sampler, sampler)
            if diff:
                raise ScheduleError(f"cannot map this schedule by step index: it was made for {mine}, and {theirs} "
                                    f"differs in {', '.join(diff)} (only {', '.join(SHIFT_KEYS)} may differ); "
                                    f"make a schedule for that sampler")
        params = dict(self.params)
        if self.sampler or self.timesteps != new:
            params["retimed_from"] = dict(timesteps=self.timesteps, **(dict(sampler=self.sampler) if self.sampler else {}))
        d = self.to_dict()
        d.update(timesteps=new, params=params, sampler=dict(sampler or {}))
        return Schedule.from_dict(d)

    def for_scheduler(self, scheduler, mu: float | None = None) -> "Schedule":
        """:meth:`retimed` to a diffusers ``scheduler`` whose ``set_timesteps`` has been called (``mu``: the
        dynamic shift it was given, e.g. by a Flux pipeline)."""
        return self.retimed(list(scheduler.timesteps), sampler_info(scheduler, mu=mu))

    def removed_fraction(self) -> float:
        """Fraction of branch computations removed (each branch counts 1)."""
        m = self.compute_mask()
        total = sum(len(b) for row in m for b in row)
        return 1.0 - sum(sum(b) for row in m for b in row) / max(1, total)

    def flops_removed_fraction(self) -> float:
        """Fraction of branch FLOPs removed, weighting each branch by its FLOPs."""
        m = self.compute_mask()
        if self.unit_branch_flops:  # branch level with per-block costs (SD3 / Flux units)
            total = self.num_steps * sum(sum(r) for r in self.unit_branch_flops)
            done = sum(f for row in m for fr, blk in zip(self.unit_branch_flops, row) for f, c in zip(fr, blk) if c)
            return 1.0 - done / max(total, 1e-30)
        if self.unit_flops and len(self.unit_flops) == self.num_blocks:  # block level: each block's own cost
            total = self.num_steps * sum(self.unit_flops)
            done = sum(f for row in m for f, blk in zip(self.unit_flops, row) if all(blk))
            return 1.0 - done / max(total, 1e-30)
        if not self.branch_flops:
            return self.removed_fraction()
        w = [float(self.branch_flops.get(b, 1.0)) for b in self.branches]
        total = sum(sum(w) for row in m for _ in row)
        done = sum(sum(wi for wi, c in zip(w, blk) if c) for row in m for blk in row)
        return 1.0 - done / max(total, 1e-30)

    def summary(self) -> dict:
        """Removed fraction per step and overall, and estimated FLOPs saved."""
        m = self.compute_mask()
        per_step = [1.0 - sum(sum(b) for b in row) / max(1, sum(len(b) for b in row)) for row in m]
        per_branch = {br: 1.0 - sum(blk[i] for row in m for blk in row) / max(1, self.num_steps * self.num_blocks)
                      for i, br in enumerate(self.branches)}
        out = dict(model_class=self.model_class, method=self.method, forecast=self.forecast, steps=self.num_steps,
                   blocks=self.num_blocks, branches=self.branches,
                   removed_fraction=round(self.removed_fraction(), 4),
                   flops_removed_fraction=round(self.flops_removed_fraction(), 4),
                   ideal_speedup=round(1.0 / max(1e-9, 1.0 - self.flops_removed_fraction()), 3),
                   removed_per_branch={k: round(v, 4) for k, v in per_branch.items()},
                   removed_per_step=[round(v, 4) for v in per_step],
                   block_reuses=sum(e == BLOCK for row in self.plan for e in row))
        return out

    def format_summary(self) -> str:
        s = self.summary()
        lines = [f"{s['method']} schedule for {s['model_class']}: {s['steps']} steps x {s['blocks']} blocks x "
                 f"{'/'.join(s['branches'])}" + (f", reused outputs forecast: {s['forecast']}"
                                                  if s["forecast"] != "none" else ""),
                 f"  branch computations removed: {100 * s['removed_fraction']:.1f}%   "
                 f"branch FLOPs removed: {100 * s['flops_removed_fraction']:.1f}%   "
                 f"ideal speedup of the blocks: {s['ideal_speedup']:.2f}x",
                 "  per branch: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["removed_per_branch"].items()),
                 "  per step:   " + " ".join(f"{100 * v:.0f}" for v in s["removed_per_step"])]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_summary()

    # ------------------------------------------------------------------ validation
    def _check(self) -> None:
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ScheduleError(f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        for name in ("model_class", "method"):
            if not isinstance(getattr(self, name), str):
                raise ScheduleError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.params, dict):
            raise ScheduleError(f"params must be a JSON object, got {self.params!r}")
        try:
            json.dumps(self.params)
        except (TypeError, ValueError) as e:
            raise ScheduleError(f"params must be JSON-serialisable (it is saved with the schedule): {e}") from None
        if not isinstance(self.branch_flops, dict) or not all(
                _is_finite_number(v) and v >= 0 for v in self.branch_flops.values()):
            raise ScheduleError(f"branch_flops must map branch names to finite numbers >= 0, got {self.branch_flops!r}")
        if not self.branches or any(b not in KNOWN_BRANCHES for b in self.branches):
            raise ScheduleError(f"branches must be a non-empty subset of {KNOWN_BRANCHES}, got {self.branches}")
        if BLOCK_UNIT in self.branches and self.branches != [BLOCK_UNIT]:
            raise ScheduleError(f"a block-level schedule has the one branch ['block']; got {self.branches}")
        if not isinstance(self.unit_flops, list) or (self.unit_flops and (
                len(self.unit_flops) != self.num_blocks
                or not all(_is_finite_number(v) and v >= 0 for v in self.unit_flops))):
            raise ScheduleError(f"unit_flops must list one finite number >= 0 per block ({self.num_blocks}), "
                                f"got {self.unit_flops!r}")
        if not isinstance(self.unit_branch_flops, list) or (self.unit_branch_flops and (
                len(self.unit_branch_flops) != self.num_blocks
                or not all(isinstance(r, list) and len(r) == len(self.branches)
                           and all(_is_finite_number(v) and v >= 0 for v in r) for r in self.unit_branch_flops))):
            raise ScheduleError(f"unit_branch_flops must list, per block ({self.num_blocks}), one finite number >= 0 "
                                f"per branch {self.branches}; got {self.unit_branch_flops!r}")
        if len(set(self.branches)) != len(self.branches):
            raise ScheduleError(f"duplicate branch names in {self.branches}")
        if not isinstance(self.sampler, dict) or (self.sampler and not isinstance(self.sampler.get("class"), str)):
            raise ScheduleError(f"sampler must be empty or a JSON object with a \"class\" name, got {self.sampler!r}")
        if self.attn2_cache not in ("per_sample", "cfg_mean"):
            raise ScheduleError(f"attn2_cache must be 'per_sample' or 'cfg_mean', got {self.attn2_cache!r}")
        if self.forecast not in FORECASTS:
            raise ScheduleError(f"forecast must be one of {FORECASTS}, got {self.forecast!r}")
        if self.num_steps == 0:
            raise ScheduleError("a schedule needs at least one step")
        if len(self.plan) != self.num_steps:
            raise ScheduleError(f"plan has {len(self.plan)} steps but there are {self.num_steps} timesteps")
        nbr = len(self.branches)
        for s, row in enumerate(self.plan):
            if len(row) != self.num_blocks:
                raise ScheduleError(f"plan step {s} has {len(row)} blocks; the schedule says {self.num_blocks}")
            for b, e in enumerate(row):
                if not isinstance(e, str) or not (e == BLOCK or (len(e) == nbr and set(e) <= {COMPUTE, REUSE})):
                    raise ScheduleError(f"plan[{s}][{b}] = {e!r}: expected 'B' or {nbr} letters of C/R "
                                        f"(one per branch {self.branches})")
        # every reuse must read a cache that an earlier step filled
        filled_branch = [[False] * nbr for _ in range(self.num_blocks)]
        filled_block = [False] * self.num_blocks
        for s, row in enumerate(self.plan):
            for b, e in enumerate(row):
                if e == BLOCK:
                    if not filled_block[b]:
                        raise ScheduleError(f"step {s} (t={self.timesteps[s]}) reuses block {b} as a whole before any "
                                            f"earlier step ran it; the first step must compute everything")
                    continue
                filled_block[b] = True
                for i, c in enumerate(e):
                    if c == REUSE and not filled_branch[b][i]:
                        raise ScheduleError(
                            f"step {s} (t={self.timesteps[s]}) reuses {self.branches[i]} of block {b} before any "
                            f"earlier step computed it; the first step must compute everything")
                    if c == COMPUTE:
                        filled_branch[b][i] = True

    def validate_for(self, model) -> None:
        """Raise :class:`ScheduleError` if this schedule was made for a different model layout."""
        model_class, nblocks, branches, _ = _model_facts(model, self.branches)
        if nblocks != self.num_blocks:
            raise ScheduleError(f"schedule was made for {self.num_blocks} blocks ({self.model_class or 'unknown model'}) "
                                f"but {model_class} has {nblocks}")
        if branches != self.branches:
            raise ScheduleError(f"schedule branches {self.branches} do not match {model_class}'s branches {branches}")
        if self.model_class and self.model_class != model_class:
            raise ScheduleError(f"schedule was made for {self.model_class}, not {model_class}")

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return dict(format=FORMAT, version=VERSION, model_class=self.model_class, num_blocks=self.num_blocks,
                    branches=self.branches, attn2_cache=self.attn2_cache, forecast=self.forecast, method=self.method,
                    params=self.params, branch_flops=self.branch_flops,
                    **(dict(unit_flops=self.unit_flops) if self.unit_flops else {}),
                    **(dict(unit_branch_flops=self.unit_branch_flops) if self.unit_branch_flops else {}),
                    **(dict(sampler=self.sampler) if self.sampler else {}), timesteps=self.timesteps,
                    plan=self.plan)

    @classmethod
    def from_dict(cls, d: Any) -> "Schedule":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ScheduleError(f"not an l2c schedule (expected \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION or isinstance(d.get("version"), bool):
            raise ScheduleError(f"schedule file version {d.get('version')!r} is not supported; "
                                f"this l2c_kernels reads version {VERSION}")
        missing = [k for k in ("num_blocks", "branches", "timesteps", "plan") if k not in d]
        if missing:
            raise ScheduleError(f"schedule is missing fields {missing}")
        return cls(timesteps=d["timesteps"], plan=d["plan"], branches=d["branches"], num_blocks=d["num_blocks"],
                   model_class=d.get("model_class", ""), method=d.get("method", "manual"),
                   params=d.get("params", {}), branch_flops=d.get("branch_flops", {}),
                   attn2_cache=d.get("attn2_cache", "per_sample"), forecast=d.get("forecast", "none"),
                   unit_flops=d.get("unit_flops", []), sampler=d.get("sampler", {}),
                   unit_branch_flops=d.get("unit_branch_flops", []))

    def to_json(self) -> str:
        """JSON with one field per line and one plan row (a step) per line."""
        d = self.to_dict()
        plan = d.pop("plan")
        fields = [f" {json.dumps(k)}: {json.dumps(v, separators=(', ', ': '))}" for k, v in d.items()]
        rows = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in plan)
        return "{\n" + ",\n".join(fields) + ',\n "plan": [\n  ' + rows + "\n ]\n}\n"

    def save(self, path) -> None:
        """Write the JSON next to ``path`` and move it into place, so that a failed write leaves no
        half-written schedule (an existing file stays as it was)."""
        path = Path(path)
        text = self.to_json()
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path) -> "Schedule":
        text = Path(path).read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScheduleError(f"{path}: not valid JSON (truncated or corrupted file?): {e}") from None
        return cls.from_dict(d)


def _as_number(t, what: str = "timestep"):
    """A timestep as ``int`` (whole numbers) or ``float``; anything else -- strings, booleans, NaN,
    infinities -- raises :class:`ScheduleError` naming ``what``."""
    v = t
    if hasattr(t, "item") and not isinstance(t, (int, float)):
        try:
            v = t.item()
        except (ValueError, RuntimeError):
            raise ScheduleError(f"{what} must be one number, got {t!r}") from None
    if not _is_finite_number(v):
        raise ScheduleError(f"{what} = {t!r} is not a finite number")
    if isinstance(v, int):
        return int(v)
    v = float(v)
    return int(v) if v.is_integer() else v


def _is_finite_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _sequence(x, what: str) -> list:
    """``x`` as a list: lists, tuples and tensors/arrays (``tolist``); anything else raises."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        raise ScheduleError(f"{what} must be a list, got {x!r}")
    return list(x)


#: Sampler settings that only shift the timesteps: a schedule may be mapped by step index across them.
SHIFT_KEYS = ("shift", "mu", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
              "max_image_seq_len", "flow_shift")


def sampler_info(scheduler, mu: float | None = None) -> dict:
    """What a schedule records about the diffusers ``scheduler`` it is made for: its class, its
    ``shift`` (flow matching), the dynamic shift ``mu`` it was given (Flux / SD3 pipelines compute it
    from the image size), and its JSON-safe scalar config."""
    cfg = {k: v for k, v in dict(scheduler.config).items()
           if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}
    info: dict = {"class": type(scheduler).__name__}
    if "shift" in cfg:
        info["shift"] = cfg["shift"]
    if mu is not None:
        info["mu"] = round(float(mu), 6)
    info["config"] = cfg
    return info


def sampler_differences(a: dict, b: dict, ignore: Sequence[str] = SHIFT_KEYS) -> list[str]:
    """Names of the settings in which samplers ``a`` and ``b`` (:func:`sampler_info` dicts) differ, other
    than ``ignore``: ``"class"`` first, then config keys."""
    out = ["class"] if a.get("class") != b.get("class") else []
    ca, cb = a.get("config", {}), b.get("config", {})
    out += sorted(k for k in set(ca) | set(cb) if k not in ignore and ca.get(k) != cb.get(k))
    return out


def describe_sampler(s: dict) -> str:
    """``FlowMatchEulerDiscreteScheduler (shift 3.0, mu 0.82)`` for a :func:`sampler_info` dict."""
    extra = [f"{k} {s[k]}" for k in ("shift", "mu") if k in s]
    return str(s.get("class", "unknown sampler")) + (f" ({', '.join(extra)})" if extra else "")


@functools.lru_cache(maxsize=64)
def _low_precision_images(timesteps: tuple) -> list[tuple[float, ...]]:
    """Per timestep, the values a pipeline running in bfloat16 / float16 hands the model for it, as the
    model's sampler timestep: ``t`` rounded to the dtype, and ``t / 1000`` computed in the dtype times
    1000 (Flux-style pipelines pass ``t.to(latents.dtype) / 1000``)."""
    import torch

    out = []
    for t in timesteps:
        vals = []
        for dt in (torch.bfloat16, torch.float16):
            a = torch.tensor(float(t), dtype=torch.float32).to(dt)
            vals += [float(a), float(a / 1000) * 1000.0]
        out.append(tuple(vals))
    return out


def same_timestep(a, b) -> bool:
    """Timesteps match exactly, or within float rounding for samplers with fractional timesteps."""
    return abs(float(a) - float(b)) <= 1e-4 * max(1.0, abs(float(a)))


def next_step_index(timesteps, t, current: int | None) -> int | None:
    """The step a sampler calling with timestep ``t`` is at, after step ``current`` (``None``: no step
    yet): the next step when ``t`` is its timestep, else 0 when ``t`` is the first timestep again (a new
    generation), else ``None``."""
    nxt = 0 if current is None else current + 1
    if nxt < len(timesteps) and same_timestep(timesteps[nxt], t):
        return nxt
    if same_timestep(timesteps[0], t):
        return 0
    return None


def _to_nested(mask):
    if hasattr(mask, "tolist"):
        return mask.tolist()
    return mask
