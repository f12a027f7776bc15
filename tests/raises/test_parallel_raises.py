"""Every user-facing refusal of ``l2c_kernels.parallel`` (AsyncDiff), triggered through the entry a user calls:
``AsyncDenoiser`` (in one process with ``emulate=True``, or on spawned ranks joined by a gloo group with a file
rendezvous) and the exported helpers (``balanced_split``, ``measure_block_costs``, ``BlockStreams``), on tiny
models built from configs.

Each case names the exact exception type and literal parts of the message, in order: the first part is text of the
``raise`` itself (the f-string's literal text), the others add the values this call puts in.
"""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

import l2c_kernels as l2c
from l2c_kernels import parallel
from l2c_kernels.adapters import patterns
from l2c_kernels.parallel import AsyncDiffError, BlockStreams, Split, UnsplittableModelError
from tests.tiny_models import dit_inputs, tiny_dit

DIT_LAYERS = 4


def expect(fn, exc, parts):
    """``fn()`` raises exactly ``exc`` whose message holds ``parts`` (literal text) in this order."""
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    with pytest.raises(exc, match=_pattern(parts)) as info:
        fn()
    assert type(info.value) is exc, f"raised {type(info.value).__name__}: {info.value}"
    return info.value


def _pattern(parts) -> str:
    return "(?s)" + ".*".join(re.escape(p) for p in parts)


# ------------------------------------------------------------------------------------------ tiny models
def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)   # the same weights on every rank (the ranks check that they agree)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).eval()


def sd3_inputs(t=1000.0, skip_layers=None):
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([float(t)]))
    if skip_layers is not None:
        args["skip_layers"] = skip_layers   # SD3's forward leaves these blocks out
    return args


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=[4, 6, 6]).eval()


def flux_block_args():
    """Keyword arguments of a call of Flux's first (double-stream) block."""
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 32, generator=g), encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                temb=torch.randn(1, 32, generator=g))


def emulated(model, **kw):
    kw = dict(dict(num_components=2, warm_up=1, emulate=True, balance="uniform"), **kw)
    return parallel.AsyncDenoiser(model, **kw)


def calls(ad, *inputs):
    """Call ``ad`` once per keyword set, in order (the sampler's steps)."""
    def run():
        with torch.no_grad():
            for a in inputs:
                ad(**a)
    return run


def given_split(ranges):
    return Split(list(ranges), [1.0] * DIT_LAYERS, "given")


def _cached_dit(timesteps):
    dit = tiny_dit(layers=DIT_LAYERS)
    return l2c.compile_schedule(dit, l2c.Schedule.full(dit, timesteps), cuda_graphs=False)


def _flux_with_a_linear_block():
    flux = tiny_flux()
    flux.single_transformer_blocks[0] = nn.Linear(2, 2)
    return flux


def _tiny_hunyuan_dit():
    from diffusers import HunyuanDiT2DModel

    return HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
                             num_layers=2, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8,
                             text_len=4, text_len_t5=4)


# ------------------------------------------------------------------------------------------ AsyncDenoiser's settings
SETTINGS_CASES = {
    "a given split of another component count": (
        lambda: emulated(tiny_dit(layers=DIT_LAYERS), balance=given_split([(0, DIT_LAYERS)])),
        ValueError, ("the given split ", "[(0, 4)] does not cut 4 blocks into 2 components")),
    "an unknown balance": (
        lambda: emulated(tiny_dit(layers=DIT_LAYERS), balance="fastest"),
        ValueError, ("balance must be 'measure', 'uniform' or a list of ", "4 block costs; got 'fastest'")),
    "block costs of another length": (
        lambda: emulated(tiny_dit(layers=DIT_LAYERS), balance=[1.0, 2.0]),
        ValueError, ("balance has ", "2 costs for 4 blocks")),
    "a negative block cost": (
        lambda: emulated(tiny_dit(layers=DIT_LAYERS), balance=[1.0, -1.0, 1.0, 1.0]),
        ValueError, "block costs must be non-negative"),
    "balanced_split into more components than blocks": (
        lambda: parallel.balanced_split([1.0, 1.0], 3),
        ValueError, ("cannot split ", "2 blocks into 3 non-empty components")),
    "uniform_split into no component": (
        lambda: parallel.uniform_split(4, 0),
        ValueError, ("cannot split ", "4 blocks into 0 non-empty components")),
    "measure_block_costs without sample inputs for Flux": (
        lambda: parallel.measure_block_costs(tiny_flux()),
        TypeError, ("no built-in sample input for ", "FluxTransformer2DModel; pass sample_inputs=dict(...) (the "
                                                        "forward's keyword arguments) or balance='uniform'")),
    "example_inputs for SD3": (
        lambda: parallel.example_inputs(tiny_sd3()),
        TypeError, ("no built-in sample input for ", "SD3Transformer2DModel; pass sample_inputs=")),
    "blocks timed on sample inputs whose forward skips one": (
        lambda: emulated(tiny_sd3(), balance="measure", sample_inputs=sd3_inputs(skip_layers=[1])),
        UnsplittableModelError, ("AsyncDenoiser cannot time ", "SD3Transformer2DModel's blocks: its forward did not "
                                                               "call transformer_blocks[1]")),
}


@pytest.mark.parametrize("case", list(SETTINGS_CASES))
def test_settings_refused(case):
    fn, exc, parts = SETTINGS_CASES[case]
    expect(fn, exc, parts)


# ------------------------------------------------------------------------------------------ models it cannot split
SPLIT_CASES = {
    "a family refused by name": (
        lambda: emulated(_tiny_hunyuan_dit()),
        UnsplittableModelError, ("AsyncDenoiser cannot split ", "HunyuanDiT2DModel into components: ",
                                 "long skip connections")),
    "a model outside the pattern table": (
        lambda: emulated(nn.Sequential(nn.Linear(2, 2))),
        UnsplittableModelError, ("AsyncDenoiser cannot split ", "Sequential into components: ",
                                 "is not in the block pattern table")),
    "a block of another class in a block list": (
        lambda: emulated(_flux_with_a_linear_block()),
        UnsplittableModelError, ("AsyncDenoiser cannot split ", "FluxTransformer2DModel into components: ",
                                 "single_transformer_blocks[0] is a Linear")),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_unsplittable_models_refused(case):
    fn, exc, parts = SPLIT_CASES[case]
    expect(fn, exc, parts)


# ------------------------------------------------------------------------------------------ calls in one process
def _no_warm_up_in_this_generation():
    ad = emulated(tiny_dit(layers=DIT_LAYERS))
    ad.set_step(2)
    calls(ad, dit_inputs(t=500))()


def _cached_split_not_from_block_0():
    ts = [900, 800, 700]
    ad = emulated(_cached_dit(ts), balance=given_split([(1, 2), (2, DIT_LAYERS)]))
    calls(ad, dit_inputs(t=ts[0]), dit_inputs(t=ts[1]))()


CALL_CASES = {
    "a call without a timestep": (
        lambda: calls(emulated(tiny_dit(layers=DIT_LAYERS)), dict(hidden_states=dit_inputs()["hidden_states"],
                                                                   class_labels=torch.tensor([1, 2])))(),
        ValueError, "the transformer was called without a timestep; pass one or call set_step()"),
    "an asynchronous step before any warm-up step": (
        _no_warm_up_in_this_generation,
        AsyncDiffError, ("step ", "2", " is asynchronous but no warm-up step ran in this generation; start at step 0 "
                                       "or call reset()")),
    "a boundary block the forward skips at a warm-up step": (
        lambda: calls(emulated(tiny_sd3()), sd3_inputs(skip_layers=[1]))(),
        UnsplittableModelError, ("AsyncDenoiser cannot split ", "SD3Transformer2DModel here: its forward did not call "
                                 "transformer_blocks[1]", " (a component boundary) on this call")),
    "the next component's first block skipped at an asynchronous step": (
        lambda: calls(emulated(tiny_sd3()), sd3_inputs(1000), sd3_inputs(900, skip_layers=[1]))(),
        UnsplittableModelError, ("AsyncDenoiser cannot split ", "SD3Transformer2DModel here: its forward did not call "
                                 "transformer_blocks[1]", ", where the next component starts")),
    "a given split whose first component does not start at block 0": (
        lambda: calls(emulated(tiny_dit(layers=DIT_LAYERS), balance=given_split([(1, 2), (2, DIT_LAYERS)])),
                      dit_inputs(t=900), dit_inputs(t=800))(),
        ValueError, "a component that does not start at block 0 needs its input state"),
    "the same on a cache schedule's module": (
        _cached_split_not_from_block_0,
        ValueError, "a component that does not start at block 0 needs its input state"),
}


@pytest.mark.parametrize("case", list(CALL_CASES))
def test_calls_refused(case):
    fn, exc, parts = CALL_CASES[case]
    expect(fn, exc, parts)


# ------------------------------------------------------------------------------------------ BlockStreams
def test_block_streams_refusals():
    """The exported BlockStreams (what crosses a component boundary) names the block and what did not fit."""
    flux = BlockStreams(tiny_flux())
    a = flux_block_args()
    head = ("AsyncDenoiser cannot split ", "FluxTransformer2DModel into components: ",
            "transformer_blocks[0] (FluxTransformerBlock): ")
    expect(lambda: flux.read(0, (), dict(a, bogus=1)), UnsplittableModelError,
           head + ("it was called with arguments its forward does not take", ))
    expect(lambda: flux.read(0, (), dict(a, encoder_hidden_states=None)), UnsplittableModelError,
           head + ("its argument ", "'encoder_hidden_states' is a NoneType", ", not a tensor, so it cannot be the "
                                                                             "state handed from one component to the next"))
    expect(lambda: flux.outputs(0, a["hidden_states"]), UnsplittableModelError,
           head + ("it returned a ", "Tensor; the pattern says it returns (encoder_hidden_states, hidden_states)"))
    expect(lambda: flux.replace(0, (), a, (a["hidden_states"],)), ValueError,
           ("the state entering ", "transformer_blocks[0]", " is the streams (",
            "encoder_hidden_states, hidden_states", "); got ", "tuple of 1", ))
    expect(lambda: flux.check_state(0, a["hidden_states"]), ValueError,
           ("the state entering ", "transformer_blocks[0]", " is the streams (",
            "encoder_hidden_states, hidden_states", "); got ", "Tensor", ))
    dit = BlockStreams(tiny_dit(layers=2))
    x = torch.zeros(1, 16, 16)
    expect(lambda: dit.outputs(0, (x, x)), UnsplittableModelError,
           ("AsyncDenoiser cannot split ", "DiTTransformer2DModel into components: transformer_blocks[0] (BasicTransformerBlock): ",
            "it returned a ", "tuple; the pattern says it returns ", "hidden_states alone"))


# ------------------------------------------------------------------------------------------ a family added to the table
@pytest.mark.parametrize("name,fn,parts", [
    ("toy-constant", lambda model, t: 0.5, ("timestep map ", "'toy-constant' is constant")),
    ("toy-log-sigma", lambda model, t: math.log1p(t), ("timestep map ", "'toy-log-sigma' is not affine")),
])
def test_timestep_map_that_has_no_affine_inverse_refused(monkeypatch, name, fn, parts):
    """A family added to the pattern table whose transformer timestep is not an affine function of the sampler's
    (e.g. EDM's log sigma) cannot have its steps tracked: refused when the AsyncDenoiser is made."""
    fam = patterns.PATTERNS["FluxTransformer2DModel"]
    monkeypatch.setitem(patterns.TIMESTEP_MAPS, name, fn)
    monkeypatch.setitem(patterns.PATTERNS, "FluxTransformer2DModel", dataclasses.replace(fam, timestep_map=name))
    expect(lambda: emulated(tiny_flux()), ValueError, parts)


# ------------------------------------------------------------------------------------------ a process group
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_nccl_available()
                         and torch.cuda.is_available()), reason="needs CUDA and NCCL")
def test_nccl_group_for_a_model_on_the_cpu_refused(tmp_path):
    import torch.distributed as dist

    from l2c_kernels.parallel.comm import local_init_method

    dist.init_process_group("nccl", init_method=local_init_method(tmp_path), rank=0, world_size=1)
    try:
        expect(lambda: parallel.AsyncDenoiser(tiny_dit(layers=DIT_LAYERS), num_components=1, balance="uniform",
                                              process_group=dist.group.WORLD),
               ValueError, ("the process group's backend is ", "'nccl', which cannot move host tensors; use gloo for a "
                                                               "model on the CPU"))
    finally:
        dist.destroy_process_group()


# Spawned ranks (gloo, file rendezvous): one session of scenarios, each rank reporting what every scenario raised.
# The ranks run the same calls and fail at the same point, so the group stays usable from one scenario to the next;
# the last scenario ends with one rank gone.
def _drift(rank):
    """Rank 1's latents differ at step 2 (another sampler path): the headers of the exchange disagree."""
    ad = parallel.AsyncDenoiser(tiny_dit(layers=DIT_LAYERS), num_components=2, warm_up=1, balance="uniform")
    for step, t in enumerate((900, 800, 700)):
        a = dit_inputs(t=t)
        if rank == 1 and step == 2:
            a["hidden_states"] = a["hidden_states"] + 1.0
        ad(**a)


def _skipped_boundary(rank):
    """SD3's skip_layers leaves out block 1, where component 1 starts, at an asynchronous step: rank 0 finds no
    block to stop in front of, rank 1 none to start on."""
    ad = parallel.AsyncDenoiser(tiny_sd3(), num_components=2, warm_up=1, balance="uniform")
    ad(**sd3_inputs(1000))
    ad(**sd3_inputs(900, skip_layers=[1]))


def _batch_grows(rank):
    """The batch doubles after the warm-up, within one generation: rank 0's product no longer fits the message
    sized at the warm-up (rank 1 fails computing its block on the warm-up's state)."""
    ad = parallel.AsyncDenoiser(tiny_dit(layers=DIT_LAYERS), num_components=2, warm_up=1, balance="uniform")
    ad(**dit_inputs(batch=2, t=900))
    ad(**dit_inputs(batch=4, t=800))


def _peer_stops(rank):
    """Rank 1 stops calling the model before step 2 and its process exits: rank 0's exchange fails."""
    ad = parallel.AsyncDenoiser(tiny_dit(layers=DIT_LAYERS), num_components=2, warm_up=1, balance="uniform",
                                timeout_s=30)
    for step, t in enumerate((900, 800, 700)):
        if rank == 1 and step == 2:
            return
        ad(**dit_inputs(t=t))


SCENARIOS = [("drift", _drift), ("skipped-boundary", _skipped_boundary), ("batch-grows", _batch_grows),
             ("peer-stops", _peer_stops)]


def rank_session(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    out = {}
    for name, scenario in SCENARIOS:
        try:
            with torch.no_grad():
                scenario(rank)
            out[name] = None
        except Exception as exc:  # reported to the test process
            out[name] = (type(exc).__name__, str(exc))
    return out


@pytest.fixture(scope="module")
def two_ranks():
    from tests.parallel.helpers import run_ranks

    res = run_ranks(rank_session, 2, deadline_s=300)
    for r, v in res.items():
        assert v["ok"], f"rank {r}: {v}"
    return {r: v["value"] for r, v in res.items()}


MULTIPROCESS_CASES = {
    ("drift", 0): ("AsyncDiffError", ("rank 0", ": the ranks drifted apart at step ", "2 (latent checksum differ: ",
                                      ". Every rank must run the same sampler with the same seed and inputs.")),
    ("drift", 1): ("AsyncDiffError", ("rank 1", ": the ranks drifted apart at step ", "2 (latent checksum differ: ")),
    ("skipped-boundary", 0): ("UnsplittableModelError", (
        "AsyncDenoiser cannot split ", "SD3Transformer2DModel here: its forward did not call transformer_blocks[1]",
        ", where the next component starts")),
    ("skipped-boundary", 1): ("UnsplittableModelError", (
        "AsyncDenoiser cannot split ", "SD3Transformer2DModel here: its forward did not call transformer_blocks[1]",
        ", where a component starts")),
    ("batch-grows", 0): ("ValueError", ("payload larger than the message size", )),
    ("peer-stops", 0): ("AsyncDiffError", (
        "rank 0/2: exchange of component outputs at step 2", " failed: ",
        ". Another rank probably exited, crashed or stopped calling the model (timeout_s=",
        "30); the process group cannot be used any more.")),
}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("scenario,rank", list(MULTIPROCESS_CASES))
def test_ranks_refused(two_ranks, scenario, rank):
    exc, parts = MULTIPROCESS_CASES[(scenario, rank)]
    got = two_ranks[rank][scenario]
    assert got is not None, f"rank {rank}: {scenario} raised nothing"
    assert got[0] == exc and re.search(_pattern(parts), got[1]), f"rank {rank}: {got}"


def test_the_other_ranks_fail_too(two_ranks):
    """No rank runs on where another failed: each scenario raised on both ranks (rank 1 left the last one)."""
    for name, _ in SCENARIOS[:-1]:
        assert two_ranks[1][name] is not None, name
    assert two_ranks[1]["peer-stops"] is None


def test_a_wait_that_returns_false_is_a_named_timeout():
    """A backend whose ``Work.wait(timeout)`` returns False (the documented way to report a timeout; gloo raises
    instead, covered by the spawned ranks above) is refused naming the rank, the collective and the timeout."""
    from l2c_kernels.parallel.comm import AsyncDiffError, Comm

    class Late:
        def wait(self, timeout=None):
            return False

    comm = Comm.__new__(Comm)   # the waiting logic alone: no process group is needed to reach it
    comm.rank, comm.world, comm.timeout, comm.timeout_s = 1, 2, None, 5.0
    expect(lambda: comm._wait(Late(), "all_gather of the step's outputs"), AsyncDiffError,
           ("rank ", "1/2", ": ", "all_gather of the step's outputs", " timed out after ", "5", " s; another rank "
            "probably hangs or exited"))
