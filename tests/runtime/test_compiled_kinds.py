"""torch.compile at the granularity of a block plan: the number of compiled graphs is bounded by the kinds of
block work a schedule uses, not by its number of distinct step plans, and the output equals the eager module."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import schedules
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


def test_a_step_that_only_reuses_runs_as_one_graph_per_kind():
    """FORA every 3rd step with a linear forecast on a 3-block DiT: the steps in between compute nothing, each
    block doing the same reuse, and run as one compiled call over all blocks (step_work.run_reuse_step); the
    computing steps run per block. Graphs: one per block kind of the computing steps plus one per kind of
    reuse-only step, and the output equals the eager module (which runs the same cached timestep embeddings)."""
    torch._dynamo.reset()
    model = tiny_dit(layers=3)
    sched = schedules.uniform(model, TS, 3, forecast="linear")
    backend = CountingBackend()
    fast = l2c.compile_schedule(model, sched, torch_compile=dict(backend=backend))
    eager = l2c.compile_schedule(model, sched)
    calls = {"block": 0, "step": 0}
    real = fast._compiled_fn

    def counted(unit, kind):
        fn = real(unit, kind)

        def call(*a, **k):
            calls[unit] += 1
            return fn(*a, **k)
        return call

    fast._compiled_fn = counted
    inputs = dit_inputs(batch=2)
    for gen in range(2):
        for k, (a, b) in enumerate(zip(run_steps(fast, sched, inputs), run_steps(eager, sched, inputs))):
            assert rel_err(a, b) < 1e-6, (gen, k)
    computing = [s for s, row in enumerate(sched.plan) if any("C" in e for e in row)]
    reusing = [s for s in range(len(TS)) if s not in computing]
    assert reusing and calls == {"block": 2 * 3 * len(computing), "step": 2 * len(reusing)}
    block_kinds = {block_kind(fast.plans[s], b, False, True) for s in computing for b in range(3)}
    step_kinds = {block_kind(fast.plans[s], 0, False, True) for s in reusing}
    assert all(not k[2] for k in step_kinds)   # reuse-only kinds: no branch computed
    assert backend.graphs == len(block_kinds) + len(step_kinds) == fast.compiled_variants()


def test_inductor_on_cpu_with_its_cpp_wrapper_equals_the_eager_module():
    """The default torch.compile path on CPU (inductor, its C++ wrapper: cached_transformer._compile_options) on a
    FORA-2 schedule with a linear forecast: compute-and-store blocks, plain reuse and forecast reuse steps, each a
    real compiled graph; the output equals the eager module to float32 rounding of a different fusion order."""
    from l2c_kernels.runtime.cached_transformer import _compile_options

    assert _compile_options(dict(fullgraph=True), torch.device("cpu"))["options"] == {"cpp_wrapper": True}
    assert "options" not in _compile_options(dict(backend="eager"), torch.device("cpu"))
    assert _compile_options(dict(mode="max-autotune"), torch.device("cpu")) == dict(mode="max-autotune")
    torch._dynamo.reset()
    model = tiny_dit(layers=2)
    ts = TS[:5]
    sched = schedules.uniform(model, ts, 2, forecast="linear")
    fast = l2c.compile_schedule(model, sched, torch_compile=True)
    eager = l2c.compile_schedule(model, sched)
    inputs = dit_inputs(batch=2)
    for gen in range(2):
        for k, (a, b) in enumerate(zip(run_steps(fast, sched, inputs), run_steps(eager, sched, inputs))):
            assert rel_err(a, b) < 1e-5, (gen, k)
    assert any(unit == "step" for unit, *_ in fast._kinds_run)   # the reuse steps ran as whole-step graphs


@pytest.mark.parametrize("name", ["dit-xl-2", "pixart-sigma"])
def test_published_configs_compiled_with_whole_reuse_steps_equal_the_eager_module(name):
    """DiT-XL/2 (learned sigma, 1000 classes; its per-block timestep embeddings reach the compiled work through
    adapter.traced_context) and PixArt-Sigma (T5 prompts, adaLN-single) from their published configs: FORA every
    3rd step with a linear forecast, so steps 1, 2 and 4 only reuse and run as one compiled graph each; two
    generations (the second with guards skipped) equal the eager module."""
    from tests.families.conftest import TIMESTEPS, built, generate, max_err
    from tests.family_configs import FAMILIES

    torch._dynamo.reset()
    fam, model = FAMILIES[name], built(name)
    sched = schedules.uniform(model, TIMESTEPS, 3, forecast="linear")
    fast = l2c.compile_schedule(model, sched, torch_compile=dict(backend=CountingBackend()))
    eager = l2c.compile_schedule(model, sched)
    for gen in range(2):
        got = generate(lambda s, kw: fast(**kw), fam)
        want = generate(lambda s, kw: eager(**kw), fam)
        assert max_err(got, want) <= 1e-5 * max(1.0, max(float(o.abs().max()) for o in want)), gen
    assert {unit for unit, *_ in fast._kinds_run} == {"block", "step"}
