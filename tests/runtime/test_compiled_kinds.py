"""torch.compile at the granularity of a block plan: the number of compiled graphs is bounded by the kinds of
block work a schedule uses, not by its number of distinct step plans, and the output equals the eager module."""
from __future__ import annotations

import torch

import l2c_kernels as l2c
from l2c_kernels.runtime.caches import block_kind
from tests.runtime.test_compile_schedule import run_steps
from tests.tiny_models import dit_inputs, rel_err, tiny_dit

TS = [951, 851, 751, 651, 551, 451, 351, 251, 151, 51]


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _staggered_schedule(model):
    """Three blocks computing on shifted cycles, with a linear forecast: almost every step is its own plan."""
    rows = [["CC"] * 3]
    for s in range(1, len(TS)):
        rows.append(["CC" if (s + b) % 3 == 0 else "RC" if (s + b) % 3 == 1 else "RR" for b in range(3)])
    return l2c.Schedule(timesteps=TS, plan=rows, branches=["attn1", "ff"], num_blocks=3,
                        model_class=type(model).__name__, forecast="linear")


def _compiled_and_eager():
    """A fresh dynamo state; the staggered schedule on a 3-block DiT, compiled with a counting backend and eager."""
    torch._dynamo.reset()
    model = tiny_dit(layers=3)
    sched = _staggered_schedule(model)
    backend = CountingBackend()
    fast = l2c.compile_schedule(model, sched, torch_compile=dict(backend=backend))
    return sched, backend, fast, l2c.compile_schedule(model, sched)


def test_compiled_graphs_bounded_by_block_kinds():
    sched, backend, fast, eager = _compiled_and_eager()
    inputs = dit_inputs(batch=2)
    for gen in range(2):
        for k, (a, b) in enumerate(zip(run_steps(fast, sched, inputs), run_steps(eager, sched, inputs))):
            assert rel_err(a, b) < 1e-6, (gen, k)
    kinds = {block_kind(p, b, False, True) for p in fast.plans for b in range(3)}
    assert fast.distinct_plans() >= 7
    assert backend.graphs == len(kinds) == fast.compiled_variants() < fast.distinct_plans()
    assert fast.summary()["compiled_variants"] == len(kinds)


def test_guards_are_skipped_only_on_steps_already_run_with_inputs_of_the_same_signature(monkeypatch):
    """From the second generation on, a step runs its compiled kinds with only the guards that tell them apart
    (torch's skip_guard_eval_unsafe stance); the first generation, and the first one on inputs of a new shape,
    run every guard (so the kinds they need compile). Outputs equal the eager module either way."""
    sched, backend, fast, eager = _compiled_and_eager()
    skipped = []
    real = torch.compiler.set_stance

    def spy(*a, **k):
        skipped.append(k.get("skip_guard_eval_unsafe", False))
        return real(*a, **k)

    monkeypatch.setattr(torch.compiler, "set_stance", spy)
    for gen, batch in enumerate((2, 2, 4, 4)):
        skipped.clear()
        inputs = dit_inputs(batch=batch)
        for k, (a, b) in enumerate(zip(run_steps(fast, sched, inputs), run_steps(eager, sched, inputs))):
            assert rel_err(a, b) < 1e-6, (gen, k)
        # a generation on inputs seen before skips guards at every step; the first on a new shape at none
        assert skipped == ([True] * len(TS) if gen in (1, 3) else []), (gen, skipped)
    kinds = {block_kind(p, b, False, True) for p in fast.plans for b in range(3)}
    assert backend.graphs == 2 * len(kinds)   # every kind once per input shape, none added by skipping guards


def test_guards_are_skipped_only_where_every_block_has_the_same_structure():
    from l2c_kernels.runtime.warm_steps import same_structure

    model = tiny_dit(layers=3)
    assert same_structure(list(model.transformer_blocks))
    assert not same_structure([torch.nn.Linear(4, 4), torch.nn.Linear(4, 8)])
    assert not same_structure([torch.nn.Linear(4, 4), torch.nn.Conv1d(4, 4, 1)])
