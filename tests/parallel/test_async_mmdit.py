"""AsyncDenoiser on the joint-attention transformers: Flux (double blocks, then single blocks) and SD3.

Checked against an independent reference of asynchronous denoising written below in plain PyTorch
(``AsyncMMDiTReference``): it calls the model's embedders, blocks and output layers itself, in the order
the diffusers forwards do, and at every asynchronous step runs component ``k`` on what component ``k-1``
produced at the previous step (both token streams), as the AsyncDiff paper defines it. Nothing of
``l2c_kernels.parallel`` (no hooks, no stand-in forwards) is used by it.

The 2-process runs (gloo on CPU, spawned once for the module) sample the tiny Flux.1-dev transformer
(guidance embedding) and the bundled flux-digits model (``sampling.sample``, CFG batch).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from l2c_kernels import parallel
from l2c_kernels.parallel import Split, UnsplittableModelError
from tests.family_configs import FAMILIES
from tests.tiny_models import StandIn

from .helpers import psnr, raise_failures, run_ranks

FP32_EPS = torch.finfo(torch.float32).eps


# ====================================================================== the independent reference
def _flux_parts(model, kw: dict):
    """Flux's forward written out: the streams entering the first block, the blocks in the order the forward runs
    them (double, then single), and the output layer. Every block takes and returns (text, image) streams."""
    x = model.x_embedder(kw["hidden_states"])
    t = kw["timestep"].to(x.dtype) * 1000
    g = kw.get("guidance")
    pooled = kw["pooled_projections"]
    temb = (model.time_text_embed(t, pooled) if g is None
            else model.time_text_embed(t, g.to(x.dtype) * 1000, pooled))
    enc = model.context_embedder(kw["encoder_hidden_states"])
    rope = model.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]], 0))
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)

    def run(i, e, h):
        return blocks[i](hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)

    def final(e, h):
        return model.proj_out(model.norm_out(h, temb))

    return (enc, x), len(blocks), run, final


def _sd3_parts(model, kw: dict):
    """SD3's forward written out (the last block returns no text stream)."""
    hs = kw["hidden_states"]
    height, width = hs.shape[-2:]
    x = model.pos_embed(hs).contiguous()
    temb = model.time_text_embed(kw["timestep"], kw["pooled_projections"])
    enc = model.context_embedder(kw["encoder_hidden_states"])
    blocks = list(model.transformer_blocks)

    def run(i, e, h):
        return blocks[i](hidden_states=h, encoder_hidden_states=e, temb=temb, joint_attention_kwargs=None)

    def final(e, h):
        h = model.proj_out(model.norm_out(h, temb))
        p, c = model.config.patch_size, model.out_channels
        h = h.reshape(h.shape[0], height // p, width // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, height, width)

    return (enc, x), len(blocks), run, final


PARTS = {"FluxTransformer2DModel": _flux_parts, "SD3Transformer2DModel": _sd3_parts}


class AsyncMMDiTReference(StandIn):
    """Asynchronous denoising of a Flux / SD3 transformer cut into ``ranges`` (contiguous block runs, forward order).

    Steps ``< warm_up`` run every block in turn. Later steps (stride 1): component 0 runs on this step's embedded
    latents, component k >= 1 on the (text, image) streams component k-1 produced at the *previous* step; the
    output layer takes the last component's output. Stride 2 (N components, one extra device): the steps after the
    warm-up go in pairs (s, s+1); the prediction for s is the last component run on its stale input, conditioned on
    t_s; components 0..N-1 conditioned on t_{s+1} (component 0 on the latents of step s) give the prediction for
    s+1 and the next stale inputs. ``timesteps``: the values the sampler passes to the transformer (checked), or
    (stride 1) just the number of steps.
    """

    def __init__(self, model, ranges, timesteps, warm_up: int, stride: int = 1):
        super().__init__()
        self.model, self.ranges = model, [tuple(r) for r in ranges]
        self.timesteps = [float(t) for t in timesteps] if not isinstance(timesteps, int) else [None] * timesteps
        self.warm_up, self.stride = warm_up, stride
        self.parts = PARTS[type(model).__name__]
        self.reset()

    def reset(self):
        self.calls, self.stale, self.pending = 0, None, None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def _components(self, kw, inputs):
        """Run every component on its input (``inputs[k]``: None = the embedded latents); their outputs."""
        start, nblocks, run, final = self.parts(self.model, kw)
        outs = []
        for k, (a, b) in enumerate(self.ranges):
            e, h = start if inputs[k] is None else inputs[k]
            for i in range(a, b):
                e, h = run(i, e, h)
            outs.append(final(e, h) if b == nblocks else (e, h))
        return outs

    def _sequential(self, kw):
        start, nblocks, run, final = self.parts(self.model, kw)
        e, h = start
        stale = []
        for k, (a, b) in enumerate(self.ranges):
            if k:
                stale.append((e.clone(), h.clone()))
            for i in range(a, b):
                e, h = run(i, e, h)
        return final(e, h), stale

    def forward(self, hidden_states, timestep, return_dict: bool = True, **kw):
        steps = len(self.timesteps)
        step = self.calls % steps
        self.calls += 1
        if self.timesteps[step] is not None:
            assert abs(float(timestep.reshape(-1)[0]) - self.timesteps[step]) < 1e-6, (step, timestep)
        kw = dict(kw, hidden_states=hidden_states, timestep=timestep)
        n = len(self.ranges)
        with torch.no_grad():
            if step < self.warm_up:
                out, self.stale = self._sequential(kw)
            elif self.stride == 1:
                outs = self._components(kw, [None] + self.stale)
                out, self.stale = outs[-1], outs[:-1]
            elif (step - self.warm_up) % 2 == 1:
                out = self.pending
            else:
                out = self._components(kw, [None] * (n - 1) + [self.stale[-1]])[-1]  # last component at t_s
                ahead = dict(kw, timestep=torch.full_like(timestep, self.timesteps[min(step + 1, steps - 1)]))
                outs = self._components(ahead, [None] + self.stale)
                self.pending, self.stale = outs[-1], outs[:-1]
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


# ====================================================================== models and sampling (also used by the ranks)
_MODELS: dict = {}


def model_for(spec: dict):
    name = spec["model"]
    if name not in _MODELS:
        if name == "flux-digits":
            from l2c_kernels import models

            _MODELS[name] = models.load("flux-digits")
        else:
            _MODELS[name] = FAMILIES[name].build(seed=0)
    return _MODELS[name]


def transformer_of(spec: dict):
    m = model_for(spec)
    return m.transformer if spec["model"] == "flux-digits" else m


def model_timesteps(spec: dict) -> list[float]:
    """What the sampler passes to the transformer at each step (Flux: t / 1000; SD3: t)."""
    steps = spec["steps"]
    if spec["model"] == "flux-digits":
        from l2c_kernels.models import flux_digits

        return [float(torch.tensor(t / 1000, dtype=torch.float32)) for t in
                flux_digits.timesteps_for(model_for(spec), steps)]
    fam = FAMILIES[spec["model"]]
    return [float(torch.tensor(fam.to_model_t(s * 1000), dtype=torch.float32)) for s in _sigmas(steps)[:-1]]


def sampler_timesteps(spec: dict) -> list[float]:
    if spec["model"] == "flux-digits":
        from l2c_kernels.models import flux_digits

        return flux_digits.timesteps_for(model_for(spec), spec["steps"])
    return [s * 1000 for s in _sigmas(spec["steps"])[:-1]]


def _sigmas(steps: int) -> list[float]:
    return torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]


def sample(spec: dict, transformer) -> torch.Tensor:
    """Euler flow matching (sigmas 1 .. 1/steps, as FluxPipeline) for a family config; ``models.sample`` (CFG
    batch) for flux-digits. Returns the final latents / images."""
    if hasattr(transformer, "reset"):
        transformer.reset()
    if spec["model"] == "flux-digits":
        from l2c_kernels import models

        return models.sample(model_for(spec), labels=spec["labels"], steps=spec["steps"], seed=spec.get("seed", 0),
                             transformer=transformer, progress=False)
    fam = FAMILIES[spec["model"]]
    b, seed = spec.get("batch", 2), spec.get("seed", 0)
    x, cond = fam.latents(b, seed), fam.inputs(b, seed)
    sig = _sigmas(spec["steps"])
    with torch.no_grad():
        for i in range(spec["steps"]):
            v = transformer(**fam.call_kwargs(x, sig[i] * 1000, cond))[0]
            x = x + (sig[i + 1] - sig[i]) * v
    return x


def cache_schedule(model, level: str, steps: int):
    """A schedule whose first two steps compute everything and whose blocks (``level="block"``) or units
    (``"branch"``) later compute on shifted cycles, some reused at every asynchronous step."""
    import l2c_kernels as l2c
    from l2c_kernels.adapters.mmdit_branches import branch_names

    ts = [s * 1000 for s in _sigmas(steps)[:-1]]
    names = ["block"] if level == "block" else branch_names(model)
    nb = l2c.Schedule.full(model, ts[:2], branches=names).num_blocks
    mask = [[[s < 2 or (s + b + u) % 3 == 0 for u in range(len(names))] for b in range(nb)] for s in range(steps)]
    if level == "block":
        mask = [[row[0] for row in step] for step in mask]
    return l2c.Schedule.from_mask(model, ts, mask, branches=names)


def denoiser(spec: dict, **kw):
    """AsyncDenoiser of the spec's model, or (``spec["schedule"]``: a level) of its compile_schedule module."""
    args = dict(num_components=spec["N"], warm_up=spec["warm_up"], stride=spec.get("stride", 1),
                balance=spec.get("balance", "measure"), timeout_s=60)
    if spec.get("stride", 1) > 1:
        args["timesteps"] = sampler_timesteps(spec)
    args.update(kw)
    model = transformer_of(spec)
    if spec.get("schedule"):
        import l2c_kernels as l2c

        model = l2c.compile_schedule(model, cache_schedule(model, spec["schedule"], spec["steps"]), cuda_graphs=False)
    return parallel.AsyncDenoiser(model, **args)


def rank_worker(rank: int, world: int, scenarios: dict) -> dict:
    out = {}
    for name, spec in scenarios.items():
        ad = denoiser(spec)
        out[name] = dict(images=sample(spec, ad), describe=ad.describe(), rounds=len(ad.timings["compute"]),
                         comm_calls=ad.comm.calls)
    return out


@contextlib.contextmanager
def one_thread():
    """The ranks run on one thread each; the in-process comparisons do the same."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def emulated(spec: dict, ranges) -> torch.Tensor:
    ad = denoiser(spec, emulate=True, balance=Split([tuple(r) for r in ranges], [1.0] * ranges[-1][1], "given"))
    return sample(spec, ad)


def reference(spec: dict, ranges) -> torch.Tensor:
    ref = AsyncMMDiTReference(transformer_of(spec), ranges, model_timesteps(spec), spec["warm_up"],
                              spec.get("stride", 1))
    return sample(spec, ref)


def fp32_atol(x: torch.Tensor, steps: int) -> float:
    """Two computations of the same fp32 operations in the same order agree bit for bit; the bound allows the
    last-bit differences a different matmul kernel choice could make: 4 ulps of the largest value per step."""
    return 4 * FP32_EPS * float(x.abs().max()) * steps


# ====================================================================== 2 processes (gloo)
FLUX_DEV = dict(model="flux-dev", N=2, warm_up=2, steps=8, batch=2)
DIGITS = dict(model="flux-digits", N=2, warm_up=3, steps=10, labels=[0, 1, 2, 3])
TWO = {"flux-dev": FLUX_DEV, "flux-digits": DIGITS, "flux-digits-exact": dict(DIGITS, warm_up=4, steps=4),
       "flux-dev-blocks": dict(FLUX_DEV, schedule="block")}
# PSNR of the 2-process flux-digits images (10 Euler steps, 3 exact warm-up steps, CFG 7) against full compute.
# The split is measured, so it moves with the machine's load: emulated with every cut from 1+7 to 7+1 blocks it
# measured 23.10-24.25 dB (23.45 at 4+4); the floor is the lowest less 0.5 dB.
DIGITS_PSNR_FLOOR_DB = 22.6


@pytest.fixture(scope="module")
def two():
    res = run_ranks(rank_worker, 2, TWO, deadline_s=420)
    raise_failures(res)
    return {r: v["value"] for r, v in res.items()}


def _rank_images(two, name):
    ims = [two[r][name]["images"] for r in sorted(two)]
    for r, im in enumerate(ims[1:], 1):
        assert torch.equal(im, ims[0]), f"rank {r} returned other images than rank 0"
    return ims[0]


@pytest.mark.parametrize("name", ["flux-dev", "flux-digits"])
def test_two_processes_match_emulation_and_the_independent_reference(two, name):
    spec = TWO[name]
    got = _rank_images(two, name)
    ranges = two[0][name]["describe"]["split"]["ranges"]
    with one_thread():
        emu, ref, full = emulated(spec, ranges), reference(spec, ranges), sample(spec, transformer_of(spec))
    atol = fp32_atol(ref, spec["steps"])
    torch.testing.assert_close(got, emu, rtol=0, atol=atol)
    torch.testing.assert_close(got, ref, rtol=0, atol=atol)
    assert not torch.equal(got, full)  # the asynchronous steps ran
    if name == "flux-digits":
        db = psnr(got, full)
        print(f"\nflux-digits, 2 processes: {db:.2f} dB against full compute, split {ranges}")
        assert db >= DIGITS_PSNR_FLOOR_DB
        # still the same digits: the bundled classifier reads them as it reads the full-compute images
        from l2c_kernels.models.classifier import predict_digits

        assert torch.equal(predict_digits(got), predict_digits(full))


def test_two_processes_with_a_block_level_schedule_match_emulation(two):
    """Each process runs its component with the schedule on its own caches: the images equal the emulation (which
    ``test_async_cached_blocks.py`` checks against the composed independent references)."""
    spec = TWO["flux-dev-blocks"]
    got = _rank_images(two, "flux-dev-blocks")
    ranges = two[0]["flux-dev-blocks"]["describe"]["split"]["ranges"]
    with one_thread():
        emu = emulated(spec, ranges)
        plain = emulated(dict(spec, schedule=None), ranges)
    torch.testing.assert_close(got, emu, rtol=0, atol=fp32_atol(emu, spec["steps"]))
    assert not torch.equal(got, plain)  # the schedule's reuse ran in the processes


def test_two_processes_warm_up_only_is_the_model(two):
    spec = TWO["flux-digits-exact"]
    got = _rank_images(two, "flux-digits-exact")
    with one_thread():
        full = sample(spec, transformer_of(spec))
    torch.testing.assert_close(got, full, rtol=0, atol=fp32_atol(full, spec["steps"]))


def test_split_runs_double_and_single_blocks_together(two):
    d = two[0]["flux-digits"]["describe"]
    assert d["block_labels"] == [f"transformer_blocks[{i}]" for i in range(2)] + [
        f"single_transformer_blocks[{i}]" for i in range(6)]
    split = d["split"]
    assert split["method"] == "measure" and len(split["block_costs"]) == 8 and min(split["block_costs"]) > 0
    assert all(two[r]["flux-digits"]["describe"]["split"] == split for r in two)  # the same cut on every rank
    # the cut is the best of the (rank-averaged) measured costs, the final layer counted in the last block
    costs = split["block_costs"]
    best = min(max(sum(costs[:c]), sum(costs[c:])) for c in range(1, 8))
    assert max(split["component_costs"]) == pytest.approx(best, rel=1e-12)
    # one collective per asynchronous step (the two-stream state travels in one message)
    steps, warm = DIGITS["steps"], DIGITS["warm_up"]
    assert two[0]["flux-digits"]["rounds"] == steps - warm


# ====================================================================== one process: SD3 / Flux variants, stride 2
@pytest.mark.parametrize("family,N,stride", [("flux-schnell", 2, 1), ("flux-dev", 3, 1), ("flux-dev", 2, 2),
                                             ("sd3-medium", 2, 1), ("sd3.5-medium", 2, 1)])
def test_emulation_matches_the_independent_reference(family, N, stride):
    spec = dict(model=family, N=N, warm_up=2, steps=7, batch=2, stride=stride, balance="uniform")
    with one_thread():
        ad = denoiser(spec, emulate=True)
        got = sample(spec, ad)
        ranges = ad.component_ranges
        ref = reference(spec, ranges)
        full = sample(spec, transformer_of(spec))
    torch.testing.assert_close(got, ref, rtol=0, atol=fp32_atol(ref, spec["steps"]))
    assert not torch.equal(got, full)


def test_inside_an_unchanged_flux_pipeline():
    """``pipe.transformer = AsyncDenoiser(...)`` in diffusers' FluxPipeline (packed latents, RoPE ids, guidance
    embedding, dynamic shift, ``cache_context``): the latents equal the reference's in the same pipeline."""
    from tests.tiny_pipelines import run_pipeline, tiny_flux_pipeline

    steps = 5
    pipe = tiny_flux_pipeline(layers=2, single_layers=2)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    with one_thread():
        full = run_pipeline(pipe, "flux", steps=steps)
        pipe.transformer = parallel.AsyncDenoiser(model, num_components=2, warm_up=2, emulate=True)
        got = run_pipeline(pipe, "flux", steps=steps)
        ranges = pipe.transformer.component_ranges
        pipe.transformer = AsyncMMDiTReference(model, ranges, steps, warm_up=2)
        ref = run_pipeline(pipe, "flux", steps=steps)
    torch.testing.assert_close(got, ref, rtol=0, atol=fp32_atol(ref, steps))
    assert not torch.equal(got, full)


def test_measured_split_on_the_first_call():
    """Flux has no built-in sample input: the blocks are timed on the first call's own inputs."""
    spec = dict(model="flux-dev", N=2, warm_up=1, steps=3)
    ad = denoiser(spec, emulate=True)
    assert ad.split is None and ad.describe()["split"] is None
    with pytest.raises(parallel.AsyncDiffError, match="first call"):
        ad.component_ranges
    sample(spec, ad)
    costs = ad.block_costs
    assert ad.split.method == "measure" and len(costs) == 4 and min(costs) > 0
    # the cut is the best of the recorded costs (timings vary with load; what is done with them does not)
    assert max(ad.component_costs) == pytest.approx(min(max(sum(costs[:c]), sum(costs[c:])) for c in range(1, 4)),
                                                    rel=1e-12)


# ====================================================================== what cannot be split
def test_unsplittable_models_are_refused_naming_what_did_not_match():
    flux = transformer_of(dict(model="flux-schnell"))
    # a block of another kind in the block list
    import copy

    odd = copy.copy(flux)
    odd._modules = dict(flux._modules, single_transformer_blocks=torch.nn.ModuleList(
        [flux.single_transformer_blocks[0], torch.nn.Linear(2, 2)]))
    with pytest.raises(UnsplittableModelError, match=r"single_transformer_blocks\[1\] is a Linear"):
        parallel.AsyncDenoiser(odd, num_components=2, emulate=True, balance="uniform")
    # a model outside the pattern table
    with pytest.raises(UnsplittableModelError, match="cannot split Sequential"):
        parallel.AsyncDenoiser(torch.nn.Sequential(torch.nn.Linear(2, 2)), num_components=2, emulate=True)


def test_refused_family_names_the_reason():
    from diffusers import HunyuanDiT2DModel

    m = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
                          num_layers=2, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8,
                          text_len=4, text_len_t5=4)
    with pytest.raises(UnsplittableModelError, match="cannot split HunyuanDiT2DModel.*long skip connections"):
        parallel.AsyncDenoiser(m, num_components=2, emulate=True)


def test_a_forward_that_skips_a_boundary_block_is_refused():
    """SD3's skip_layers leaves a block out of the forward: a component starting there has nothing to start on."""
    spec = dict(model="sd3-medium", N=2, warm_up=1, steps=3, balance="uniform")
    fam = FAMILIES["sd3-medium"]
    ad = denoiser(spec, emulate=True)
    x, cond = fam.latents(2, 0), fam.inputs(2, 0)
    with pytest.raises(UnsplittableModelError, match=r"did not call transformer_blocks\[1\]"):
        ad(**fam.call_kwargs(x, 1000.0, dict(cond, skip_layers=[1])))


def test_a_wrapper_other_than_compile_schedule_is_refused_with_the_way_out():
    """Block-level modules of compile_schedule are split (``test_async_cached_blocks.py``); another module wrapping a
    transformer is refused, naming the way out."""
    flux = transformer_of(dict(model="flux-schnell"))

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.original_model = m

    with pytest.raises(TypeError, match="wrapping one: pass its original_model"):
        parallel.AsyncDenoiser(Wrapper(flux), num_components=2, emulate=True, balance="uniform")
