"""Learning branch-level schedules on SD3 / SD3.5 / Flux.1 two-stream blocks.

- the soft forward with hard weights (0 / 1) equals an independent forward-hook reference of the same schedule
  (``tests/mmdit_branches/hook_reference.py``) over a whole generation, with reuse and with linear forecast;
- its gradient in the weights is the derivative of the output (central differences), and a unit a block does not
  have gets none;
- the router's per-unit costs, counted on one real call, equal the analytical count at the pipeline's real image
  and text token counts;
- ``learn_schedule(pipe, branches=...)`` on tiny Flux and SD3.5-style pipelines: the learned schedule validates,
  removes its budget, compiles to the branch runtime and equals the hook reference inside the unchanged pipeline.
"""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels.adapters.mmdit_branches import applicable, branch_names, estimate_branch_flops
from l2c_kernels.learn.units import learning_units
from l2c_kernels.learn.soft_forward import SoftCaches, soft_forward
from tests.families.conftest import TIMESTEPS, built, generate, max_err
from tests.family_configs import FAMILIES
from tests.mmdit_branches.hook_reference import HookBranchReference
from tests.mmdit_branches.test_branch_runtime import random_mask, scale_of


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def soft_generation(model, fam, mask, forecast="none"):
    """A whole generation through the soft forward with the hard weights of ``mask`` (step 0: all computed)."""
    names = branch_names(model)
    caches = SoftCaches(len(mask[0]), len(names), forecast, branches=names)
    w = torch.tensor(mask, dtype=torch.float32)
    with torch.no_grad():
        return generate(lambda s, kw: (soft_forward(model, kw, None if s == 0 else w[s], caches),), fam)


@pytest.mark.parametrize("name,forecast", [("flux-dev", "none"), ("flux-schnell", "linear"),
                                           ("sd3.5-large", "none"), ("sd3-medium", "linear")])
def test_hard_weights_equal_hook_reference(name, forecast):
    fam, model = FAMILIES[name], built(name)
    mask = random_mask(model, seed=11, p_compute=0.6)
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=branch_names(model), forecast=forecast)
    ref = generate(HookBranchReference(model, sched).step, fam)
    got = soft_generation(model, fam, mask, forecast)
    full = generate(lambda s, kw: model(**kw), fam)
    # the same operations in another order (gate * y added to the stream; a split proj_out): float32 rounding
    assert max_err(ref, got) <= 1e-5 * scale_of(ref)
    assert max_err(full, got) > 1e-3  # the reuse really changed the output


def test_gradient_is_the_derivative():
    fam, model = FAMILIES["flux-dev"], built("flux-dev")
    names = branch_names(model)
    app = applicable(model)
    nb = len(app)
    x, cond = fam.latents(1, 0), fam.inputs(1, 0)
    probe = torch.randn(generate(lambda s, kw: model(**kw), fam, timesteps=TIMESTEPS[:1], batch=1)[0].shape,
                        generator=torch.Generator().manual_seed(0))

    def loss(w1):
        caches = SoftCaches(nb, len(names), branches=names)
        soft_forward(model, fam.call_kwargs(x, TIMESTEPS[0], cond), None, caches)
        out = soft_forward(model, fam.call_kwargs(x * 0.9, TIMESTEPS[1], cond), w1, caches)
        return (out * probe).sum()

    w = torch.full((nb, len(names)), 0.5, requires_grad=True)
    loss(w).backward()
    single = next(b for b in range(nb) if not app[b][names.index("ff_context")])
    cells = [(0, names.index("attn1")), (0, names.index("ff_context")), (single, names.index("ff")),
             (single, names.index("attn1"))]
    eps = 1e-2
    for b, j in cells:
        d = torch.zeros_like(w)
        d[b, j] = eps
        with torch.no_grad():
            fd = (loss(w.detach() + d) - loss(w.detach() - d)) / (2 * eps)
        assert abs(float(w.grad[b, j]) - float(fd)) <= 2e-2 * abs(float(fd)) + 1e-3, (b, names[j])
        assert abs(float(fd)) > 1e-3  # the unit matters
    assert float(w.grad[single, names.index("ff_context")]) == 0.0  # not applicable: ignored


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_unit_costs_are_counted_at_the_real_token_counts(family):
    from l2c_kernels.sampling.conditioning import denoiser_for
    from tests.tiny_pipelines import BUILDERS, CALL_KW, PROMPTS

    pipe, kw = BUILDERS[family](), CALL_KW[family]
    den = denoiser_for(pipe, 1, kw["guidance_scale"], None, seed=0, labels=None, prompts=PROMPTS[:1],
                       height=kw["height"], width=kw["width"], conditions=None, latent_shape=None,
                       max_sequence_length=kw["max_sequence_length"])
    tr = pipe.transformer
    units = learning_units(den, branch_names(tr))
    want = torch.tensor(estimate_branch_flops(tr, den.image_tokens, den.text_tokens))
    assert units.names == branch_names(tr) and units.level == "two_stream_branch"
    assert torch.equal(units.cost, want)
    assert units.schedule_kwargs["unit_branch_flops"] == want.tolist()
    blocks = learning_units(den)
    assert blocks.names == ["block"] and blocks.cost.shape == (len(want), 1)
    # a whole block costs its units plus its adaLN modulation (not part of any unit)
    assert torch.all(blocks.cost[:, 0] >= want.sum(1)) and torch.all(blocks.cost[:, 0] <= 1.05 * want.sum(1))
    with pytest.raises(ValueError, match="not a subset"):
        learning_units(den, ["attn1", "attn9"])


@pytest.mark.parametrize("family,forecast", [("flux", "none"), ("sd3", "auto")])
def test_learned_branch_schedule_in_the_pipeline_equals_hook_reference(family, forecast):
    """learn_schedule(pipe, branches=...) at 50% on a tiny FluxPipeline (guidance embedding, packed latents, RoPE) and
    a tiny SD3.5-style pipeline (CFG batch, dual attention in block 0, context_pre_only last block): the schedule is
    branch level, validates, removes the budget of counted unit FLOPs (to one unit), compiles to the branch runtime,
    and inside the unchanged pipeline equals the forward-hook reference of the same schedule (SD3: the forecast mode the
    learner picked among none / linear / quadratic)."""
    from l2c_kernels.sampling.mmdit_conditions import pipeline_timesteps
    from tests.tiny_pipelines import CALL_KW, PROMPTS, run_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

    steps, kw = 4, CALL_KW[family]
    pipe = tiny_flux_pipeline(layers=1, single_layers=2) if family == "flux" else \
        tiny_sd3_pipeline(dual_attention_layers=(0,), qk_norm="rms_norm")
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    names = branch_names(model)
    sched = l2c.learn_schedule(pipe, num_inference_steps=steps, budget=0.5, prompts=PROMPTS[:1], height=kw["height"],
                               width=kw["width"], guidance_scale=kw["guidance_scale"],
                               max_sequence_length=kw["max_sequence_length"], branches=names, iterations=4,
                               batch_size=1, calibration_samples=1, structured_candidates=False, forecast=forecast,
                               progress=False)
    assert sched.branches == names and sched.method == "learned"
    assert forecast == "auto" and sched.forecast in ("none", "linear", "quadratic") or sched.forecast == forecast
    sched.validate_for(model)
    ts, _ = pipeline_timesteps(pipe, steps, height=kw["height"], width=kw["width"])
    assert sched.timesteps == pytest.approx(ts)
    costs = [max(r) for r in sched.unit_branch_flops]  # the largest unit: the budget's granularity
    frac = sched.flops_removed_fraction()
    assert 0.5 <= frac <= 0.5 + max(costs) / (steps * sum(map(sum, sched.unit_branch_flops))) + 1e-9
    mask = sched.compute_mask()
    assert any(not c for row in mask[1:] for blk in row for c in blk) and all(all(b) for b in mask[0])
    fast = l2c.compile_schedule(model, sched)
    assert type(fast).__name__ == "BranchCachedTransformer"
    full = run_pipeline(pipe, family, steps=steps)
    with HookBranchReference(model, sched).installed():
        ref = run_pipeline(pipe, family, steps=steps)
    pipe.transformer = fast
    try:
        out = run_pipeline(pipe, family, steps=steps)
    finally:
        pipe.transformer = model
    scale = float(full.abs().max())
    assert float((ref - full).abs().max()) > 1e-3 * scale
    assert float((out - ref).abs().max()) <= 1e-5 * scale
