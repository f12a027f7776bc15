"""The level a schedule runs a model at is decided in one place (``adapters.level_for``), on published configs.

Each case names what a user passes (a model, the branches a schedule decides) and the level every part of the
package must then agree on: the runtime ``compile_schedule`` returns, the soft forward the learner trains through,
the layout the schedule format reads.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import l2c_kernels as l2c
from l2c_kernels.adapters import adapter_for, level_for
from l2c_kernels.adapters.mmdit_branches import branch_names
from l2c_kernels.runtime.block_runtime import BlockCachedTransformer
from l2c_kernels.runtime.branch_wrappers import BranchCachedTransformer
from l2c_kernels.runtime.cached_transformer import CachedTransformer
from l2c_kernels.schedule import BLOCK_LEVEL, BRANCH_LEVEL, LEVELS, TWO_STREAM_LEVEL
from tests.family_configs import FAMILIES

TS = [900.0, 600.0, 300.0]
UNITS = object()   # stands for "the model's two-stream units" (branch_names(model))

CASES = [   # family, branches asked, level, runtime class
    ("dit-xl-2", None, BRANCH_LEVEL, CachedTransformer),
    ("dit-xl-2", ["block"], BLOCK_LEVEL, BlockCachedTransformer),
    ("pixart-sigma", None, BRANCH_LEVEL, CachedTransformer),
    ("flux-dev", None, BLOCK_LEVEL, BlockCachedTransformer),
    ("flux-dev", ["block"], BLOCK_LEVEL, BlockCachedTransformer),
    ("flux-dev", UNITS, TWO_STREAM_LEVEL, BranchCachedTransformer),
    ("sd3-medium", UNITS, TWO_STREAM_LEVEL, BranchCachedTransformer),
    ("wan2.1-t2v", None, BLOCK_LEVEL, BlockCachedTransformer),
]


@pytest.mark.parametrize("name,branches,level,runtime", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'default' if c[1] is None else 'named'}" for c in CASES])
def test_one_level_decision_drives_format_and_runtime(name, branches, level, runtime):
    model = FAMILIES[name].build()
    if branches is UNITS:
        branches = branch_names(model)
    assert level_for(model, branches) == level
    ad = adapter_for(model, branches)
    sched = l2c.Schedule.full(model, TS, branches=branches)
    assert sched.is_block_level == (level == BLOCK_LEVEL)
    assert sched.branches == ad.branches(model) and sched.num_blocks == ad.num_blocks(model)
    assert type(l2c.compile_schedule(model, sched)) is runtime


def test_levels_are_the_adapters_levels():
    from l2c_kernels.adapters import ADAPTERS, OPT_IN_BRANCH_ADAPTERS

    assert {ad.level for ad in ADAPTERS + OPT_IN_BRANCH_ADAPTERS} == set(LEVELS)


def test_a_named_branch_of_a_block_only_family_stays_at_block_level_and_is_refused_by_name():
    model = FAMILIES["wan2.1-t2v"].build()
    assert level_for(model, ["attn1"]) == BLOCK_LEVEL
    with pytest.raises(l2c.ScheduleError, match=r"branches \['attn1'\] do not exist in WanTransformer3DModel"):
        l2c.Schedule.full(model, TS, branches=["attn1"])


# ------------------------------------------------------------------ nothing else re-derives the level
PACKAGE = Path(l2c.__file__).parent
#: where a level may be spelled out: the format's definition and the families registry
DECIDERS = {"schedule.py", "adapters/__init__.py", "adapters/block_level.py", "adapters/mmdit_branches.py",
            "adapters/base.py"}


def level_derivations(tree: ast.AST) -> list[int]:
    """Lines that compare a list of branches with ``["block"]`` / ``[BLOCK_UNIT]`` or test an adapter's class."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.List) and len(side.elts) == 1 and (
                        (isinstance(side.elts[0], ast.Constant) and side.elts[0].value == "block")
                        or (isinstance(side.elts[0], ast.Name) and side.elts[0].id == "BLOCK_UNIT")):
                    found.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            names = ast.dump(node.args[1]) if len(node.args) > 1 else ""
            if "LevelAdapter" in names or "TwoStreamBranchAdapter" in names:
                found.append(node.lineno)
    return found


def test_no_module_outside_the_registry_re_derives_the_level():
    leaks = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in DECIDERS:
            continue
        lines = level_derivations(ast.parse(path.read_text()))
        if lines:
            leaks[rel] = lines
    assert not leaks, f"the level is re-derived outside adapters.level_for / Schedule.is_block_level: {leaks}"


def test_the_scan_finds_a_re_derived_level():
    src = 'if schedule.branches == ["block"]:\n    pass\nif isinstance(ad, BlockLevelAdapter):\n    pass\n'
    assert level_derivations(ast.parse(src)) == [1, 3]


@pytest.mark.parametrize("name,branches,level,runtime", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'default' if c[1] is None else 'named'}" for c in CASES])
def test_every_level_summarises_what_ran_alike(name, branches, level, runtime):
    """One summary for every runtime level (``DropInModule.summary``), on published configs: a generation of 5 steps
    whose steps 1 and 3 reuse every unit reports its level, the unit FLOPs those steps removed as the schedule
    weighs them, three plans used of three (a computed step that stores for a later reuse, one that does not --
    step 4, the last --, a reused one), and no compiled variants without ``torch_compile``."""
    from tests.families.conftest import TIMESTEPS, built, generate

    model = built(name)
    if branches is UNITS:
        branches = branch_names(model)
    mask = l2c.Schedule.full(model, TIMESTEPS, branches=branches).compute_mask()
    for s in (1, 3):
        mask[s] = [[False] * len(row) for row in mask[s]]
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=branches)
    fast = l2c.compile_schedule(model, sched)
    generate(lambda s, kw: fast(**kw), FAMILIES[name])
    sm = fast.summary()
    unit = "block" if level == BLOCK_LEVEL else "branch"
    assert sm["level"] == unit and sm["steps_run"] == 5 and sm["generations"] == 1
    assert sm[f"{unit}_flops_removed"] == pytest.approx(sched.flops_removed_fraction(), abs=1e-4)
    assert sm["schedule_flops_removed"] == pytest.approx(sched.flops_removed_fraction(), abs=1e-4)
    assert sm["plans_used"] == sm["distinct_plans"] == fast.distinct_plans() == 3
    assert sm["compiled_variants"] is None and fast.compiled_variants() is None
    assert sm["cache_bytes"] == fast.cache_bytes() > 0
