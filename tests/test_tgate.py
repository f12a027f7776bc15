"""T-GATE: CFG collapse, the automatic gate, custom attention processors, unchanged PixArt pipelines."""
from __future__ import annotations

import math

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import schedules
from l2c_kernels.learn.gate import auto_gate, auto_tgate, select_gate
from l2c_kernels.models.pipelines import IdentityVAE, PipelineTextEncoder, PipelineTokenizer
from l2c_kernels.models.text_encoder import DigitTextEncoder
from l2c_kernels.runtime.cuda_graphs import signature
from l2c_kernels.runtime.plan import collapsible_steps
from tests.hook_pipeline import HookTransformer
from tests.tiny_models import _randomize, cfg_batch, pixart_inputs, rel_err, tiny_pixart

STEPS = 6
PROMPTS = ["the digit seven", "a 3"]


# ------------------------------------------------------------------------------------------ helpers


def tiny_pipe(kind: str = "alpha", scheduler=None):
    """A PixArt pipeline around a tiny transformer and caption encoder; latents are the images."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    model = tiny_pixart(layers=2, sample_size=8)
    torch.manual_seed(0)
    enc = DigitTextEncoder(dim=12, num_layers=1, num_heads=2).eval()
    cls = PixArtAlphaPipeline if kind == "alpha" else PixArtSigmaPipeline
    pipe = cls(tokenizer=PipelineTokenizer(enc.tokenizer), text_encoder=PipelineTextEncoder(enc),
               vae=IdentityVAE(4), transformer=model, scheduler=scheduler or DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


def pipe_timesteps(pipe, steps=STEPS):
    sc = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sc.set_timesteps(steps)
    return [float(t) for t in sc.timesteps]


def run_pipe(pipe, steps=STEPS, **kw):
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=4.0, use_resolution_binning=False,
                max_sequence_length=8, height=8, width=8, clean_caption=False,
                generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


def bundled_pixart():
    """The bundled pixart-digits model (random weights of the same architecture if not trained yet)."""
    from l2c_kernels import models
    from l2c_kernels.models.registry import build

    try:
        return models.load("pixart-digits")
    except FileNotFoundError:
        b = build("pixart-digits")
        _randomize(b.transformer, 0, std=0.05)
        b.text_encoder.eval().requires_grad_(False)
        return b


def trajectory_outputs(fast, ref, sched, base_inputs):
    """Run both modules on the same inputs at every step (the reference's own trajectory of timesteps)."""
    outs = []
    for t in sched.timesteps:
        inp = dict(base_inputs, timestep=torch.full_like(base_inputs["timestep"], t))
        outs.append((fast(**inp).sample, ref(**inp).sample))
    return outs


# ------------------------------------------------------------------------------------ gate selection


def test_select_gate_on_synthetic_curve():
    inf = math.inf
    curve = [inf, 0.5, 0.3, 0.2, 0.1, 0.04, 0.06, 0.03, 0.02, 0.01]
    assert select_gate(curve, 0.05) == 7           # step 6 still changes by 0.06: the gate comes after it
    assert select_gate(curve, 0.07) == 5
    assert select_gate(curve, 0.5001) == 1
    assert select_gate(curve, 0.005) == len(curve)  # never converges: never gate
    assert select_gate(curve, 0.07, min_gate=6) == 6
    assert select_gate([inf, 0.2, float("nan"), 0.01], 0.05) == 3   # nan counts as not converged
    bump = [inf] + [0.01] * 10 + [0.2] + [0.01] * 5                  # a late spike pushes the gate past it
    assert select_gate(bump, 0.05) == 12
    with pytest.raises(ValueError, match="tol must be > 0, got 0.0"):
        select_gate(curve, 0.0)


def test_auto_gate_measures_cross_attention_and_builds_the_schedule():
    pipe, model = tiny_pipe()
    kw = dict(prompts=PROMPTS, criterion="attn2_change", tol=0.5, per_step_scaling=False)
    g = auto_gate(pipe, STEPS, **kw)
    assert len(g.curve) == STEPS and math.isinf(g.curve[0]) and all(v >= 0 for v in g.curve[1:])
    assert g.curve == g.attn2_change and len(g.per_block) == STEPS and len(g.per_block[1]) == 2
    assert g.gate_step == select_gate(g.curve, 0.5)
    assert g.timesteps == pipe_timesteps(pipe)
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    # per-step scaling: the same tolerance asked of twice the steps is halved
    g2 = auto_gate(pipe, 2 * STEPS, prompts=PROMPTS, criterion="attn2_change", tol=0.5)
    assert g2.tol == pytest.approx(0.5 * 25 / (2 * STEPS))
    s = schedules.tgate(model, g.timesteps, gate_step=g, sp_interval=1)
    assert s.params["gate_step"] == g.gate_step and s.params["auto_gate"]["curve"][0] is None
    s3 = auto_tgate(pipe, STEPS, sp_interval=1, **kw)
    assert s3.plan == s.plan
    with pytest.raises(ValueError, match="timesteps"):
        schedules.tgate(model, g.timesteps[:-1], gate_step=g)
    with pytest.raises(ValueError, match="to measure the gate on calibration prompts use .*auto_tgate"):
        schedules.tgate(model, g.timesteps, gate_step="auto")


def test_auto_gate_output_criterion_measures_the_gated_samples():
    pipe, model = tiny_pipe()
    full = auto_gate(pipe, STEPS, prompts=PROMPTS, tol=1e-9, full_curve=True)
    errs = full.curve[1:]
    assert full.criterion == "output" and all(e > 0 for e in errs) and len(full.attn2_change) == STEPS
    assert full.gate_step == STEPS                  # nothing is within a zero tolerance: never gate
    tol = sorted(errs)[len(errs) // 2] * 1.0001     # a tolerance half the gates meet
    g = auto_gate(pipe, STEPS, prompts=PROMPTS, tol=tol)
    assert g.gate_step == select_gate(full.curve, tol)
    # the search stops at the first gate over the tolerance; what it measured agrees with the full curve
    measured = [s for s in range(1, STEPS) if not math.isnan(g.curve[s])]
    assert measured == list(range(max(1, g.gate_step - 1), STEPS))
    assert all(g.curve[s] == pytest.approx(full.curve[s], rel=1e-5) for s in measured)


# ------------------------------------------------------------------------------------ CFG collapse


def test_collapse_equals_uncollapsed_on_the_bundled_model():
    bundle = bundled_pixart()
    model = bundle.transformer
    from l2c_kernels.models import sample, timesteps_for

    ts = timesteps_for(bundle, 25, "dpm++")
    sched = schedules.tgate(model, ts, gate_step=15, sp_interval=3, fi_interval=1, warm_up=2)
    assert sum(collapsible_steps(sched)) == 10
    on, off = l2c.compile_schedule(model, sched), l2c.compile_schedule(model, sched, cfg_collapse=False)
    enc, mask = bundle.text_encoder.encode([""] * 3 + ["the digit seven", "a 3", "number five"])
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    base = dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=enc, encoder_attention_mask=mask,
                timestep=torch.zeros(6), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    for s, (a, b) in enumerate(trajectory_outputs(on, off, sched, base)):
        assert rel_err(a, b) < 1e-5, f"step {s}"
    assert on.collapsed_calls == 10 and off.collapsed_calls == 0
    # whole generations through the sampler: same images
    kw = dict(prompts=["the digit seven", "a 3"], steps=25, scheduler="dpm++", cfg=4.0, seed=0, progress=False)
    img_on, img_off = sample(bundle, transformer=on, **kw), sample(bundle, transformer=off, **kw)
    assert rel_err(img_on, img_off) < 1e-5


def test_no_collapse_when_halves_differ_at_any_step():
    m = tiny_pixart(layers=2)
    ts = [951, 851, 751, 651, 551, 451, 351, 251]
    sched = schedules.tgate(m, ts, gate_step=3, sp_interval=1)
    base = cfg_batch(pixart_inputs(batch=4))
    fast, ref = l2c.compile_schedule(m, sched), l2c.compile_schedule(m, sched, cfg_collapse=False)
    for s, t in enumerate(ts):
        inp = dict(base, timestep=torch.full((4,), t))
        if s == 5:  # the halves' latents part ways after two collapsed steps (e.g. an img2img-style edit)
            inp["hidden_states"] = inp["hidden_states"].clone()
            inp["hidden_states"][0] += 0.1
        assert rel_err(fast(**inp).sample, ref(**inp).sample) < 1e-5, f"step {s}"
    assert fast.collapsed_calls == 2  # steps 3 and 4 only; none after the halves differed
    # different timesteps per half: never collapsed
    fast2 = l2c.compile_schedule(m, sched)
    for t in ts:
        inp = dict(base, timestep=torch.tensor([t, t, t - 1, t - 1]))
        fast2.set_step(ts.index(t))
        fast2(**inp)
    assert fast2.collapsed_calls == 0


def test_collapsed_steps_are_their_own_cuda_graphs():
    """Graph keys (logic only, no GPU needed): a collapsed step is captured separately from the same plan
    run on the full batch, with half-batch inputs."""
    m = tiny_pixart(layers=2)
    ts = [951, 851, 751, 651, 551, 451]
    sched = schedules.tgate(m, ts, gate_step=2, sp_interval=1)

    class RecordingGraphs:
        disabled = False

        def __init__(self):
            self.keys = []

        def capture_due(self, generations_run):  # no capture ahead of the steps: each step records its key
            return False

        def run(self, key, args, fn):
            self.keys.append((key, signature(args), args["hidden_states"].shape[0]))
            return fn(args)

        def release(self):
            pass

        def num_graphs(self):
            return len(set((k, s) for k, s, _ in self.keys))

    fast = l2c.compile_schedule(m, sched)
    fast._graphs = RecordingGraphs()
    fast._use_graphs = lambda x: True
    same = cfg_batch(pixart_inputs(batch=4))
    differ = pixart_inputs(batch=4)
    for inputs in (same, differ):
        for t in ts:
            fast(**dict(inputs, timestep=torch.full((4,), t)))
    keys = fast._graphs.keys
    coll = [k for k in keys[:len(ts)] if k[0][2]]
    assert len(coll) == sum(collapsible_steps(sched)) == 4 and all(b == 2 for _, _, b in coll)
    assert not any(k[0][2] for k in keys[len(ts):])            # second generation: halves differ
    plan_key = fast.plans[3].key
    graph_keys = {(k, s) for k, s, _ in keys if k[0] == plan_key}
    assert len(graph_keys) == 2                                # one collapsed graph, one full-batch graph
    assert len({s for _, s in graph_keys}) == 2                # with different (half vs full) input shapes


def test_custom_attention_processors_stay_in_place():
    """A processor set on one attention module keeps being called by the compiled module."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class CountingProcessor(AttnProcessor2_0):
        def __init__(self, scale=1.0):
            super().__init__()
            self.calls, self.scale = 0, scale

        def __call__(self, attn, hidden_states, *args, **kwargs):
            self.calls += 1
            return super().__call__(attn, hidden_states, *args, **kwargs) * self.scale

    m = tiny_pixart(layers=2)
    ts = [951, 851, 751, 651, 551, 451, 351, 251]
    cross, self_ = CountingProcessor(scale=1.5), CountingProcessor()
    m.transformer_blocks[1].attn2.set_processor(cross)
    m.transformer_blocks[0].attn1.set_processor(self_)
    sched = schedules.tgate(m, ts, gate_step=5, sp_interval=2, warm_up=1)
    fast = l2c.compile_schedule(m, sched)
    inputs = cfg_batch(pixart_inputs(batch=4))
    for t in ts:
        fast(**dict(inputs, timestep=torch.full((4,), t)))
    assert cross.calls == 5                                     # every step before the gate
    assert self_.calls == sum(row[0][0] == "C" for row in sched.plan)
    assert fast.collapsed_calls == 3
    # and the processor's effect is in the output: the full schedule equals the original model with it
    full = l2c.compile_schedule(m, l2c.Schedule.full(m, ts))
    inp = dict(inputs, timestep=torch.full((4,), ts[0]))
    assert rel_err(full(**inp).sample, m(**inp).sample) < 1e-5
    m.transformer_blocks[1].attn2.set_processor(AttnProcessor2_0())
    full.reset()
    assert rel_err(full(**inp).sample, m(**inp).sample) < 1e-5


# ---------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("kind", ["alpha", "sigma"])
def test_pixart_pipelines_unchanged_get_the_collapse(kind):
    pipe, model = tiny_pipe(kind)
    ref = run_pipe(pipe)
    ts = pipe_timesteps(pipe)
    sched = schedules.tgate(model, ts, gate_step=3, sp_interval=1)
    pipe.transformer = l2c.compile_schedule(model, sched, cfg_collapse=False)
    off = run_pipe(pipe)
    pipe.transformer = on_module = l2c.compile_schedule(model, sched)
    on = run_pipe(pipe)
    assert on_module.collapsed_calls == STEPS - 3
    assert rel_err(on, off) < 1e-5
    again = run_pipe(pipe)  # a second generation restarts the schedule
    assert rel_err(again, on) < 1e-6 and on_module.collapsed_calls == 2 * (STEPS - 3)
    # the same schedule on the unmodified model by hooks (CFG-mean cross-attention cache): equal up to the fp32
    # rounding of the fused residual adds (measured relative error 3.5e-7, the all-compute module vs the
    # original 3.5e-7 too; bound 5e-6), while the gate itself moves the latents by 9.8e-5 (this tiny model's
    # cross-attention is weak), so a wrong cache fails
    pipe.transformer = HookTransformer(model, sched)
    hooked = run_pipe(pipe)
    assert rel_err(on, hooked) < 5e-6
    assert rel_err(on, ref) > 5e-5
    pipe.transformer = l2c.compile_schedule(model, l2c.Schedule.full(model, ts))
    assert rel_err(run_pipe(pipe), ref) < 1e-5


def test_schedule_reproduces_the_authors_package():
    """Where the official ``tgate`` package is installed: our schedule with CFG collapse gives its images."""
    tgate = pytest.importorskip("tgate")
    steps = 8
    kw = dict(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1)
    pipe, model = tiny_pipe()
    sched = schedules.tgate(model, pipe_timesteps(pipe, steps), **kw)
    pipe.transformer = fast = l2c.compile_schedule(model, sched)
    ours = run_pipe(pipe, steps)
    assert fast.collapsed_calls == steps - 4
    official_pipe, _ = tiny_pipe()   # the package patches the attention modules it runs: use its own copy
    official_pipe = tgate.TgatePixArtAlphaLoader(official_pipe)
    official = official_pipe.tgate(PROMPTS, num_inference_steps=steps, guidance_scale=4.0, use_resolution_binning=False,
                                    max_sequence_length=8, height=8, width=8, clean_caption=False,
                                    generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    assert rel_err(ours, official) < 1e-5
