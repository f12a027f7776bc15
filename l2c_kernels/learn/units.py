"""What the router of a model learns: its columns (branches, SD3 / Flux units, or whole blocks) and what each
(block, column) costs, counted on one real call at the denoiser's shapes, for every level the learner runs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters import adapter_for
from ..adapters.mmdit_branches import applicable, branch_names, is_two_stream
from ..schedule import BLOCK_UNIT, BRANCH_LEVEL, TWO_STREAM_LEVEL


def check_unit_names(model, names) -> list[str]:
    """``names`` as a list, checked to be distinct units of ``model``'s two-stream blocks."""
    have = branch_names(model)
    names = list(names)
    unknown = [b for b in names if b not in have]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"branches {names} are not a subset of {type(model).__name__}'s units {have}")
    return names


@dataclass
class LearningUnits:
    """The router's columns for one model and level, and what each (block, unit) costs."""

    branches: list | None          # what was asked: None = the model's default level
    names: list                    # the router's columns (branch names, or ["block"])
    num_blocks: int
    cost: torch.Tensor             # [blocks, columns] FLOPs per model-batch sample; 0 where a unit does not apply
    branch_flops: dict             # per column: mean FLOPs over the blocks that have it
    schedule_kwargs: dict = field(default_factory=dict)  # for Schedule.from_mask: branches=, unit_(branch_)flops=
    level: str = BRANCH_LEVEL      # the level the families registry decided (l2c_kernels.schedule.LEVELS)


def learning_units(den, branches=None) -> LearningUnits:
    """What the router of ``den``'s transformer learns: ``branches=None`` the model's default level (DiT / PixArt:
    their branches, the pattern-table families: whole blocks), ``["block"]`` block level, or a list of SD3 / Flux
    units (e.g. ``branch_names(model)``) for branch level on two-stream blocks.

    Costs: SD3 / Flux (either level) are counted with FlopCounterMode on one real call at the denoiser's latent
    shape and conditioning (``measure_branch_flops`` / ``measure_block_flops``), so a budget is a fraction of the
    FLOPs the schedule really removes at the real image and text token counts, the same number
    :meth:`Schedule.flops_removed_fraction` reports; other families keep their adapter's per-branch costs."""
    model = getattr(den.transformer, "original_model", den.transformer)
    ad = adapter_for(model, branches)
    level, nb = ad.level, ad.num_blocks(model)
    if branches is not None and level != TWO_STREAM_LEVEL and list(branches) != list(ad.branches(model)):
        raise ValueError(f"branches {list(branches)}: {type(model).__name__} learns its branches {ad.branches(model)}")
    if not is_two_stream(model):   # costs from the adapter
        names = list(ad.branches(model))
        flops = ad.branch_flops(model, tokens=den.image_tokens, text_tokens=den.text_tokens or 8)
        cost = torch.tensor([[float(flops[b]) for b in names]] * nb)
        return LearningUnits(None if branches is None else list(branches), names, nb, cost, flops,
                             dict(branches=list(branches)) if branches is not None else {}, level)
    args = _one_call(den)   # SD3 / Flux: costs counted on a real call at the real token counts
    if level == TWO_STREAM_LEVEL:
        from ..runtime.branch_wrappers import measure_branch_flops

        names = check_unit_names(model, branches)
        all_units = branch_names(model)
        counted = measure_branch_flops(model, **args)
        cols = [all_units.index(b) for b in names]
        per = float(args["hidden_states"].shape[0])
        cost = torch.tensor([[row[c] / per for c in cols] for row in counted])
        app = applicable(model)
        flops = {b: float(sum(cost[k, j] for k in range(nb) if app[k][all_units.index(b)]) /
                          max(1, sum(app[k][all_units.index(b)] for k in range(nb))))
                 for j, b in enumerate(names)}
        ubf = [[row[i] / per for i in range(len(all_units))] for row in counted]
        return LearningUnits(names, names, nb, cost, flops, dict(branches=names, unit_branch_flops=ubf), level)
    from ..runtime.block_flops import measure_block_flops

    per = float(args["hidden_states"].shape[0])
    counted = [f / per for f in measure_block_flops(model, **args)]
    cost = torch.tensor([[f] for f in counted])
    return LearningUnits(None if branches is None else [BLOCK_UNIT], [BLOCK_UNIT], nb, cost,
                         {BLOCK_UNIT: sum(counted) / len(counted)},
                         dict(unit_flops=counted, **({} if branches is None else dict(branches=[BLOCK_UNIT]))), level)


def _one_call(den) -> dict:
    """The keyword arguments of the denoiser's first model call (noise of seed 0, first timestep)."""
    sched = den.scheduler(2)
    x = den.noise(0) * getattr(sched, "init_noise_sigma", 1.0)
    return den.model_args(den.batch(x.to(den.device)), sched.timesteps[0])
