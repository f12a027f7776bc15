"""Every user-facing refusal of ``l2c_kernels.learn`` and the ``l2c`` command, triggered through the entry a user
calls, on tiny models built from configs (nothing downloaded, nothing trained or sampled beyond a model call or two).

Each case names the exact exception type and literal parts of the message, in order: the first part is text of the
``raise`` itself (the f-string's literal text), the others add the values this call puts in.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from l2c_kernels.adapters import patterns
from l2c_kernels.adapters.mmdit_branches import branch_names
from l2c_kernels.adapters.patterns import ENC_HID, HID, BlockPatternError, FamilyPattern
from l2c_kernels.learn import denoiser_for, learn_front, learn_schedule, train_router
from l2c_kernels.learn import soft_forward as soft_forward_module
from l2c_kernels.learn.change_curves import measure_change_curves
from l2c_kernels.learn.gate import select_gate
from l2c_kernels.learn.soft_forward import soft_block_forward
from l2c_kernels.learn.soft_forward import SoftCaches, soft_forward
from l2c_kernels.learn.speed import measure_step_costs
from l2c_kernels.models import BundledModel
from l2c_kernels.models.configs import NOISE_SCHEDULE
from tests.tiny_models import tiny_dit

CFG = 1.5


def expect(fn, exc, parts):
    """``fn()`` raises exactly ``exc`` whose message holds ``parts`` (literal text) in this order."""
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    with pytest.raises(exc, match="(?s)" + ".*".join(re.escape(p) for p in parts)) as info:
        fn()
    assert type(info.value) is exc, f"raised {type(info.value).__name__}: {info.value}"
    return info.value


# ------------------------------------------------------------------------------------------ tiny models
def tiny_bundle():
    return BundledModel("dit-digits", tiny_dit(layers=2), None, dict(NOISE_SCHEDULE), info=dict(recommended_cfg=CFG))


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).eval()


def sd3_args(skip_layers=None):
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([500.0]), return_dict=False)
    if skip_layers is not None:
        args["skip_layers"] = skip_layers
    return args


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=[4, 6, 6]).eval()


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**NOISE_SCHEDULE)


def dit_conditions(batch=2):
    return dict(class_labels=torch.arange(batch))


# A transformer-shaped toy added to the block pattern table and given the block-level soft forward, the way a user
# adds a family (patterns.PATTERNS, register_soft_forward); its blocks can break what the table says about them.
class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, hidden_states):
        return hidden_states + self.lin(hidden_states)


class ToyJointBlock(nn.Module):
    """The table says it returns ``(encoder_hidden_states, hidden_states)``; ``returns`` says what it does."""

    def __init__(self, returns="as-the-table-says"):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.returns = returns

    def forward(self, hidden_states, encoder_hidden_states):
        e, h = encoder_hidden_states + self.lin(encoder_hidden_states), hidden_states + self.lin(hidden_states)
        if self.returns == "swapped":
            return h, e
        if self.returns == "three":
            return e, h, h
        return e, h


class ToyModel(nn.Module):
    def __init__(self, blocks, order=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.order = list(range(len(blocks))) if order is None else list(order)

    def forward(self, hidden_states, timestep=None, encoder_hidden_states=None, return_dict=False):
        for i in self.order:
            blk = self.blocks[i]
            if hasattr(blk, "returns"):   # a joint block (or the soft forward's stand-in for one)
                encoder_hidden_states, hidden_states = blk(hidden_states, encoder_hidden_states)
            else:
                hidden_states = blk(hidden_states)
        return (hidden_states,)


def toy_args():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 5, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 3, 8, generator=g))


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(patterns.PATTERNS, "ToyModel",
                        FamilyPattern("ToyModel", ("blocks",), {"ToyBlock": HID, "ToyJointBlock": ENC_HID}, False))
    # what register_soft_forward("ToyModel", soft_block_forward) does, undone after the test
    monkeypatch.setitem(soft_forward_module._SOFT_FORWARDS, "ToyModel", soft_block_forward)


def soft_call(model, args, w=None, caches=None):
    n = len(patterns.find_blocks(model))
    return lambda: soft_forward(model, args, w, caches if caches is not None else SoftCaches(n, 1))


# ------------------------------------------------------------------------------------------ the learner's arguments
LEARNER_CASES = {
    "train_router: unknown training mode": (
        lambda: train_router(tiny_bundle(), 4, training="layerwise"),
        ValueError, ("training must be one of ", "stepwise, trajectory, got 'layerwise'")),
    "learn_schedule: unknown training mode": (
        lambda: learn_schedule(tiny_bundle(), 4, training="layerwise", progress=False),
        ValueError, ("training must be one of ", "got 'layerwise'")),
    "learn_front: empty speedups": (
        lambda: learn_front(tiny_bundle(), 4, speedups=[]),
        ValueError, "speedups is empty: give at least one factor above 1"),
    "learn_schedule: empty speedups": (
        lambda: learn_schedule(tiny_bundle(), 4, speedups=[], progress=False),
        ValueError, "speedups is empty: give at least one factor above 1"),
    "measure_step_costs: no rounds": (
        lambda: measure_step_costs(denoiser_for(tiny_bundle(), 2, CFG, "ddim"), 10, rounds=0),
        ValueError, ("rounds must be >= 1, got ", "0")),
    "measure_change_curves: no runs": (
        lambda: measure_change_curves(tiny_bundle(), 4, num_runs=0),
        ValueError, "num_runs and batch_size must be >= 1"),
    "measure_change_curves: empty batch": (
        lambda: measure_change_curves(tiny_bundle(), 4, batch_size=0),
        ValueError, "num_runs and batch_size must be >= 1"),
    "select_gate: tol not above 0": (
        lambda: select_gate([math.inf, 0.1, 0.01], 0.0),
        ValueError, ("tol must be > 0, got ", "0.0")),
    "select_gate: negative tol": (
        lambda: select_gate([math.inf, 0.1, 0.01], -0.5),
        ValueError, ("tol must be > 0, got ", "-0.5")),
}


@pytest.mark.parametrize("case", list(LEARNER_CASES))
def test_learner_arguments_refused(case):
    fn, exc, parts = LEARNER_CASES[case]
    expect(fn, exc, parts)


def test_select_gate_refuses_an_empty_curve():
    with pytest.raises(ValueError, match="empty curve") as info:
        select_gate([], 0.1)
    assert type(info.value) is ValueError


# ------------------------------------------------------------------------------------------ conditioning
def _dit_pipeline_without_class_embedding():
    """A DiTPipeline around a transformer without a class table (a continuous-input Transformer2DModel)."""
    from diffusers import DiTPipeline, Transformer2DModel

    from tests.learn.pipeline_models import tiny_vae

    tr = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                            norm_num_groups=2, sample_size=8).eval()
    return DiTPipeline(transformer=tr, vae=tiny_vae(), scheduler=ddim())


def _learned_sigma_mismatch():
    """A transformer predicting 12 channels for 4-channel latents (neither the noise nor noise + learned sigma):
    refused at the first guided step, after one model call."""
    from diffusers import DiTTransformer2DModel

    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=12,
                               num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    den = denoiser_for(tr, scheduler=ddim(), conditions=dit_conditions(2), latent_shape=(4, 8, 8))
    with torch.no_grad():
        den.run(den.transformer, 2, den.noise(0))


CONDITIONING_CASES = {
    "DiTPipeline without a class embedding": (
        lambda: denoiser_for(_dit_pipeline_without_class_embedding(), 2),
        ValueError, ("DiTPipeline", " has no class embedding (num_embeds_ada_norm is ", "None)")),
    "latent_shape of one number": (
        lambda: denoiser_for(tiny_dit(layers=1), scheduler=ddim(), conditions=dit_conditions(), latent_shape=(4,)),
        ValueError, ("latent_shape must be one sample", "s latents as the transformer takes them ((C, H, W), packed ",
                     "(tokens, C), video (C, F, H, W)), got ", "(4,)")),
    "conditions of two batch sizes": (
        lambda: denoiser_for(tiny_dit(layers=1), scheduler=ddim(), latent_shape=(4, 8, 8),
                             conditions=dict(class_labels=torch.arange(2), encoder_hidden_states=torch.zeros(3, 1, 8))),
        ValueError, ("conditions must hold the model batch in one size (the rows of encoder_hidden_states, ",
                     "; Flux", "s img_ids / txt_ids have none); got ", "class_labels 2, encoder_hidden_states 3")),
    "conditions without a tensor": (
        lambda: denoiser_for(tiny_dit(layers=1), scheduler=ddim(), latent_shape=(4, 8, 8),
                             conditions=dict(class_labels=[1, 2])),
        ValueError, ("conditions must hold the model batch in one size", "; got ", "none")),
    "model output of neither 1x nor 2x the latent channels": (
        _learned_sigma_mismatch,
        ValueError, ("the model predicts ", "12 channels for 4", "-channel latents")),
}


@pytest.mark.parametrize("case", list(CONDITIONING_CASES))
def test_conditioning_refused(case):
    fn, exc, parts = CONDITIONING_CASES[case]
    expect(fn, exc, parts)


# ------------------------------------------------------------------------------------------ the soft forwards
def test_block_soft_forward_refusals(toy_family):
    """The block-level soft forward (what the router trains through) refuses weights of another shape and blocks
    that do not do what the pattern table says, naming the block; SD3's ``skip_layers`` leaves a block out."""
    args = toy_args()
    plain = ToyModel([ToyBlock(), ToyJointBlock(), ToyBlock()])
    expect(soft_call(plain, args, w=torch.ones(2, 1)), ValueError,
           ("; the block-level soft forward of ", "ToyModel takes one weight per block, [3, 1]"))
    expect(soft_call(plain, args, w=torch.ones(3, 2)), ValueError,
           ("w has shape ", "[3, 2]; the block-level soft forward of ToyModel"))
    skipping = ToyModel([ToyBlock(), ToyJointBlock(), ToyBlock()], order=(0, 1))
    expect(soft_call(skipping, args), RuntimeError, ("ToyModel", "'s forward ran ", "2 of its 3 blocks"))
    three = ToyModel([ToyBlock(), ToyJointBlock("three")])
    # the runtime's own block checks (the soft forward's stand-ins are the runtime's)
    expect(soft_call(three, args), BlockPatternError,
           ("ToyJointBlock returned a tuple of 3", "; the pattern says it returns (",
            "encoder_hidden_states, hidden_states)"))
    swapped = ToyModel([ToyBlock(), ToyJointBlock("swapped")])   # 3 text tokens, 5 image tokens
    expect(soft_call(swapped, args), BlockPatternError,
           ("ToyJointBlock output 0 should be encoder_hidden_states", " of shape [1, 3, 8] but has shape [1, 5, 8]; "
            "it has the shape of hidden_states"))
    out_of_order = ToyModel([ToyBlock(), ToyJointBlock(), ToyBlock()], order=(0, 2, 1))
    expect(soft_call(out_of_order, args), BlockPatternError,
           ("ToyModel's forward ran blocks[2] when blocks[1] was expected", "; the pattern table says"))
    expect(soft_call(plain, args, caches=SoftCaches(2, 1)), ValueError,
           ("the soft caches were made for a router of ", "[2, 1] (blocks, columns); the block-level soft forward of "
                                                                "ToyModel needs [3, 1]"))

    sd3 = tiny_sd3()
    with torch.no_grad():
        expect(soft_call(sd3, sd3_args(skip_layers=[1])), RuntimeError,
               ("SD3Transformer2DModel", "'s forward ran ", "1 of its 2 blocks"))


def test_branch_soft_forward_refusals():
    """The branch-level soft forward of SD3 / Flux (caches naming their units) refuses weights of another shape and
    a forward that leaves a block out (SD3's ``skip_layers``)."""
    flux = tiny_flux()
    names = branch_names(flux)
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(3, 3), return_dict=False)
    expect(lambda: soft_forward(flux, args, torch.ones(1, 1), SoftCaches(2, len(names), branches=names)), ValueError,
           ("; the branch-level soft forward of ", f"FluxTransformer2DModel takes one weight per block and unit, "
                                                   f"[2, {len(names)}]"))
    sd3 = tiny_sd3()
    names = branch_names(sd3)
    with torch.no_grad():
        expect(lambda: soft_forward(sd3, sd3_args(skip_layers=[1]), None, SoftCaches(2, len(names), branches=names)),
               RuntimeError, ("SD3Transformer2DModel", "'s forward ran ", "1 of its 2 blocks"))


def test_dit_soft_forward_refusals():
    """The branch-level soft forward of DiT / PixArt refuses weights and caches of another router table."""
    from tests.tiny_models import dit_inputs

    dit = tiny_dit(layers=2)   # branches attn1, ff
    expect(lambda: soft_forward(dit, dit_inputs(), torch.ones(2, 3), SoftCaches(2, 2)), ValueError,
           ("w has shape [2, 3]; the branch-level soft forward of ", "DiTTransformer2DModel takes one weight per "
                                                                     "block and branch, [2, 2] (['attn1', 'ff'])"))
    expect(lambda: soft_forward(dit, dit_inputs(), None, SoftCaches(3, 2)), ValueError,
           ("the soft caches were made for a router of ", "[3, 2] (blocks, columns); the branch-level soft forward of "
                                                                "DiTTransformer2DModel needs [2, 2]"))


# ------------------------------------------------------------------------------------------ the l2c command
@pytest.fixture(scope="module")
def saved_dit_pipeline(tmp_path_factory):
    from tests.learn.pipeline_models import dit_xl_shaped_pipeline

    folder = tmp_path_factory.mktemp("pipe") / "dit"
    dit_xl_shaped_pipeline(layers=1).save_pretrained(folder)
    return folder


def test_cli_names_a_prompts_file_without_prompts(saved_dit_pipeline, tmp_path, capsys):
    from l2c_kernels.cli import main

    empty = tmp_path / "prompts.txt"
    empty.write_text("\n   \n\n")
    assert main(["learn", "--pipeline", str(saved_dit_pipeline), "--prompts", str(empty), "--steps", "3",
                 "-o", str(tmp_path / "out.l2c.json")]) == 2
    err = capsys.readouterr().err
    assert f"l2c: error: {empty}: no prompts (one per line)\n" in err
    assert ": no prompts (one per line)" in err
    assert not (tmp_path / "out.l2c.json").exists()
