"""The schedule file format: JSON round trip and mutations (hypothesis), every validator, bad files
given to ``l2c show`` / ``l2c bench``, duplicate timesteps (Heun), and the heatmap's decisions."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import l2c_kernels as l2c
from l2c_kernels.schedule import FORECASTS, Schedule, ScheduleError, next_step_index
from tests.tiny_models import dit_inputs, tiny_dit, tiny_pixart

# schedule construction is pure Python on a few dozen cells: hundreds of examples take about a second
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------ valid schedules

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
timestep = st.one_of(st.integers(-10, 1000), st.floats(0, 1000, allow_nan=False, allow_infinity=False))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6), finite, st.text(max_size=6))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                         max_size=3), max_leaves=6)


@st.composite
def schedules(draw):
    branches = draw(st.sampled_from([["attn1", "ff"], ["attn1", "attn2", "ff"], ["block"]]))
    nb, steps, nbr = draw(st.integers(1, 4)), draw(st.integers(1, 6)), len(branches)
    cell = st.text(alphabet="CR", min_size=nbr, max_size=nbr)
    if branches != ["block"]:
        cell = st.one_of(cell, st.just("B"))
    plan = [["C" * nbr] * nb] + [draw(st.lists(cell, min_size=nb, max_size=nb)) for _ in range(steps - 1)]
    return Schedule(
        timesteps=draw(st.lists(timestep, min_size=steps, max_size=steps)), plan=plan, branches=branches,
        num_blocks=nb, model_class=draw(st.text(max_size=8)), method=draw(st.text(max_size=8)),
        params=draw(st.dictionaries(st.text(max_size=4), json_value, max_size=3)),
        branch_flops=draw(st.fixed_dictionaries({b: st.floats(0, 1e12) for b in branches})),
        attn2_cache=draw(st.sampled_from(["per_sample", "cfg_mean"])), forecast=draw(st.sampled_from(FORECASTS)),
        unit_flops=draw(st.one_of(st.just([]), st.lists(st.floats(0, 1e9), min_size=nb, max_size=nb))),
        sampler=draw(st.one_of(st.just({}), st.fixed_dictionaries({"class": st.text(max_size=8), "shift": finite}))))


def reload(text: str) -> Schedule:
    return Schedule.from_dict(json.loads(text))


@FAST
@given(schedules())
def test_json_round_trip(s):
    """Saved and loaded, every schedule is equal to itself and saves to the same text."""
    back = reload(s.to_json())
    assert back == s
    assert back.to_json() == s.to_json()
    assert back.summary() == s.summary()


def _same(a, b) -> bool:
    """JSON values equal, numbers by value (981 == 981.0), NaN equal to NaN."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


FIELDS = ["format", "version", "model_class", "num_blocks", "branches", "attn2_cache", "forecast", "method",
          "params", "branch_flops", "unit_flops", "sampler", "timesteps", "plan"]
any_json = st.one_of(json_value, st.floats())  # NaN and infinities included, as json.dumps writes them


@st.composite
def mutations(draw):
    """A valid schedule's JSON with one mutation: a field replaced, deleted or added, a timestep or plan
    row or cell replaced, a row or timestep dropped or duplicated, or the text truncated."""
    s = draw(schedules())
    d = json.loads(s.to_json())
    kind = draw(st.sampled_from(["field", "delete", "extra", "timestep", "row", "cell", "drop", "dup", "truncate"]))
    if kind == "field":
        d[draw(st.sampled_from(FIELDS))] = draw(any_json)
    elif kind == "delete":
        d.pop(draw(st.sampled_from(FIELDS)), None)
    elif kind == "extra":
        d[draw(st.text(max_size=6))] = draw(any_json)
    elif kind == "timestep":
        d["timesteps"][draw(st.integers(0, len(d["timesteps"]) - 1))] = draw(any_json)
    elif kind == "row":
        d["plan"][draw(st.integers(0, len(d["plan"]) - 1))] = draw(any_json)
    elif kind == "cell":
        row = d["plan"][draw(st.integers(0, len(d["plan"]) - 1))]
        row[draw(st.integers(0, len(row) - 1))] = draw(st.one_of(st.text(alphabet="CRBX", max_size=4), any_json))
    elif kind in ("drop", "dup"):
        key = draw(st.sampled_from(["timesteps", "plan"]))
        i = draw(st.integers(0, len(d[key]) - 1))
        d[key] = d[key][:i] + d[key][i + 1:] if kind == "drop" else d[key][:i + 1] + d[key][i:]
    text = json.dumps(d)
    if kind == "truncate":
        text = text[:draw(st.integers(0, len(text) - 1))]
    return text


@FAST
@given(mutations())
def test_every_mutation_loads_to_what_the_file_says_or_raises_schedule_error(tmp_path_factory, text):
    """A mutated file either raises :class:`ScheduleError` (nothing else: no TypeError, KeyError, ...) or
    loads to a valid schedule whose fields are exactly what the file says (no silent coercion; absent
    optional fields take their defaults) and which saves and loads back unchanged."""
    path = tmp_path_factory.getbasetemp() / "mutated.l2c.json"
    path.write_text(text)
    try:
        s = Schedule.load(path)
    except ScheduleError:
        return
    d = json.loads(text)
    saved = s.to_dict()
    for k in FIELDS:
        if k in d and k in saved:
            assert _same(saved[k], d[k]), (k, saved[k], d[k])
        elif k in d:  # omitted when saved: only empty optional fields
            assert k in ("unit_flops", "sampler") and d[k] in ([], {}), (k, d[k])
    assert reload(s.to_json()) == s


# ------------------------------------------------------------------------------ validators, one by one

TS = [981, 781, 581, 381, 181]


def valid_dict(model=None) -> dict:
    model = model or tiny_dit(layers=2)
    return Schedule.full(model, TS).to_dict()


@pytest.mark.parametrize("change,words", [
    (dict(plan=[["CC", "CC"]] * 4), "plan has 4 steps but there are 5 timesteps"),
    (dict(timesteps=[], plan=[]), "at least one step"),
    (dict(attn2_cache="mean"), "attn2_cache must be"),
    (dict(forecast="cubic"), "forecast must be one of"),
    (dict(branches=["attn1", "mlp"]), "branches must be"),
    (dict(branches=["ff", "ff"]), "duplicate branch"),
    (dict(num_blocks=3), "plan step 0 has 2 blocks"),
    (dict(num_blocks=2.0), "num_blocks must be a positive integer"),
    (dict(num_blocks=True), "num_blocks must be a positive integer"),
    (dict(num_blocks="2"), "num_blocks must be a positive integer"),
    (dict(plan=[["CC", "CC"], ["RX", "CC"], ["CC"] * 2, ["CC"] * 2, ["CC"] * 2]), r"plan\[1\]\[0\] = 'RX'"),
    (dict(plan=[["CC", "CC"], "CCCC", ["CC"] * 2, ["CC"] * 2, ["CC"] * 2]), r"plan\[1\] must be a list"),
    (dict(plan=[["CR", "CC"]] + [["CC"] * 2] * 4), "reuses ff of block 0 before any earlier step computed it"),
    (dict(plan=[["CC", "B"]] + [["CC"] * 2] * 4), "reuses block 1 as a whole before"),
    (dict(timesteps=["981", "781", "581", "381", "181"]), r"timesteps\[0\] = '981' is not a finite number"),
    (dict(timesteps=[981, 781, float("nan"), 381, 181]), r"timesteps\[2\] = nan is not a finite number"),
    (dict(timesteps=[981, 781, 581, float("inf"), 181]), r"timesteps\[3\] = inf is not a finite number"),
    (dict(timesteps=[981, True, 581, 381, 181]), r"timesteps\[1\] = True"),
    (dict(timesteps=[981, [781], 581, 381, 181]), r"timesteps\[1\]"),
    (dict(timesteps="981,781"), "timesteps must be a list"),
    (dict(branch_flops={"attn1": "many"}), "branch_flops must map"),
    (dict(branch_flops={"attn1": float("nan")}), "branch_flops must map"),
    (dict(params=[1, 2]), "params must be a JSON object"),
    (dict(params={"t": torch.ones(1)}), "params must be JSON-serialisable"),
    (dict(model_class=None), "model_class must be a string"),
    (dict(unit_flops=0), "unit_flops must list"),
    (dict(unit_flops=[1.0]), "unit_flops must list"),
    (dict(sampler=[]), "sampler must be"),
    (dict(format="other"), "not an l2c schedule"),
    (dict(version=2), "version 2 is not supported"),
])
def test_each_validator_names_the_problem(change, words):
    d = dict(valid_dict(), **change)
    with pytest.raises(ScheduleError, match=words):
        Schedule.from_dict(d)


@pytest.mark.parametrize("field", ["num_blocks", "branches", "timesteps", "plan"])
def test_missing_field_is_named(field):
    d = valid_dict()
    del d[field]
    with pytest.raises(ScheduleError, match=f"missing fields \\['{field}'\\]"):
        Schedule.from_dict(d)


@pytest.mark.parametrize("text,words", [
    ("", "not valid JSON"),
    ('{"format": "l2c-schedule", "version": 1, "timesteps": [981', "not valid JSON"),
    ("[1, 2, 3]", "not an l2c schedule"),
    ("null", "not an l2c schedule"),
])
def test_empty_truncated_or_foreign_files(tmp_path, text, words):
    p = tmp_path / "bad.l2c.json"
    p.write_text(text)
    with pytest.raises(ScheduleError, match=words):
        Schedule.load(p)


def test_non_finite_timesteps_in_the_file_are_refused(tmp_path):
    """Python's JSON reader accepts NaN and Infinity; a schedule must not."""
    d = valid_dict()
    for bad in ("NaN", "Infinity", "-Infinity"):
        p = tmp_path / "t.json"
        p.write_text(json.dumps(d).replace('"timesteps": [981', f'"timesteps": [{bad}'))
        with pytest.raises(ScheduleError, match=r"timesteps\[0\]"):
            Schedule.load(p)


def test_save_leaves_an_existing_file_whole_when_it_fails(tmp_path):
    m = tiny_dit(layers=2)
    p = tmp_path / "s.l2c.json"
    good = Schedule.full(m, TS)
    good.save(p)
    before = p.read_text()
    bad = Schedule.full(m, TS)
    bad.params["when"] = object()  # set after validation: not serialisable
    with pytest.raises(TypeError, match="not JSON serializable"):
        bad.save(p)
    assert p.read_text() == before and Schedule.load(p) == good
    assert [f.name for f in tmp_path.iterdir()] == ["s.l2c.json"]  # no temporary file left behind


def test_from_mask_shape_errors():
    m = tiny_dit(layers=2)
    ok = [[[True, True]] * 2] * len(TS)
    Schedule.from_mask(m, TS, ok)
    with pytest.raises(ScheduleError, match="mask has 4 steps but 5 timesteps"):
        Schedule.from_mask(m, TS, ok[:4])
    with pytest.raises(ScheduleError, match="mask step 2 has 3 blocks; DiTTransformer2DModel has 2"):
        Schedule.from_mask(m, TS, ok[:2] + [[[True, True]] * 3] + ok[3:])
    with pytest.raises(ScheduleError, match=r"mask\[1\]\[0\] has 3 entries; expected one per branch"):
        Schedule.from_mask(m, TS, ok[:1] + [[[True] * 3, [True, True]]] + ok[2:])
    with pytest.raises(ScheduleError, match=r"branches \['attn2'\] do not exist in DiTTransformer2DModel"):
        Schedule.from_mask(m, TS, [[[True]] * 2] * len(TS), branches=["attn2"])
    with pytest.raises(ScheduleError, match="reuses attn1 of block 0 before any earlier step computed it"):
        Schedule.from_mask(m, TS, torch.zeros(len(TS), 2, 2, dtype=torch.bool))  # a tensor mask; step 0 must compute


def test_schedule_for_another_model_is_refused():
    """Same depth and branch names but another class, another depth, other branches: each is named."""
    dit, pix = tiny_dit(layers=2), tiny_pixart(layers=2)
    s = Schedule.full(dit, TS)
    other_class = Schedule.from_dict(dict(s.to_dict(), model_class="OtherTransformer2DModel"))
    with pytest.raises(ScheduleError, match="made for OtherTransformer2DModel, not DiTTransformer2DModel"):
        l2c.compile_schedule(dit, other_class)
    with pytest.raises(ScheduleError, match="made for 2 blocks .* but DiTTransformer2DModel has 3"):
        l2c.compile_schedule(tiny_dit(layers=3), s)
    with pytest.raises(ScheduleError, match=r"branches \['attn1', 'ff'\] do not match PixArtTransformer2DModel"):
        l2c.compile_schedule(pix, s)


# ------------------------------------------------------------------------------ duplicate timesteps (Heun)

def heun_timesteps(steps: int = 4) -> list:
    from diffusers import HeunDiscreteScheduler

    sc = HeunDiscreteScheduler()
    sc.set_timesteps(steps)
    return [float(t) for t in sc.timesteps]


def test_duplicate_timesteps_are_told_apart_by_step_index():
    """Second-order samplers call the model twice at most timesteps: a schedule keeps every call and
    finds each by its position after the previous step, not by the timestep alone."""
    ts = heun_timesteps(4)
    assert len(ts) == 7 and len(set(ts)) == 4  # 981 once, then each later timestep twice
    m = tiny_dit(layers=2)
    mask = [[[s % 2 == 0, True]] * 2 for s in range(len(ts))]
    mask[0] = [[True, True]] * 2
    s = Schedule.from_mask(m, ts, mask)
    assert s.num_steps == 7 and Schedule.from_dict(json.loads(s.to_json())) == s
    walk, cur = [], None
    for t in ts:
        cur = next_step_index(s.timesteps, t, cur)
        walk.append(cur)
    assert walk == list(range(7))
    assert s.step_index(ts[1]) == 1 and s.step_index(ts[2], after=1) == 2 and s.step_index(ts[1], after=2) == 1


def test_compiled_module_follows_duplicate_timesteps_step_by_step():
    from tests.runtime.hook_reference import HookReference

    ts = heun_timesteps(3)
    m = tiny_dit(layers=2)
    plan_mask = [[[True, True]] * 2] + [[[s % 2 == 0, s % 3 != 1]] * 2 for s in range(1, len(ts))]
    sched = Schedule.from_mask(m, ts, plan_mask)
    fast = l2c.compile_schedule(m, sched, cuda_graphs=False)
    ref = HookReference(m, sched)
    base = dit_inputs(batch=2)
    for s, t in enumerate(ts):
        inp = dict(base, timestep=torch.full((2,), t))
        out = fast(**inp).sample
        assert fast.current_step == s
        # fused residual adds round differently from the hooked model: a few fp32 ulps per op
        torch.testing.assert_close(out, ref.step(s, inp), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ the command line

@pytest.mark.parametrize("command", ["show", "bench"])
@pytest.mark.parametrize("text,words", [
    ("", "not valid JSON"),
    ('{"format": "l2c-schedule", "version": 1, "num_blocks": 12, "branches": ["attn1", "ff"], '
     '"timesteps": ["981"], "plan": [["CC"]]}', r"timesteps\[0\] = '981'"),
    ('{"format": "l2c-schedule", "version": 1, "num_blocks": 1, "branches": ["attn1", "ff"], '
     '"timesteps": [981, 961], "plan": [["CC"]]}', "plan has 1 steps but there are 2 timesteps"),
])
def test_corrupt_schedule_given_to_the_command_line(tmp_path, capsys, command, text, words):
    from l2c_kernels.cli import main

    p = tmp_path / "bad.l2c.json"
    p.write_text(text)
    png = tmp_path / "bad.png"
    argv = [command, str(p)] + (["--png", str(png)] if command == "show" else ["--samples", "1", "--repeats", "1"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("l2c: error:") and "Traceback" not in err
    assert re.search(words, err), err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.l2c.json"]  # no heatmap or report written


# ------------------------------------------------------------------------------ the heatmap

def test_heatmap_shows_the_decision_of_every_cell(tmp_path):
    from l2c_kernels.plots import DECISIONS, decision_grid, schedule_heatmap

    plan = [["CC"] * 3, ["CR", "B", "RC"], ["RR", "CC", "B"]]
    s = Schedule(timesteps=[3, 2, 1], plan=plan, branches=["attn1", "ff"], num_blocks=3)
    g = decision_grid(s)
    names = [n for n, _ in DECISIONS]
    assert [[names[g[1, b, i]] for i in range(2)] for b in range(3)] == [
        ["computed", "reused"], ["block reused", "block reused"], ["reused", "computed"]]
    lin = Schedule.from_dict(dict(s.to_dict(), forecast="linear"))
    assert names[decision_grid(lin)[2, 0, 0]] == "forecast" and names[decision_grid(lin)[2, 0, 1]] == "forecast"
    assert (decision_grid(lin) == 0).sum() == (g == 0).sum()
    out = schedule_heatmap(lin, tmp_path / "h.png")
    assert out.stat().st_size > 1000
