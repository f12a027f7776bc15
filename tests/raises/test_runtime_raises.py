"""The runtime's and the adapters' refusals, each triggered through compile_schedule (or the object a user holds)
and checked by its message.

Models whose blocks do not fit are a toy family registered in the block pattern table (as a new family would
be), tiny DiT / PixArt models, and the published Flux.1-schnell config cut to a few blocks; a model that is
changed for a test is built for that test alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import l2c_kernels as l2c
from l2c_kernels.adapters import StepInputs, adapter_for, patterns
from l2c_kernels.adapters.mmdit_branches import branch_names
from l2c_kernels.adapters.patterns import ENC_HID, HID, BlockPatternError, FamilyPattern
from l2c_kernels.runtime import CudaGraphError
from l2c_kernels.runtime.branch_wrappers import BranchCachedTransformer
from tests.family_configs import FAMILIES
from tests.tiny_models import dit_inputs, pixart_inputs, tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")

TS = [981, 781, 581, 381, 181]
D = 8


# ---------------------------------------------------------------- a toy family in the block pattern table
class ToyBlock(nn.Module):
    def __init__(self, returns):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.returns = returns  # (hidden, encoder) -> what the block returns

    def forward(self, hidden_states, encoder_hidden_states=None):
        return self.returns(hidden_states + torch.tanh(self.lin(hidden_states)), encoder_hidden_states)


class ToyModel(nn.Module):
    """Two blocks; what they return, how the forward calls them and what it returns are the test's to break."""

    def __init__(self, returns=lambda h, e: h, block_kwargs=None, blocks_run=2, output=lambda h: (h,)):
        super().__init__()
        self.blocks = nn.ModuleList([ToyBlock(returns) for _ in range(2)])
        self.block_kwargs, self.blocks_run, self.output = dict(block_kwargs or {}), blocks_run, output

    def forward(self, hidden_states, timestep=None, *extra, encoder_hidden_states=None, return_dict=False):
        h, e = hidden_states, encoder_hidden_states
        for blk in self.blocks[:self.blocks_run]:
            out = blk(h, encoder_hidden_states=e, **self.block_kwargs)
            e, h = out if isinstance(out, tuple) and len(out) == 2 else (e, out)
        return self.output(h)


@pytest.fixture
def toy(monkeypatch):
    def make(pattern=HID, **options):
        monkeypatch.setitem(patterns.PATTERNS, "ToyModel",
                            FamilyPattern("ToyModel", ("blocks",), {"ToyBlock": pattern}, False))
        torch.manual_seed(0)
        return ToyModel(**options).eval()
    return make


def latents():
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))


def text():
    return torch.randn(2, 3, D, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("pattern,options,call,match", [
    pytest.param(HID, dict(block_kwargs={"scale": 2.0}), {}, "was called with arguments its forward does not take",
                 id="block-called-with-unknown-argument"),
    pytest.param(HID, dict(returns=lambda h, e: (h,)), {}, "the pattern says it returns .* alone",
                 id="tuple-for-one-stream"),
    pytest.param(ENC_HID, dict(returns=lambda h, e: h), dict(encoder_hidden_states=text()),
                 r"the pattern says it returns \(", id="tensor-for-two-streams"),
    pytest.param(ENC_HID, dict(returns=lambda h, e: (torch.zeros(2, 3, D), h)), {},
                 "but was called without it: no input to take a residual from", id="stream-returned-not-given"),
    pytest.param(HID, dict(returns=lambda h, e: h[:, :-1]), {}, "should be .* of shape .* but has shape",
                 id="stream-changes-shape"),
    pytest.param(HID, dict(blocks_run=1), {}, "forward did not run", id="forward-skips-a-block"),
])
def test_block_that_does_not_fit_its_pattern_is_refused_on_the_first_call(toy, pattern, options, call, match):
    model = toy(pattern, **options)
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, TS))
    with pytest.raises(BlockPatternError, match=match):
        fast(latents(), TS[0], **call)


def test_stream_given_when_computed_but_none_at_a_reuse_is_refused(toy):
    model = toy(ENC_HID, returns=lambda h, e: (e + 1, h))
    fast = l2c.compile_schedule(model, l2c.Schedule.from_mask(model, TS, [[True, True]] + [[False, False]] * 4))
    fast(latents(), TS[0], encoder_hidden_states=text())
    with pytest.raises(ValueError, match="when it was computed but now gets None"):
        fast(latents(), TS[1])


@pytest.mark.parametrize("args,kwargs,exception,match", [
    pytest.param((), {}, ValueError, "; pass it or call set_step", id="no-timestep"),
    pytest.param((TS[0],), {"bogus": 1}, TypeError, r"\.forward: ", id="unknown-argument"),
])
def test_block_level_call_that_names_no_step_is_refused(toy, args, kwargs, exception, match):
    model = toy()
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, TS))
    with pytest.raises(exception, match=match):
        fast(latents(), *args, **kwargs)


@pytest.mark.parametrize("options,extra,kwargs,exception,match", [
    pytest.param(dict(output=lambda h: (h, h)), (), {}, CudaGraphError, "with other than one tensor",
                 id="two-outputs"),
    pytest.param({}, (5,), {}, CudaGraphError, "was called with extra positional arguments", id="extra-positional"),
    pytest.param({}, (), {"bogus": 1}, TypeError, r"\.forward: ", id="unknown-argument"),
])
def test_cuda_graph_capture_refuses_calls_it_cannot_replay(toy, options, extra, kwargs, exception, match):
    model = toy(**options)
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, TS), cuda_graphs="emulate")
    with pytest.raises(exception, match=match):
        fast.capture(latents(), TS[0], *extra, **kwargs)


# ---------------------------------------------------------------- tiny DiT / PixArt
def test_branch_level_call_without_a_timestep_is_refused():
    dit = tiny_dit(layers=2)
    fast = l2c.compile_schedule(dit, l2c.Schedule.full(dit, TS))
    inputs = dit_inputs()
    del inputs["timestep"]
    with pytest.raises(ValueError, match="without a timestep; pass one or call set_step"):
        fast(**inputs)


def test_pixart_with_additional_conditions_needs_them():
    from diffusers import PixArtTransformer2DModel

    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                      caption_channels=12, use_additional_conditions=True).eval()
    fast = l2c.compile_schedule(pixart, l2c.Schedule.full(pixart, TS))
    with pytest.raises(ValueError, match="`added_cond_kwargs` cannot be None when using additional conditions"):
        fast(**dict(pixart_inputs(), added_cond_kwargs=None))


def test_summary_of_a_model_l2c_does_not_run():
    with pytest.raises(ValueError, match="no l2c cached transformer here"):
        l2c.summary(tiny_dit(layers=1))


def _sequential(m):
    m.transformer_blocks = nn.Sequential(*m.transformer_blocks)


def _foreign_block(m):
    m.transformer_blocks[1] = nn.Identity()


def _no_blocks(m):
    m.transformer_blocks = nn.ModuleList()


@pytest.mark.parametrize("change,match", [(_sequential, ", not a ModuleList"),
                                          (_foreign_block, "; the pattern table knows"),
                                          (_no_blocks, "has no blocks in")])
def test_block_lists_that_do_not_fit_the_pattern_table_are_refused(change, match):
    dit = tiny_dit(layers=2)
    change(dit)
    with pytest.raises(BlockPatternError, match=match):
        l2c.Schedule.full(dit, TS, branches=["block"])


def test_branch_runtime_of_sd3_and_flux_refuses_other_blocks():
    dit = tiny_dit(layers=2)
    with pytest.raises(BlockPatternError, match="has no branch-level wrapper"):
        BranchCachedTransformer(dit, l2c.Schedule.full(dit, TS))


def test_block_level_adapter_has_no_branch_pieces():
    dit = tiny_dit(layers=1)
    with pytest.raises(TypeError, match="block-level models have no branch context"):
        adapter_for(dit, ["block"]).block_context(dit.transformer_blocks[0], None)


# ---------------------------------------------------------------- Flux.1 at branch level
FLUX = FAMILIES["flux-schnell"]


def flux_call(module):
    return module(**FLUX.call_kwargs(FLUX.latents(1, 0), TS[0], FLUX.inputs(1, 0)))


def test_two_stream_adapter_runs_no_forward_pieces():
    model = FLUX.build(seed=0)
    with pytest.raises(TypeError, match="not through the adapter's forward pieces"):
        adapter_for(model, branch_names(model)).prepare(model, StepInputs(args={}))


class LoraLinear(nn.Module):
    """What PEFT puts in place of a LoRA-adapted nn.Linear: a module around it, not an nn.Linear."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base

    def forward(self, x):
        return self.base_layer(x)


class IPAdapterStyleProcessor:
    """Flux attention with a third output (an IP-adapter's image-prompt attention): the block adds it."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        h, e = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return h, e, torch.zeros_like(h)


def _lora_on_the_modulation(model):
    blk = model.transformer_blocks[0]
    blk.norm1.linear = LoraLinear(blk.norm1.linear)


def _ip_adapter_attention(model):
    attn = model.transformer_blocks[0].attn
    attn.set_processor(IPAdapterStyleProcessor(attn.processor))


@pytest.mark.parametrize("change,match", [
    (_lora_on_the_modulation, "is not an adaLN-Zero norm driven by temb"),
    (_ip_adapter_attention, "the branch-level wrapper handles the image and text outputs only"),
])
def test_flux_blocks_changed_past_the_branch_wrappers_are_refused(change, match):
    model = FLUX.build(seed=0)
    change(model)
    flux_call(model)  # the model itself still runs
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, TS, branches=branch_names(model)))
    with pytest.raises(BlockPatternError, match=match):
        flux_call(fast)
