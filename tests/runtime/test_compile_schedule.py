"""compile_schedule against the original diffusers models and an independent hook reference."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import l2c_kernels as l2c
from l2c_kernels.runtime import compile_plans
from tests.runtime.hook_reference import HookReference
from tests.tiny_models import cfg_batch, inputs_for, rel_err, tiny_dit, tiny_pixart

TS = [981, 801, 601, 401, 201, 1]
MODELS = {"dit": tiny_dit, "pixart": tiny_pixart}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def run_steps(fast_or_ref, sched, base_inputs, steps=None):
    outs = []
    for s in (range(sched.num_steps) if steps is None else steps):
        inp = dict(base_inputs, timestep=torch.full_like(base_inputs["timestep"], sched.timesteps[s]))
        if isinstance(fast_or_ref, HookReference):
            outs.append(fast_or_ref.step(s, inp))
        else:
            outs.append(fast_or_ref(**inp).sample)
    return outs


def test_full_schedule_reproduces_original(model):
    sched = l2c.Schedule.full(model, TS)
    fast = l2c.compile_schedule(model, sched)
    inputs = inputs_for(model, batch=3)
    for s, t in enumerate(TS):
        inp = dict(inputs, timestep=torch.full((3,), t))
        ref = model(**inp).sample
        out = fast(**inp).sample
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 1e-5, f"step {s}"


def test_return_dict_false_and_positional_args(model):
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, TS))
    inp = inputs_for(model)
    x = inp.pop("hidden_states")
    out = fast(x, **inp, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert rel_err(out[0], model(x, **inp).sample) < 1e-5


def _random_schedule(model, data, cfg_mean=False):
    branches = l2c.adapters.adapter_for(model).branches(model)
    nb = len(model.transformer_blocks)
    plan = [["C" * len(branches)] * nb]
    for _ in TS[1:]:
        row = []
        for _ in range(nb):
            if data.draw(st.integers(0, 5)) == 0:
                row.append("B")
            else:
                row.append("".join(data.draw(st.sampled_from("CR")) for _ in branches))
        plan.append(row)
    return l2c.Schedule(timesteps=TS, plan=plan, branches=branches, num_blocks=nb,
                        model_class=type(model).__name__, attn2_cache="cfg_mean" if cfg_mean else "per_sample")


# 100 random plans per model against the hook reference (with the forecast test below: 102 more per model)
@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_schedules_match_hook_reference(name, data):
    model = MODELS[name]()
    cfg_mean = name == "pixart" and data.draw(st.booleans())
    sched = _random_schedule(model, data, cfg_mean)
    inputs = inputs_for(model, batch=4)
    if cfg_mean:
        inputs = cfg_batch(inputs)
    fast = l2c.compile_schedule(model, sched)
    got = run_steps(fast, sched, inputs)
    want = run_steps(HookReference(model, sched), sched, inputs)
    for s, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-5, f"step {s}: plan {sched.plan[s]}"


def test_reuse_changes_output_and_uses_current_gate(model):
    """A reused branch is not the same as a computed one, and not the same as dropping it."""
    nb = len(model.transformer_blocks)
    br = l2c.adapters.adapter_for(model).branches(model)
    plan = [["C" * len(br)] * nb, ["R" * len(br)] * nb]
    sched = l2c.Schedule(timesteps=[981, 501], plan=plan, branches=br, num_blocks=nb, model_class=type(model).__name__)
    inputs = inputs_for(model)
    got = run_steps(l2c.compile_schedule(model, sched), sched, inputs)
    full = model(**dict(inputs, timestep=torch.full((2,), 501))).sample
    assert rel_err(got[1], full) > 1e-3
    want = run_steps(HookReference(model, sched), sched, inputs)
    assert rel_err(got[1], want[1]) < 1e-5


def test_new_generation_restarts_and_batch_resolution_change(model):
    sched = l2c.Schedule.from_mask(model, TS, [[[True] * len(l2c.adapters.adapter_for(model).branches(model))]
                                               * len(model.transformer_blocks)] + [[[s % 2 == 0] * len(
        l2c.adapters.adapter_for(model).branches(model))] * len(model.transformer_blocks) for s in range(1, len(TS))])
    fast = l2c.compile_schedule(model, sched)
    ref = HookReference(model, sched)
    for batch, size in [(2, 8), (4, 8), (2, 12), (2, 8)]:
        inputs = inputs_for(model, batch=batch, size=size, seed=batch + size)
        got = run_steps(fast, sched, inputs)
        want = run_steps(ref, sched, inputs)
        assert fast.current_step == len(TS) - 1
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))


def test_bf16_close_to_fp32(model):
    import copy

    sched = l2c.Schedule.full(model, TS[:2])
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    fast = l2c.compile_schedule(m16, sched)
    inputs = inputs_for(model)
    inp16 = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k != "encoder_attention_mask"
                 else v) for k, v in inputs.items()}
    out = fast(**inp16).sample
    assert out.dtype == torch.bfloat16
    # the reference for bf16 rounding is diffusers' own bf16 forward: both round the same computation at bf16's
    # unit roundoff (2^-8), in another order, so by the triangle inequality the runtime is at most twice as far
    # from fp32 as diffusers is (measured: 0.0064 / 0.0081 against 0.0079 / 0.0079 for DiT / PixArt)
    ref = model(**inputs).sample
    plain = m16(**inp16).sample.float()
    assert rel_err(out.float(), ref) <= 2 * rel_err(plain, ref)


def test_set_step_and_reset(model):
    br = l2c.adapters.adapter_for(model).branches(model)
    nb = len(model.transformer_blocks)
    sched = l2c.Schedule(timesteps=[981, 501], plan=[["C" * len(br)] * nb, ["R" * len(br)] * nb],
                         branches=br, num_blocks=nb)
    fast = l2c.compile_schedule(model, sched)
    inputs = inputs_for(model)
    fast.set_step(0)
    fast(**dict(inputs, timestep=torch.full((2,), 7)))  # any timestep: the step was set
    assert fast.current_step == 0
    fast(**dict(inputs, timestep=torch.full((2,), 501)))
    assert fast.current_step == 1
    fast.reset()
    fast.set_step(1)
    with pytest.raises(l2c.ScheduleError, match="not filled"):
        fast(**inputs)
    with pytest.raises(ValueError, match="out of range"):
        fast.set_step(2)


def test_model_not_modified_and_weights_shared(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, TS))
    fast(**inputs_for(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {p.data_ptr() for p in fast.parameters()} == {p.data_ptr() for p in model.parameters()}
    assert fast.config is model.config and fast.dtype == torch.float32


def test_plans_store_only_what_is_read_later():
    model = tiny_dit(layers=2)
    plan = [["CC", "CC"], ["RC", "B"], ["CC", "CC"], ["CR", "CC"]]
    sched = l2c.Schedule(timesteps=[4, 3, 2, 1], plan=plan, branches=["attn1", "ff"], num_blocks=2)
    p = compile_plans(sched)
    assert p[0].blocks[0].store == (True, False) and not p[0].blocks[0].store_delta
    assert p[0].blocks[1].store == (False, False) and p[0].blocks[1].store_delta
    assert p[2].blocks[0].store == (False, True)
    assert p[3].blocks[0].store == (False, False)
    assert p[0] is compile_plans(sched)[0] or p[0].key == compile_plans(sched)[0].key
    full = compile_plans(l2c.Schedule.full(model, [3, 2, 1]))
    assert full[0] is full[1] is full[2]


def test_torch_compile_fullgraph_per_plan():
    model = tiny_dit(layers=2)
    sched = l2c.Schedule(timesteps=[981, 501, 1], plan=[["CC", "CC"], ["RC", "CR"], ["CC", "RR"]],
                         branches=["attn1", "ff"], num_blocks=2)
    eager = l2c.compile_schedule(model, sched)
    compiled = l2c.compile_schedule(model, sched, torch_compile=dict(backend="eager"))
    inputs = inputs_for(model)
    for a, b in zip(run_steps(compiled, sched, inputs), run_steps(eager, sched, inputs)):
        assert rel_err(a, b) < 1e-6


# --------------------------------------------------------------------------- bad input
def test_unknown_timestep_names_both_step_lists(model):
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, TS))
    inputs = inputs_for(model)
    fast(**dict(inputs, timestep=torch.full((2,), TS[0])))
    with pytest.raises(l2c.ScheduleError, match=r"timestep 555 is not in this schedule.*981, 801"):
        fast(**dict(inputs, timestep=torch.full((2,), 555)))


def test_schedule_for_other_depth_or_branches_rejected():
    dit3, dit2, pix = tiny_dit(layers=3), tiny_dit(layers=2), tiny_pixart(layers=3)
    with pytest.raises(l2c.ScheduleError, match="3 blocks.*has 2"):
        l2c.compile_schedule(dit2, l2c.Schedule.full(dit3, TS))
    with pytest.raises(l2c.ScheduleError, match="branches"):
        l2c.compile_schedule(pix, l2c.Schedule.full(dit3, TS))
    with pytest.raises(l2c.ScheduleError, match="do not exist"):
        l2c.Schedule.from_mask(dit3, TS, [[[True]] * 3] * len(TS), branches=["attn2"])
    with pytest.raises(TypeError, match="not supported"):
        l2c.compile_schedule(torch.nn.Linear(2, 2), l2c.Schedule.full(dit3, TS))


def test_reuse_before_fill_rejected():
    with pytest.raises(l2c.ScheduleError, match="first step must compute everything"):
        l2c.Schedule(timesteps=[2, 1], plan=[["CR"], ["CC"]], branches=["attn1", "ff"], num_blocks=1)
    with pytest.raises(l2c.ScheduleError, match="as a whole before"):
        l2c.Schedule(timesteps=[2, 1], plan=[["B"], ["CC"]], branches=["attn1", "ff"], num_blocks=1)
    with pytest.raises(l2c.ScheduleError, match=r"plan\[1\]\[0\]"):
        l2c.Schedule(timesteps=[2, 1], plan=[["CC"], ["CX"]], branches=["attn1", "ff"], num_blocks=1)


def test_json_round_trip_and_bad_files(tmp_path):
    model = tiny_pixart()
    nb = len(model.transformer_blocks)
    sched = l2c.Schedule.from_mask(model, TS, [[[True] * 3] * nb] + [[[i % 2, 1, 0]] * nb for i in range(5)],
                                   method="learned", params={"budget": 0.4}, attn2_cache="cfg_mean")
    path = tmp_path / "s.json"
    sched.save(path)
    text = path.read_text()
    assert '"plan"' in text and "pickle" not in text and json.loads(text)["version"] == 1
    back = l2c.Schedule.load(path)
    assert back.to_dict() == sched.to_dict()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(l2c.ScheduleError, match="truncated"):
        l2c.Schedule.load(path)
    d = sched.to_dict()
    d["version"] = 99
    with pytest.raises(l2c.ScheduleError, match="version 99"):
        l2c.Schedule.from_dict(d)
    with pytest.raises(l2c.ScheduleError, match="not an l2c schedule"):
        l2c.Schedule.from_dict({"hello": 1})
    d = sched.to_dict()
    del d["plan"]
    with pytest.raises(l2c.ScheduleError, match="missing"):
        l2c.Schedule.from_dict(d)


def test_summary_counts_removed_work():
    sched = l2c.Schedule(timesteps=[3, 2, 1], plan=[["CC", "CC"], ["RR", "RR"], ["RC", "B"]],
                         branches=["attn1", "ff"], num_blocks=2, branch_flops={"attn1": 1, "ff": 3})
    s = sched.summary()
    assert s["removed_per_step"] == [0.0, 1.0, 0.75]
    assert s["removed_fraction"] == pytest.approx(7 / 12, abs=1e-4)
    # FLOPs: step 1 removes 8, step 2 removes attn1 of block 0 (1) + all of block 1 (4) = 13 of 24
    assert s["flops_removed_fraction"] == pytest.approx(13 / 24, abs=1e-4)
    assert "removed" in sched.format_summary()


def test_shape_change_mid_generation_rejected(model):
    sched = l2c.Schedule.full(model, TS)
    fast = l2c.compile_schedule(model, sched)
    fast(**inputs_for(model, batch=2, t=TS[0]))
    with pytest.raises(ValueError, match="shapes changed in the middle of a generation"):
        fast(**inputs_for(model, batch=4, t=TS[1]))


def test_odd_batch_with_cfg_mean_cache_rejected():
    model = tiny_pixart()
    nb = len(model.transformer_blocks)
    sched = l2c.Schedule(timesteps=[2, 1], plan=[["CCC"] * nb, ["CRC"] * nb], branches=["attn1", "attn2", "ff"],
                         num_blocks=nb, attn2_cache="cfg_mean")
    fast = l2c.compile_schedule(model, sched)
    with pytest.raises(ValueError, match="even batch"):
        fast(**inputs_for(model, batch=3, t=2))


# --------------------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
def test_cuda_graph_replay_matches_eager_and_counts_plans():
    model = tiny_dit(layers=3).cuda()
    plan = [["CC"] * 3, ["RC", "CR", "RR"], ["CC"] * 3, ["RC", "CR", "RR"], ["CC"] * 3, ["RR", "B", "RR"]]
    sched = l2c.Schedule(timesteps=TS, plan=plan, branches=["attn1", "ff"], num_blocks=3)
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs_for(model).items()}
    eager = l2c.compile_schedule(model, sched, cuda_graphs=False)
    graphed = l2c.compile_schedule(model, sched, cuda_graphs=True)
    for _ in range(2):  # second generation replays the captured graphs
        got = run_steps(graphed, sched, inputs)
        want = run_steps(eager, sched, inputs)
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))
    assert graphed.num_graphs() == graphed.distinct_plans() == 3
    graphed.release()
    assert graphed.num_graphs() == 0


def test_dit_timestep_embedding_cache_follows_timesteps_weights_and_mixed_batches():
    """The DiT adapter embeds each timestep value once per model (CPU eager); the result must still be
    the original model's for a repeated timestep, after an in-place weight update, and for a batch that
    mixes timesteps (which bypasses the cache)."""
    model = tiny_dit(seed=3)
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, TS))
    inputs = inputs_for(model, batch=3)
    with torch.no_grad():
        for _ in range(2):  # the second generation hits the cache
            for t in TS:
                inp = dict(inputs, timestep=torch.full((3,), t))
                assert rel_err(fast(**inp).sample, model(**inp).sample) < 1e-5
        lin = model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2
        lin.weight.mul_(1.5)  # bumps the parameter's version: cached embeddings are stale
        inp = dict(inputs, timestep=torch.full((3,), TS[0]))
        assert rel_err(fast(**inp).sample, model(**inp).sample) < 1e-5
        mixed = dict(inputs, timestep=torch.tensor([TS[0], TS[0], TS[1]]))
        fast.reset()
        ref = model(**mixed).sample
        fast.set_step(0)
        assert rel_err(fast(**mixed).sample, ref) < 1e-5


# ---------------------------------------------------------------------------------------------- linear forecast
@pytest.mark.parametrize("forecast", ["linear", "quadratic", "taylor"])
@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=34, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_forecast_random_schedules_match_hook_reference(name, forecast, data):
    """Reused outputs extrapolated from the last computations, against the hook reference (Lagrange
    form in float64 there), for random plans mixing computes, reuses and whole-block reuses."""
    model = MODELS[name]()
    base = _random_schedule(model, data)
    sched = l2c.Schedule(timesteps=TS, plan=base.plan, branches=base.branches, num_blocks=base.num_blocks,
                         model_class=base.model_class, forecast=forecast)
    inputs = inputs_for(model, batch=2)
    fast = l2c.compile_schedule(model, sched)
    ref = HookReference(model, sched)
    for gen in range(2):  # a second generation must not extrapolate from the first one's outputs
        got = run_steps(fast, sched, inputs)
        want = run_steps(ref, sched, inputs)
        for s, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) < 1e-5, f"generation {gen} step {s}: plan {sched.plan[s]}"


def test_linear_forecast_differs_from_hold_and_extrapolates_exactly(model):
    """C C R R: steps 2 and 3 add 2 y1 - y0 and 3 y1 - 2 y0 (y0, y1 in cache slots 0 and 1); plans carry those weights."""
    br = l2c.adapters.adapter_for(model).branches(model)
    nb = len(model.transformer_blocks)
    ts = [981, 801, 601, 401]
    plan = [["C" * len(br)] * nb] * 2 + [["R" * len(br)] * nb] * 2
    hold = l2c.Schedule(timesteps=ts, plan=plan, branches=br, num_blocks=nb, model_class=type(model).__name__)
    lin = l2c.Schedule.from_dict(dict(hold.to_dict(), forecast="linear"))
    plans = compile_plans(lin)
    n = len(br)
    assert plans[0].blocks[0].store == (True,) * n and plans[1].blocks[0].store == (True,) * n
    assert plans[0].blocks[0].slot == (0,) * n and plans[1].blocks[0].slot == (1,) * n
    assert plans[2].blocks[0].weights == ((-1.0, 2.0),) * n and plans[3].blocks[0].weights == ((-2.0, 3.0),) * n
    hold_plans = compile_plans(hold)
    assert all(bp.slot == (0,) * n for p in hold_plans for bp in p.blocks)
    assert hold_plans[2].blocks[0].weights == ((1.0,),) * n and hold_plans[3].blocks[0].weights == ((1.0,),) * n
    inputs = inputs_for(model)
    got_lin = run_steps(l2c.compile_schedule(model, lin), lin, inputs)
    got_hold = run_steps(l2c.compile_schedule(model, hold), hold, inputs)
    assert rel_err(got_lin[0], got_hold[0]) < 1e-6 and rel_err(got_lin[1], got_hold[1]) < 1e-6
    assert rel_err(got_lin[2], got_hold[2]) > 1e-4
    want = run_steps(HookReference(model, lin), lin, inputs)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got_lin, want))


def test_linear_forecast_stores_only_what_is_read():
    """An output is stored only when a later reuse extrapolates from it; slots alternate per computation."""
    model = tiny_dit()
    nb = len(model.transformer_blocks)
    rows = ["CC", "CC", "CC", "RR", "CC"]  # step 3 extrapolates from steps 1 and 2
    plan = [[r] * nb for r in rows]
    sched = l2c.Schedule(timesteps=[981, 801, 601, 401, 201], plan=plan, branches=["attn1", "ff"], num_blocks=nb,
                         model_class=type(model).__name__, forecast="linear")
    p = compile_plans(sched)
    assert [p[s].blocks[0].store for s in range(5)] == [(False, False), (True, True), (True, True),
                                                        (False, False), (False, False)]
    assert [p[s].blocks[0].slot for s in (0, 1, 2, 4)] == [(0, 0), (1, 1), (0, 0), (1, 1)]
    assert p[3].blocks[0].weights == ((2.0, -1.0),) * 2  # 2 y(step 2, slot 0) - y(step 1, slot 1)


def test_forecast_field_validated_and_round_trips(tmp_path):
    model = tiny_dit()
    sched = l2c.Schedule.full(model, TS)
    with pytest.raises(l2c.ScheduleError, match="forecast"):
        l2c.Schedule.from_dict(dict(sched.to_dict(), forecast="cubic"))
    lin = l2c.Schedule.from_dict(dict(sched.to_dict(), forecast="linear"))
    lin.save(tmp_path / "s.json")
    assert l2c.Schedule.load(tmp_path / "s.json").forecast == "linear"
    old = sched.to_dict()
    old.pop("forecast")
    assert l2c.Schedule.from_dict(old).forecast == "none"  # files written before the field existed


@pytest.mark.parametrize("forecast, w3, w4", [("quadratic", (1.0, -3.0, 3.0), (3.0, -8.0, 6.0)),
                                               ("taylor", (0.5, -2.0, 2.5), (2.0, -6.0, 5.0))])
def test_second_order_forecast_coefficients_and_output(model, forecast, w3, w4):
    """C C C R R: steps 3 and 4 add a second-order forecast from y0, y1, y2 (one step apart). Quadratic: the
    parabola through them, y0 - 3 y1 + 3 y2 and 3 y0 - 8 y1 + 6 y2. Taylor: d1 = y2 - y1, d2 = y2 - 2 y1 + y0 and
    y2 + h d1 + h^2 / 2 d2 at h = 1, 2: 0.5 y0 - 2 y1 + 2.5 y2 and 2 y0 - 6 y1 + 5 y2."""
    br = l2c.adapters.adapter_for(model).branches(model)
    nb = len(model.transformer_blocks)
    ts = [981, 801, 601, 401, 201]
    plan = [["C" * len(br)] * nb] * 3 + [["R" * len(br)] * nb] * 2
    sched = l2c.Schedule(timesteps=ts, plan=plan, branches=br, num_blocks=nb, model_class=type(model).__name__,
                         forecast=forecast)
    p = compile_plans(sched)
    n = len(br)
    assert [p[s].blocks[0].store for s in range(3)] == [(True,) * n] * 3
    assert [p[s].blocks[0].slot for s in range(3)] == [(0,) * n, (1,) * n, (2,) * n]
    assert p[3].blocks[0].weights == (w3,) * n
    assert p[4].blocks[0].weights == (w4,) * n
    inputs = inputs_for(model)
    got = run_steps(l2c.compile_schedule(model, sched), sched, inputs)
    want = run_steps(HookReference(model, sched), sched, inputs)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))
