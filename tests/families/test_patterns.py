"""The block pattern table: models that do not fit are refused with the reason; schedules at block level
(construction, budgets by counted FLOPs, files); calls per step; T-GATE refused for joint attention."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import l2c_kernels as l2c
from l2c_kernels import schedules
from l2c_kernels.adapters import patterns
from l2c_kernels.adapters.patterns import BlockPatternError, FamilyPattern, HID, HID_ENC
from l2c_kernels.runtime.block_flops import measure_block_flops
from tests.family_configs import FAMILIES
from tests.families.block_reference import HookBlockReference
from tests.families.conftest import TIMESTEPS, built, max_err


# ---------------------------------------------------------------- toy models for patterns that do not fit
class ToyBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, hidden_states, temb=None):
        return hidden_states + torch.tanh(self.lin(hidden_states))


class ToyModel(nn.Module):
    """A transformer-shaped toy whose forward can skip or reorder its blocks."""

    def __init__(self, order=(0, 1, 2)):
        super().__init__()
        self.blocks = nn.ModuleList([ToyBlock() for _ in range(3)])
        self.order = order

    def forward(self, hidden_states, timestep, return_dict=False):
        for i in self.order:
            hidden_states = self.blocks[i](hidden_states)
        return (hidden_states,)


@pytest.fixture
def toy_pattern(monkeypatch):
    monkeypatch.setitem(patterns.PATTERNS, "ToyModel",
                        FamilyPattern("ToyModel", ("blocks",), {"ToyBlock": HID}, False))


def _toy_call(model, t=1000):
    return model(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)), torch.full((2,), float(t)))


def test_toy_fits_and_skipping_or_reordering_blocks_is_refused(toy_pattern):
    torch.manual_seed(0)
    good = ToyModel()
    fast = l2c.compile_schedule(good, l2c.Schedule.full(good, TIMESTEPS))
    assert torch.equal(_toy_call(fast)[0], _toy_call(good)[0])
    skip = ToyModel(order=(0, 2))
    with pytest.raises(BlockPatternError, match=r"ran blocks\[2\] when blocks\[1\] was expected"):
        _toy_call(l2c.compile_schedule(skip, l2c.Schedule.full(skip, TIMESTEPS)))
    short = ToyModel(order=(0, 1))
    with pytest.raises(BlockPatternError, match=r"did not run blocks\[2\]"):
        _toy_call(l2c.compile_schedule(short, l2c.Schedule.full(short, TIMESTEPS)))


def test_block_of_another_class_or_missing_list_refused(toy_pattern):
    m = ToyModel()
    m.blocks[1] = nn.Identity()
    with pytest.raises(BlockPatternError, match=r"ToyModel.blocks\[1\] is a Identity.*ToyBlock"):
        l2c.Schedule.full(m, TIMESTEPS)
    m2 = ToyModel()
    del m2.blocks
    with pytest.raises(BlockPatternError, match="no block list 'blocks'"):
        l2c.Schedule.full(m2, TIMESTEPS)


def test_wrong_return_order_found_on_the_first_call(monkeypatch):
    """Flux double blocks return (encoder, hidden); a table that said (hidden, encoder) is caught on the probe
    call (image and text tokens differ in number), naming the mismatch."""
    flux = built("flux-dev")
    fam = patterns.PATTERNS["FluxTransformer2DModel"]
    wrong = FamilyPattern(fam.model_class, fam.block_lists, dict(fam.blocks, FluxTransformerBlock=HID_ENC),
                          True, timestep_map=fam.timestep_map)
    monkeypatch.setitem(patterns.PATTERNS, "FluxTransformer2DModel", wrong)
    f = FAMILIES["flux-dev"]
    fast = l2c.compile_schedule(flux, l2c.Schedule.full(flux, TIMESTEPS))
    with pytest.raises(BlockPatternError, match="FluxTransformerBlock output 0 should be hidden_states.*another order"):
        fast(**f.call_kwargs(f.latents(1, 0), TIMESTEPS[0], f.inputs(1, 0)))


def test_single_output_pattern_for_a_tuple_block_refused(monkeypatch):
    sd3 = built("sd3-medium")
    fam = patterns.PATTERNS["SD3Transformer2DModel"]
    monkeypatch.setitem(patterns.PATTERNS, "SD3Transformer2DModel",
                        FamilyPattern(fam.model_class, fam.block_lists, {"JointTransformerBlock": HID}, True))
    f = FAMILIES["sd3-medium"]
    fast = l2c.compile_schedule(sd3, l2c.Schedule.full(sd3, TIMESTEPS))
    with pytest.raises(BlockPatternError, match="JointTransformerBlock returned tuple; the pattern says it returns "
                                                "hidden_states alone"):
        fast(**f.call_kwargs(f.latents(1, 0), TIMESTEPS[0], f.inputs(1, 0)))


def test_unknown_and_refused_families():
    with pytest.raises(TypeError, match="Linear is not supported.*block pattern table"):
        l2c.Schedule.full(nn.Linear(2, 2), TIMESTEPS)

    class HiDreamImageTransformer2DModel(nn.Module):  # stands for the real class: refused by name
        pass

    with pytest.raises(BlockPatternError, match="not supported at block level: its double-stream blocks"):
        l2c.Schedule.full(HiDreamImageTransformer2DModel(), TIMESTEPS)


# ---------------------------------------------------------------- schedules at block level
def test_tgate_refused_for_joint_attention():
    flux = built("flux-dev")
    with pytest.raises(ValueError, match="T-GATE caches cross-attention"):
        schedules.tgate(flux, TIMESTEPS, gate_step=2)
    nb = l2c.Schedule.full(flux, TIMESTEPS).num_blocks
    tg = l2c.Schedule(timesteps=TIMESTEPS, plan=[["CCC"] * nb] + [["CRC"] * nb] * 4, branches=["attn1", "attn2", "ff"],
                      num_blocks=nb, attn2_cache="cfg_mean")
    with pytest.raises(l2c.ScheduleError, match="joint attention.*no cross-attention to cache"):
        l2c.compile_schedule(flux, tg)


def test_branch_schedule_of_another_model_refused_and_dit_runs_at_either_level():
    flux, dit = built("flux-dev"), built("dit-xl-2")
    with pytest.raises(l2c.ScheduleError, match="made for .*DiTTransformer2DModel"):
        l2c.compile_schedule(flux, l2c.Schedule.full(dit, TIMESTEPS))
    assert type(l2c.compile_schedule(dit, l2c.Schedule.full(dit, TIMESTEPS))).__name__ == "CachedTransformer"
    assert type(l2c.compile_schedule(dit, l2c.Schedule.full(dit, TIMESTEPS, branches=["block"]))).__name__ \
        == "BlockCachedTransformer"
    with pytest.raises(l2c.ScheduleError, match="made for 3 blocks"):
        l2c.compile_schedule(built("sd3-medium"), l2c.Schedule.full(built("flux-schnell"), TIMESTEPS))


def test_block_schedules_baselines_budget_and_file(tmp_path):
    flux, f = built("flux-dev"), FAMILIES["flux-dev"]
    u = schedules.uniform(flux, TIMESTEPS, interval=2)
    assert u.branches == ["block"] and u.plan[1] == ["R"] * 4 and u.plan[2] == ["C"] * 4
    # one bool per block is accepted; costs counted on a real call weigh each block
    kw = f.call_kwargs(f.latents(1, 0), TIMESTEPS[0], f.inputs(1, 0))
    flops = measure_block_flops(flux, **kw)
    mask = [[True] * 4] + [[True, True, False, False]] * 4
    s = l2c.Schedule.from_mask(flux, TIMESTEPS, mask, unit_flops=flops)
    expect = 4 * (flops[2] + flops[3]) / (5 * sum(flops))
    assert s.flops_removed_fraction() == pytest.approx(expect, rel=1e-12)
    s.save(tmp_path / "s.json")
    back = l2c.Schedule.load(tmp_path / "s.json")
    assert back.unit_flops == flops and back.plan == s.plan and back.branches == ["block"]
    d = back.to_dict()
    del d["unit_flops"]  # files written before unit_flops existed still load
    assert l2c.Schedule.from_dict(d).flops_removed_fraction() == pytest.approx(s.removed_fraction())
    with pytest.raises(l2c.ScheduleError, match="unit_flops must list one finite number"):
        l2c.Schedule.from_dict(dict(back.to_dict(), unit_flops=[1.0, 2.0]))


def test_counted_flops_match_the_block_arithmetic():
    """A Flux single-stream block on N = image + text tokens of width C: q, k, v (3 C^2), the MLP in (4 C^2) and
    the output (5 C^2) per token, the modulation (3 C^2) once per sample, and attention's two products
    (2 N^2 C); FLOPs = 2 x multiply-adds."""
    flux, f = built("flux-dev"), FAMILIES["flux-dev"]
    kw = f.call_kwargs(f.latents(1, 0), TIMESTEPS[0], f.inputs(1, 0))
    flops = measure_block_flops(flux, **kw)
    c, n = 256, 16 + 6
    single = 2 * (n * 12 * c * c + 3 * c * c + 2 * n * n * c)  # FlopCounterMode's registry for the CPU attention
    # kernel is completed by measure_block_flops (without it the 2 N^2 C term is missing)
    assert flops[2] == flops[3] == single
    assert flops[0] > 0 and flops[0] != flops[2]


def test_reuse_before_fill_and_shape_change_refused():
    flux, f = built("flux-dev"), FAMILIES["flux-dev"]
    fast = l2c.compile_schedule(flux, schedules.uniform(flux, TIMESTEPS, interval=2))
    fast.set_step(1)
    with pytest.raises(l2c.ScheduleError, match="step 1 reuses block 0 but its residual cache was not filled"):
        fast(**f.call_kwargs(f.latents(1, 0), TIMESTEPS[1], f.inputs(1, 0)))
    fast.reset()
    fast(**f.call_kwargs(f.latents(1, 0), TIMESTEPS[0], f.inputs(1, 0)))
    with pytest.raises(ValueError, match="input shapes changed in the middle of a generation"):
        fast(**f.call_kwargs(f.latents(2, 0), TIMESTEPS[1], f.inputs(2, 0)))
    with pytest.raises(l2c.ScheduleError, match="timestep 555 is not in this schedule"):
        fast(**f.call_kwargs(f.latents(1, 0), 555, f.inputs(1, 0)))


def test_two_calls_per_step_keep_separate_caches():
    """A pipeline that runs the conditional and unconditional passes as two calls per step (Wan): each pass
    reuses its own residuals; the result equals two independent hook references."""
    fam, wan = FAMILIES["wan2.1-t2v"], built("wan2.1-t2v")
    nb = 2
    sched = l2c.Schedule.from_mask(wan, TIMESTEPS, [[s % 2 == 0 or b == 0 for b in range(nb)]
                                                    for s in range(len(TIMESTEPS))])
    fast = l2c.compile_schedule(wan, sched)
    refs = [HookBlockReference(wan, fam, sched), HookBlockReference(wan, fam, sched)]
    x = fam.latents(1, 0)
    conds = [fam.inputs(1, 0), fam.inputs(1, 7)]
    for k, t in enumerate(TIMESTEPS):
        for p in range(2):
            kw = fam.call_kwargs(x, t, conds[p])
            got = fast(**kw)[0]
            assert (fast.current_step, fast.current_pass) == (k, p)
            want = refs[p].step(k, kw)[0]
            assert max_err([want], [got]) <= 1e-5 * max(1.0, float(want.abs().max()))
        x = x - 0.2 * got


def test_model_untouched_and_weights_shared():
    flux = built("flux-schnell")
    before = [id(b) for b in flux.transformer_blocks]
    fast = l2c.compile_schedule(flux, l2c.Schedule.full(flux, TIMESTEPS))
    assert [id(b) for b in flux.transformer_blocks] == before
    assert type(flux.transformer_blocks[0]).__name__ == "FluxTransformerBlock"
    assert fast.original_model is flux and fast.config is flux.config
    assert fast._shadow.transformer_blocks[0].block is flux.transformer_blocks[0]
    assert fast._shadow.x_embedder is flux.x_embedder
    f = FAMILIES["flux-schnell"]
    kw = f.call_kwargs(f.latents(1, 0), TIMESTEPS[0], f.inputs(1, 0))
    del kw["return_dict"]
    out, ref = fast(**kw), flux(**kw)
    assert type(out) is type(ref) and torch.equal(out.sample, ref.sample)  # same output type as the original


def test_per_token_timesteps_use_their_largest_entry():
    """Wan 2.2 passes a [B, tokens] timestep whose conditioning-frame entries are 0; the step is the largest."""
    fam, wan = FAMILIES["wan2.1-t2v"], built("wan2.1-t2v")
    fast = l2c.compile_schedule(wan, l2c.Schedule.full(wan, TIMESTEPS))
    x, cond = fam.latents(1, 0), fam.inputs(1, 0)
    for k, t in enumerate(TIMESTEPS[:2]):
        ts = torch.full((1, 8), float(t))
        ts[:, :2] = 0
        assert fast._resolve((), dict(cond, hidden_states=x, timestep=ts)) == (k, 0)
        fast._step, fast._pass = k, 0  # as a finished call of step k leaves it


def test_to_dtype_reaches_the_shared_weights():
    """.to() on the compiled module converts the original's weights, which the shadow shares."""
    fam = FAMILIES["sd3-medium"]
    model = fam.build(seed=3)
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, TIMESTEPS))
    fast.to(torch.float64)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float64
    assert fast._shadow.pos_embed.proj.weight.dtype == torch.float64
    kw = fam.call_kwargs(fam.latents(1, 0).double(), TIMESTEPS[0],
                         {k: v.double() for k, v in fam.inputs(1, 0).items()})
    assert torch.equal(fast(**kw)[0], model(**kw)[0])


def test_device_timesteps_are_counted_not_read():
    """A timestep on an accelerator is not read (no host sync): calls are counted, passes_per_step per step,
    wrapping to step 0 after the last step. (A meta tensor stands for a device tensor here.)"""
    from l2c_kernels.runtime.cached_transformer import compile_blocks

    wan = built("wan2.1-t2v")
    fast = compile_blocks(wan, l2c.Schedule.full(wan, TIMESTEPS[:2]), passes_per_step=2)
    dev_t = dict(hidden_states=None, encoder_hidden_states=None, timestep=torch.empty(1, device="meta"))
    seen = []
    for _ in range(5):
        s, p = fast._resolve((), dev_t)
        seen.append((s, p))
        fast._step, fast._pass = s, p
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0)]
