"""Functions run inside the spawned ranks of the AsyncDenoiser tests (importable by spawn).

A scenario is a dict: the model (``"dit-digits"``, ``"tiny-dit"``, ``"tiny-pixart"``), an optional
cache schedule to compose with, the AsyncDenoiser settings (``N``, ``stride``, ``warm_up``,
``balance``) and the sampling settings (``steps``, ``batch``, ``seed``). The same functions
compute the single-process references in the test process.
"""
from __future__ import annotations

import os
import time

import torch

from .helpers import ddim

# the bundled models' noise schedule (linear betas, epsilon prediction)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", clip_sample=True)

_MODELS: dict = {}


def base_model(spec: dict):
    """(plain diffusers transformer, kind, scheduler_config); loaded once per process."""
    name = spec["model"]
    key = (name, spec.get("layers", 6))
    if key not in _MODELS:
        if name == "dit-digits":
            from l2c_kernels import models

            b = models.load("dit-digits")
            _MODELS[key] = (b.transformer, "dit", b.scheduler_config)
        elif name.startswith("tiny-"):
            from tests.tiny_models import tiny_dit, tiny_pixart

            kind = name.split("-")[1]
            _MODELS[key] = ((tiny_dit if kind == "dit" else tiny_pixart)(layers=key[1]), kind, SCHEDULE)
        else:
            raise ValueError(name)
    return _MODELS[key]


def build(spec: dict):
    """(transformer, kind, scheduler_config) for a scenario: the plain model, or a fresh
    ``compile_schedule`` module around it when the scenario names a cache schedule."""
    model, kind, sc = base_model(spec)
    if spec.get("perturb_weights") or spec.get("dtype"):  # a rank started with other weights or another dtype
        import copy

        model = copy.deepcopy(model)
        if spec.get("perturb_weights"):  # two weights swapped: same values, same sum, another model
            with torch.no_grad():
                w = next(p for p in model.parameters() if p.numel() > 1 and p.reshape(-1)[0] != p.reshape(-1)[1])
                w.view(-1)[:2] = w.view(-1)[:2].flip(0).clone()
        if spec.get("dtype"):
            model = model.to(getattr(torch, spec["dtype"]))
    if spec.get("schedule"):
        import l2c_kernels as l2c
        from l2c_kernels import schedules

        method, arg = spec["schedule"]
        ts = timesteps(sc, spec["steps"])
        sched = schedules.uniform(model, ts, arg) if method == "uniform" else schedules.deepcache(model, ts, arg)
        model = l2c.compile_schedule(model, sched, cuda_graphs=False)
    return model, kind, sc


def timesteps(scheduler_config: dict, steps: int) -> list[int]:
    s = ddim(scheduler_config)
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


def cond_inputs(model, kind: str, batch: int, cfg: float):
    """Per-call conditioning kwargs for a CFG batch (conditional half first)."""
    g = torch.Generator().manual_seed(123)
    if kind == "dit":
        labels = torch.arange(batch) % 10
        lab = torch.cat([labels, torch.full_like(labels, 1000)]) if cfg > 1 else labels
        return dict(class_labels=lab)
    inner = getattr(model, "original_model", model)
    enc = torch.randn(batch, 5, inner.config.caption_channels, generator=g)
    enc = torch.cat([enc, torch.zeros_like(enc)]) if cfg > 1 else enc
    return dict(encoder_hidden_states=enc, encoder_attention_mask=torch.ones(enc.shape[0], 5),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sample(transformer, kind: str, scheduler_config: dict, steps: int, batch: int = 4, cfg: float = 1.5,
           seed: int = 0, on_call=None):
    """DDIM with classifier-free guidance, as the diffusers pipelines do it; returns the final latents."""
    inner = getattr(transformer, "original_model", transformer)
    inner = getattr(inner, "original_model", inner)
    cfgm = inner.config
    sched = ddim(scheduler_config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfgm.in_channels, cfgm.sample_size, cfgm.sample_size, generator=g)
    cond = cond_inputs(inner, kind, batch, cfg)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            if on_call is not None:
                on_call(i)
            inp = torch.cat([x, x]) if cfg > 1 else x
            eps = transformer(inp, timestep=t.expand(inp.shape[0]), **cond).sample
            eps = eps[:, : cfgm.in_channels]
            if cfg > 1:
                c, u = eps.chunk(2)
                eps = u + cfg * (c - u)
            x = sched.step(eps, t, x).prev_sample
    return x


def denoiser(model, spec: dict, sc: dict):
    from l2c_kernels import parallel

    kw = dict(num_components=spec["N"], stride=spec.get("stride", 1), warm_up=spec["warm_up"],
              timeout_s=spec.get("timeout_s", 30), balance=spec.get("balance", "uniform"),
              emulate=spec.get("emulate", False))
    if spec.get("pass_timesteps"):
        kw["timesteps"] = timesteps(sc, spec["steps"])
    return parallel.AsyncDenoiser(model, **kw)


def reference(spec: dict) -> torch.Tensor:
    """Single-process output of a scenario: the plain model (or the plain ``compile_schedule`` module)."""
    model, kind, sc = build(spec)
    return sample(model, kind, sc, spec["steps"], batch=spec.get("batch", 4), seed=spec.get("seed", 0))


def emulated(spec: dict) -> torch.Tensor:
    """The asynchronous schedule of all ranks computed in this process."""
    model, kind, sc = build(spec)
    ad = denoiser(model, dict(spec, emulate=True), sc)
    return sample(ad, kind, sc, spec["steps"], batch=spec.get("batch", 4), seed=spec.get("seed", 0))


def async_reference(spec: dict, ranges) -> torch.Tensor:
    """The scenario sampled with the independent reference of asynchronous denoising
    (``tests/parallel/async_reference.py``) on the plain model, cut into ``ranges``."""
    from .async_reference import AsyncReference

    model, kind, sc = build(spec)
    base, _, _ = base_model(spec)
    ref = AsyncReference(base, ranges, timesteps(sc, spec["steps"]), spec["warm_up"], spec.get("stride", 1),
                         getattr(model, "schedule", None))
    return sample(ref, kind, sc, spec["steps"], batch=spec.get("batch", 4), seed=spec.get("seed", 0))


def pipeline_sample(transformer, spec: dict) -> torch.Tensor:
    """Images from an unmodified diffusers ``DiTPipeline`` whose transformer is ``transformer``."""
    from diffusers import DiTPipeline

    from l2c_kernels.models.pipelines import IdentityVAE

    _, _, sc = base_model(spec)
    pipe = DiTPipeline(transformer=transformer, vae=IdentityVAE(1), scheduler=ddim(sc))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=list(range(spec.get("batch", 4))), guidance_scale=1.5, num_inference_steps=spec["steps"],
               generator=torch.Generator().manual_seed(spec.get("seed", 0)), output_type="np").images
    return torch.from_numpy(out)


def pipeline_reference(spec: dict, async_ranges=None) -> torch.Tensor:
    """The pipeline's images with the plain model, or (``async_ranges``) with the independent reference
    of asynchronous denoising on that split."""
    model, _, sc = build(spec)
    if async_ranges is not None:
        from .async_reference import AsyncReference

        model = AsyncReference(model, async_ranges, timesteps(sc, spec["steps"]), spec["warm_up"],
                               spec.get("stride", 1))
    return pipeline_sample(model, spec)


# ---------------------------------------------------------------------------- inside the ranks
def run_scenario(rank: int, spec: dict) -> dict:
    from l2c_kernels.parallel import AsyncDiffError

    spec = dict(spec, **spec.get("per_rank", {}).get(rank, {}))
    model, kind, sc = build(spec)
    t0 = time.perf_counter()
    try:
        ad = denoiser(model, spec, sc)
        if spec.get("pipeline"):
            images = [pipeline_sample(ad, spec)]
        else:  # repeats: a second generation must start cleanly
            images = [sample(ad, kind, sc, spec["steps"], batch=spec.get("batch", 4), seed=spec.get("seed", 0))
                      for _ in range(spec.get("repeats", 1))]
    except AsyncDiffError as exc:
        return dict(raised=type(exc).__name__, message=str(exc), after_s=time.perf_counter() - t0)
    compute = ad.timings["compute"]
    return dict(raised=None, images=images, describe=ad.describe(), comm_calls=ad.comm.calls if ad.comm else 0,
                rounds=len(compute))


def session_worker(rank: int, world: int, scenarios: dict) -> dict:
    """Every scenario in turn on the same process group; ``{name: result}``."""
    return {name: run_scenario(rank, spec) for name, spec in scenarios.items()}


def failing_worker(rank: int, world: int, spec: dict):
    """Rank ``spec['victim']`` dies (or hangs) at call ``spec['at']``; the others report what they raised."""
    from l2c_kernels.parallel import AsyncDiffError

    model, kind, sc = build(spec)
    ad = denoiser(model, spec, sc)
    state = {"t": time.perf_counter()}

    def on_call(i):
        if rank == spec["victim"] and i == spec["at"]:
            if spec["mode"] == "die":
                os._exit(1)
            time.sleep(spec.get("hang_s", 120))
        state["t"] = time.perf_counter()

    try:
        sample(ad, kind, sc, spec["steps"], batch=2, on_call=on_call)
    except AsyncDiffError as exc:
        return dict(raised=type(exc).__name__, message=str(exc), after_s=time.perf_counter() - state["t"])
    return dict(raised=None)
