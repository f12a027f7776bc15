"""Dynamic-cache peers of the comparison benchmark (bench/peers.py) and its table code (bench/bench_pareto.py)."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from l2c_kernels.schedule import Schedule
from l2c_kernels import models
from tests.tiny_models import dit_inputs, pixart_inputs, tiny_dit, tiny_pixart

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402

TIMESTEPS = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def generate(peer, inputs, timesteps=TIMESTEPS):
    """A short denoising loop on fixed inputs (what matters here is how often branches run)."""
    peer.reset()
    x = inputs["hidden_states"].clone()
    args = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    for t in timesteps:
        out = peer(x, timestep=torch.full((x.shape[0],), t), **args).sample
        x = x - 0.05 * out
    return x


SETTINGS = [
    peers.PeerSetting("fbc", dict(threshold=100.0)),
    peers.PeerSetting("pab", dict(skip=3, timestep_range=(-1, 1001))),
    peers.PeerSetting("taylorseer", dict(interval=3, order=1, warmup=2)),
    peers.PeerSetting("dbcache", dict(Fn=1, Bn=0, threshold=100.0, warmup=1)),
]


def expected_removed(setting, model) -> float:
    """The branch FLOPs each setting above removes over the 10 steps of ``generate``, from its rule alone.

    FirstBlockCache and DBCache (Fn=1, Bn=0) at threshold 100 always find the first block's change small: the
    other L-1 of L blocks compute at step 0 only. PAB with skip 3 computes self-attention at steps 0, 3, 6, 9.
    TaylorSeer computes the 2 warm-up steps, then every 3rd (2, 5, 8): 5 of 10."""
    from l2c_kernels.adapters import adapter_for

    n, nb = len(TIMESTEPS), len(model.transformer_blocks)
    flops = adapter_for(model).branch_flops(model)
    if setting.family in ("fbc", "dbcache"):
        return (nb - 1) / nb * (n - 1) / n
    if setting.family == "pab":
        return (n - 4) / n * flops["attn1"] / sum(flops.values())
    assert setting.family == "taylorseer"
    return 1 - 5 / n


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.family)
@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_peer_applies_resets_and_removes_branch_calls(setting, kind):
    if setting.family == "dbcache":
        pytest.importorskip("cache_dit")
    model = tiny_dit(layers=3) if kind == "dit" else tiny_pixart(layers=3)
    inputs = dit_inputs(batch=2) if kind == "dit" else pixart_inputs(batch=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = peers.make_peer(model, setting, len(TIMESTEPS))
    a = generate(p, inputs)
    removed = p.flops_removed_fraction(total=False)
    assert p.calls == len(TIMESTEPS)
    assert removed == pytest.approx(expected_removed(setting, model), abs=1e-12), removed
    # reset: a second generation repeats the first exactly, with the same branch calls
    b = generate(p, inputs)
    assert torch.equal(a, b)
    assert p.flops_removed_fraction(total=False) == pytest.approx(removed)
    # the original model is untouched (the peer hooks a copy) and still computes everything
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model.transformer_blocks[0], "_diffusers_hook")
    assert p.setting.label


def test_peer_that_never_skips_matches_the_model():
    model = tiny_dit(layers=2)
    p = peers.make_peer(model, peers.PeerSetting("fbc", dict(threshold=0.0)), len(TIMESTEPS))
    inputs = dit_inputs(batch=2)
    ref = generate(model_as_peer(model), inputs)
    out = generate(p, inputs)
    assert p.flops_removed_fraction(total=False) == 0.0
    assert torch.allclose(out, ref, atol=1e-5)


def model_as_peer(model):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def reset(self):
            pass

        def forward(self, x, **kw):
            return self.m(x, **kw)

    return Plain()


def test_peer_unavailable_says_why():
    with pytest.raises(peers.PeerUnavailable, match="cross-attention"):
        peers.make_peer(tiny_dit(layers=2), peers.PeerSetting("pab", dict(skip=2, cross_skip=4)), 10)
    with pytest.raises(ValueError, match="unknown peer"):
        peers.PeerTransformer(tiny_dit(layers=2), peers.PeerSetting("teacache", {}), 10)


def test_default_settings_cover_every_peer():
    fams = {s.family for s in peers.default_settings(tiny_pixart(layers=2), 20)}
    assert fams == set(peers.PEER_FAMILIES)


# ------------------------------------------------------------------------------------------- bench_pareto
def _row(family, label, speedup, psnr, removed, acc=1.0, kind="schedule"):
    return dict(family=family, label=label, kind=kind, speedup=speedup, psnr=psnr, ssim=0.9, accuracy=acc,
                flops_removed=removed, seconds=1.0 / speedup, ideal_speedup=1 / (1 - removed), params={})


def test_summary_picks_best_reaching_point_and_flags_unreachable():
    import bench_pareto as bp

    rows = [_row("full compute", "x", 1.0, float("inf"), 0.0, kind="full"),
            _row(bp.LEARNED, "40%", 1.46, 40.0, 0.40), _row(bp.LEARNED, "55%", 2.05, 31.0, 0.55),
            _row("uniform (FORA)", "every 2", 1.9, 30.0, 0.5), _row("uniform (FORA)", "every 3", 2.6, 27.0, 0.66),
            _row("diffusers PyramidAttentionBroadcast", "skip 2", 1.2, 45.0, 0.2, kind="peer"),
            _row("cache-dit DBCache", "t=0.1", 1.55, 38.0, 0.35, kind="peer"),
            _row("cache-dit DBCache", "t=0.4", 2.1, 32.0, 0.52, kind="peer")]
    s = bp.summarize(rows, full_accuracy=1.0)
    at15, at2, at3, at4 = s["by_speedup"]
    assert [e["target"] for e in s["by_speedup"]] == [1.5, 2.0, 3.0, 4.0]
    assert at3["learned"] is None and not at3["learned_wins"] and at4["best_peer"] is None   # nothing reaches them
    assert at15["learned"]["psnr"] == 40.0 and at15["best_peer"]["psnr"] == 38.0
    assert at15["best_baseline"]["label"] == "every 2"  # 1.9x counts at 1.5x (at least as fast)
    assert at15["learned_wins"] and at15["margin_db"] == pytest.approx(2.0)
    assert at15["per_family"]["diffusers PyramidAttentionBroadcast"]["unreachable"]
    assert at2["best_peer"]["psnr"] == 32.0 and not at2["learned_wins"]
    assert at2["best_baseline"]["label"] == "every 2"  # 1.9x is within 5% of 2x
    assert not s["goal_met"] and s["accuracy_within_goal_at_1_5x"]


def test_tiny_end_to_end_run_writes_json_table_and_plot(tmp_path):
    import bench_pareto as bp
    from l2c_kernels.models import BundledModel
    from l2c_kernels.models.configs import NOISE_SCHEDULE

    bundle = BundledModel("dit-digits", tiny_dit(layers=2), None, dict(NOISE_SCHEDULE))
    settings = [peers.PeerSetting("fbc", dict(threshold=100.0)),
                peers.PeerSetting("pab", dict(skip=2, cross_skip=2))]  # no cross-attention: recorded, not run
    res = bp.run(bundle, 4, cfg=1.5, budgets=(0.3, 0.5), samples=2, time_samples=2, repeats=1, out=tmp_path,
                 learn_kwargs=dict(iterations=2, batch_size=1), curve_runs=1, peer_settings=settings,
                 log=lambda s: None)
    fams = {r["family"] for r in res["rows"]}
    assert {"full compute", bp.LEARNED, "uniform (FORA)", "Block Caching", "random",
            "diffusers FirstBlockCache"} <= fams
    # timings vary, what is computed from them does not: each speedup is the median time of full compute
    # over the row's median time (one timed round here), and the ideal speedup follows the FLOPs removed
    full = res["rows"][0]
    assert full["family"] == "full compute" and full["flops_removed"] == 0.0 and full["psnr"] == float("inf")
    ref_t = statistics.median(full["seconds_all"])
    for r in res["rows"]:
        assert len(r["seconds_all"]) == 1 and r["seconds"] == statistics.median(r["seconds_all"]) > 0
        assert r["speedup"] == pytest.approx(ref_t / r["seconds"], rel=1e-12)
        assert 0 <= r["flops_removed"] < 1 and r["ideal_speedup"] == pytest.approx(1 / (1 - r["flops_removed"]))
    assert full["speedup"] == 1.0
    learned = Schedule.load(tmp_path / "pareto_dit-digits_4_schedules" / "learned_30.l2c.json")
    assert learned.flops_removed_fraction() >= 0.3 - 1e-9
    assert any(r["flops_removed"] == pytest.approx(learned.flops_removed_fraction(), abs=1e-12)
               for r in res["rows"] if r["family"] == bp.LEARNED)
    assert res["unavailable"] and "cross-attention" in res["unavailable"][0]["reason"]
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"pareto_dit-digits_4.{ext}").exists()
    assert (tmp_path / "pareto_dit-digits_4_schedules" / "learned_30.l2c.json").exists()
    data = json.loads((tmp_path / "pareto_dit-digits_4.json").read_text())
    assert data["summary"]["by_speedup"][0]["target"] == 1.5
    md = (tmp_path / "pareto_dit-digits_4.md").read_text()
    assert "## At 1.5x, 2x, 3x, 4x measured speedup" in md and "| family | setting | speedup |" in md
    assert "could not be applied" in md


# ------------------------------------------------------------------------------------------- Flux (block level)
FLUX_STEPS = 6


@pytest.fixture(scope="module")
def flux():
    from l2c_kernels.models import load

    return load("flux-digits")


def _flux_generate(bundle, transformer, seed=0, labels=(3,)):

    return models.sample(bundle, labels=list(labels), steps=FLUX_STEPS, seed=seed, transformer=transformer,
                           progress=False)


def _ran_counters(peer):
    """Independent of the peer's own counting: one hook per block on a layer that runs only when the block's
    computation starts (its adaLN modulation), one on each attention's query projection."""
    from l2c_kernels.adapters.patterns import find_blocks

    ran = {"block": [0] * peer.num_blocks, "attn": [0] * peer.num_blocks}
    for b, ref in enumerate(find_blocks(peer.inner)):
        norm = ref.module.norm1 if hasattr(ref.module, "norm1") else ref.module.norm
        norm.linear.register_forward_hook(lambda *_, b=b: ran["block"].__setitem__(b, ran["block"][b] + 1))
        ref.module.attn.to_q.register_forward_hook(lambda *_, b=b: ran["attn"].__setitem__(b, ran["attn"][b] + 1))
    return ran


def _linear_cost(module, streams):
    return sum(2.0 * m.weight.numel() / streams for m in module.modules() if isinstance(m, torch.nn.Linear))


FLUX_SETTINGS = [
    peers.PeerSetting("fbc", dict(threshold=100.0)),
    peers.PeerSetting("taylorseer", dict(interval=2, order=1, warmup=1, targets="default")),
    peers.PeerSetting("taylorseer", dict(interval=3, order=2, warmup=1, targets="blocks")),
    peers.PeerSetting("magcache", dict(threshold=100.0, max_skip_steps=2, retention_ratio=0.2,
                                       mag_ratios=[1.0] * FLUX_STEPS)),
    peers.PeerSetting("dbcache", dict(Fn=1, Bn=0, threshold=100.0, warmup=1)),
    peers.PeerSetting("dbcache", dict(Fn=4, Bn=0, threshold=100.0, warmup=1, calibrator="taylorseer")),
]


@pytest.mark.parametrize("setting", FLUX_SETTINGS, ids=lambda s: s.label)
def test_flux_peer_skips_blocks_and_counts_the_flops_of_the_calls_that_ran(flux, setting):
    if setting.family == "dbcache":
        pytest.importorskip("cache_dit")
    from l2c_kernels.adapters.patterns import estimate_block_flops, find_blocks

    tr = flux.transformer
    p = peers.make_peer(tr, setting, FLUX_STEPS)
    ran = _ran_counters(p)
    full = _flux_generate(flux, tr)
    out = _flux_generate(flux, p)
    assert p.calls == FLUX_STEPS and torch.isfinite(out).all()
    assert not torch.equal(out, full)  # it really reused something
    costs = estimate_block_flops(tr)
    refs = find_blocks(p.inner)
    if setting.family == "taylorseer" and setting.params["targets"] == "default":
        # attention predicted, the rest of every block computed: only the attention's share is removed
        assert ran["block"] == [FLUX_STEPS] * p.num_blocks
        attn = [_linear_cost(r.module.attn, len(r.pattern.returns)) for r in refs]
        expected = sum((FLUX_STEPS - n) * a for n, a in zip(ran["attn"], attn)) / (FLUX_STEPS * sum(costs))
    else:
        assert ran["attn"] == ran["block"]  # whole blocks: a block's attention runs exactly when the block does
        expected = 1.0 - sum(n * c for n, c in zip(ran["block"], costs)) / (FLUX_STEPS * sum(costs))
    assert expected > 0.05, ran
    assert p.flops_removed_fraction(total=False) == pytest.approx(expected, rel=1e-9)
    if setting.family in ("fbc", "dbcache"):
        fn = setting.params.get("Fn", 1)
        assert ran["block"][:fn] == [FLUX_STEPS] * fn  # the first blocks always run
    # reset: a second generation repeats the first, with the same calls
    again = _flux_generate(flux, p)
    assert torch.equal(again, out)
    assert p.flops_removed_fraction(total=False) == pytest.approx(expected, rel=1e-9)


def test_magcache_calibration_reads_the_magnitude_ratios_of_the_model(flux):
    """The ratios read back from diffusers' calibration run equal the MagCache formula computed with plain
    forward hooks: mean over tokens of |r_s| / |r_{s-1}|, r = last block's image output - first block's input."""
    tr = flux.transformer
    ratios = peers.calibrate_magcache(tr, FLUX_STEPS, lambda t: _flux_generate(flux, t, seed=900))
    res, first_in = [], []
    h1 = tr.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: first_in.append(kw["hidden_states"]), with_kwargs=True)
    h2 = tr.single_transformer_blocks[-1].register_forward_hook(
        lambda m, a, o: res.append(o[1] - first_in[-1]))
    try:
        _flux_generate(flux, tr, seed=900)
    finally:
        h1.remove()
        h2.remove()
    ref = [1.0] + [float((torch.linalg.norm(r, dim=-1) / (torch.linalg.norm(q, dim=-1) + 1e-8)).mean())
                   for q, r in zip(res, res[1:])]
    assert len(ratios) == FLUX_STEPS
    assert ratios == pytest.approx(ref, rel=1e-4)
    assert not any(a == b for a, b in zip(ratios[1:], ratios[2:]))  # measured, not a constant
    with pytest.raises(peers.PeerUnavailable, match="calibrated for 6 steps"):
        peers.make_peer(tr, peers.PeerSetting("magcache", dict(threshold=0.1, mag_ratios=ratios)), 8)


def test_flux_default_settings_cover_the_flux_peers(flux):
    tr = flux.transformer
    fams = {s.family for s in peers.default_settings(tr, 28)}
    assert fams == {"fbc", "taylorseer", "dbcache"}  # no MagCache without calibrated ratios
    sts = peers.default_settings(tr, 28, mag_ratios=[1.0] * 28)
    assert {s.family for s in sts} == set(peers.BLOCK_LEVEL_FAMILIES)
    db = [s.params for s in sts if s.family == "dbcache"]
    assert {p["Fn"] for p in db} == {1, 4} and {p["calibrator"] for p in db} == {None, "taylorseer"}
    with pytest.raises(peers.PeerUnavailable, match="cached per block"):
        peers.make_peer(tr, peers.PeerSetting("taylorseer", dict(interval=2)), 28)
