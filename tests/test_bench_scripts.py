"""The GPU check and the benchmarks it runs, rehearsed on CPU at tiny sizes, so that nothing breaks on a
lent GPU that a CPU could have found."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2c_kernels import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without CUDA")
def test_gpu_check_without_cuda_stops_at_once_and_says_why(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_e2e_benchmark_runs_end_to_end_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_e2e.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "e2e_tiny_cpu_fp32.json").read_text())
    rows = {(row["images"], row["runner"]): row for row in res["rows"]}
    for n in (1, 2):
        # the all-compute schedule computes what the original does (fp32: equal to rounding)
        assert rows[(n, "ours 0%")]["psnr_vs_eager_db"] > 100
        # steps 1 and 3 of 4 reuse every branch
        assert rows[(n, "ours 50%")]["branch_flops_removed"] == pytest.approx(0.5)
    assert (tmp_path / "e2e_tiny_cpu_fp32.md").read_text().startswith("# End-to-end sampling")


def test_ops_benchmark_reports_copy_bandwidth_fraction(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ops.py"), "--shapes", "dit-digits", "--dtypes",
                        "fp32", "--ops", "residual_apply_,gated_residual_ reuse", "--repeats", "3", "--sample-ms", "1",
                        "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "ops_cpu.json").read_text())
    assert {row["op"] for row in res["rows"]} == {"residual_apply_", "gated_residual_ reuse"}
    for row in res["rows"]:
        assert row["copy_gb_per_s"] > 0 and 0 < row["fused_fraction_of_copy_bw"]


def test_pareto_comparison_on_flux_digits_tiny_run(tmp_path):
    """The flux-digits path of bench_pareto at 3 Euler steps: every kind of method runs on the same noise,
    hand-made block schedules count FLOPs with each block's own cost, peers count the blocks that ran."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_pareto as bp
    import peers

    from l2c_kernels.adapters.patterns import estimate_block_flops
    from l2c_kernels.models import load
    from l2c_kernels.schedule import Schedule

    bundle = load("flux-digits")
    costs = estimate_block_flops(bundle.transformer)
    settings = [peers.PeerSetting("fbc", dict(threshold=100.0)),
                peers.PeerSetting("taylorseer", dict(interval=2, order=1, warmup=1, targets="blocks"))]
    res = bp.run(bundle, 3, budgets=(0.5,), samples=1, accuracy_samples=0, time_samples=1, repeats=1, out=tmp_path,
                 learn_kwargs=dict(iterations=2, batch_size=1, calibration_samples=1, structured_candidates=False,
                                   forecast="none"), curve_runs=1,
                 peer_settings=settings, log=lambda s: None)
    m = res["meta"]
    assert m["scheduler"] == "flow-euler" and m["cfg"] == bundle.recommended_cfg
    rows = {(r["family"], r["label"]): r for r in res["rows"]}
    fams = {f for f, _ in rows}
    assert {"full compute", bp.LEARNED, "uniform (FORA)", "DeepCache", "first blocks (static)", "random",
            "diffusers FirstBlockCache", "diffusers TaylorSeer"} <= fams
    assert "Block Caching" in fams or any(u["family"] == "Block Caching" for u in res["unavailable"])
    assert rows[("full compute (compiled)", "compile_schedule, nothing reused")]["psnr"] > 60  # fp32 rounding
    total = 3 * sum(costs)
    # FORA every 2 of 3 steps: step 1 reuses every block; F2 every 2: step 1 reuses blocks 2-7 (single-stream)
    assert rows[("uniform (FORA)", "every 2 steps")]["flops_removed"] == pytest.approx(sum(costs) / total)
    assert rows[("first blocks (static)", "F2 every 2")]["flops_removed"] == pytest.approx(sum(costs[2:]) / total)
    # FirstBlockCache with a threshold nothing reaches: block 0 always runs, blocks 1-7 are skipped at steps 1, 2
    assert rows[("diffusers FirstBlockCache", "FirstBlockCache t=100.0")]["flops_removed"] == pytest.approx(
        2 * sum(costs[1:]) / total)
    learned = Schedule.load(tmp_path / "pareto_flux-digits_3_schedules" / "learned_50.l2c.json")
    assert learned.branches == ["block"] and learned.params.get("cfg") == bundle.recommended_cfg
    assert learned.params["warm_up"] == 1   # "auto" at 3 steps and 50%: step 0
    assert {r["label"]: r["flops_removed"] for r in res["rows"] if r["family"] == bp.LEARNED} == {
        "budget 50%": pytest.approx(learned.flops_removed_fraction(), abs=1e-12)}
    # the static searchers at the same budget: at 3 steps and 50% only step 0 can be computed (2 of 3 steps reused)
    for name, fam in bp.SEARCHER_FAMILIES.items():
        sc = Schedule.load(tmp_path / "pareto_flux-digits_3_schedules" / f"{name}_50.l2c.json")
        assert sc.params["computed"] == [0]
        assert rows[(fam, f"budget 50%, {sc.forecast}")]["flops_removed"] == pytest.approx(2 / 3)
    assert rows[(bp.WARM_INTERVAL, "first 3 steps, then every 2, linear")]["flops_removed"] == 0.0
    assert all(r["worst_psnr"] <= r["psnr"] + 1e-9 for r in res["rows"])
    # rows that run the very schedule of an earlier row share its timed runs (timed once)
    named = {f"{r['family']}, {r['label']}": r for r in res["rows"]}
    for r in res["rows"]:
        if "timed_with" in r:
            assert r["seconds_all"] == named[r["timed_with"]]["seconds_all"] and r["speedup"] == pytest.approx(
                named[r["timed_with"]]["speedup"])
    md = (tmp_path / "pareto_flux-digits_3.md").read_text()
    assert "Euler flow matching 3 steps, CFG 7.0" in md and "best by at least 1 dB" in md and "Load average" in md
    assert (tmp_path / "pareto_flux-digits_3.png").exists()
    ratios = bp.magcache_ratios(bundle, 3, bundle.recommended_cfg, "flow-euler")
    assert len(ratios) == 3 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    # the learned row's PSNR is that of sampling its saved schedule directly (noise seed 100, the run's default)
    from l2c_kernels import compile_schedule, metrics

    ref = models.sample(bundle, labels=[0], steps=3, seed=100, progress=False)
    mine = models.sample(bundle, labels=[0], steps=3, seed=100, progress=False,
                         transformer=compile_schedule(bundle.transformer, learned))
    assert rows[(bp.LEARNED, "budget 50%")]["psnr"] == pytest.approx(metrics.psnr(mine, ref), rel=1e-6)


def test_pareto_speed_targets_checked_after_learning(tmp_path, monkeypatch):
    """``--speedups`` with the speed check: budgets placed from step costs timed as the table times, the front learned
    and saved, timed, and every target the refit moves by a step learned again and saved beside it; the table then
    reads a saved schedule at every budget returned, and the check is recorded."""
    import argparse

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_pareto as bp

    from l2c_kernels.models import load
    from l2c_kernels.schedule import Schedule

    bundle = load("flux-digits")
    # targets low enough for 8 steps whatever this machine's timings (a reused step costs well under half a full one)
    a = argparse.Namespace(cfg=None, steps=8, time_samples=1, speedups=[1.2, 1.4], speed_check=1, out=str(tmp_path))
    kw = dict(iterations=2, batch_size=1, calibration_samples=1, structured_candidates=False, forecast="none")
    budgets, speed = bp.speed_budgets(bundle, a, kw)
    chk = speed["check"]
    assert speed["speedups"] == [1.2, 1.4] and chk["rounds"] == 1 and chk["budgets"] == budgets
    assert len(chk["first_budgets"]) == len(chk["measured"]) == 2 and all(m > 0 for m in chk["measured"])
    # a budget moved only by a computed step (1/8) or more; the others are the placed ones
    assert all(b == b0 or abs(b - b0) >= 1 / 8 - 1e-4 for b, b0 in zip(budgets, chk["first_budgets"]))
    folder = tmp_path / "pareto_flux-digits_8_speed_schedules"
    for b in budgets:
        for name in ("learned", *bp.SEARCHER_FAMILIES):
            assert Schedule.load(folder / f"{name}_{round(100 * b)}.l2c.json").num_steps == 8
    # a check that moves the second target by two steps: it is learned again, its files saved beside the first
    from l2c_kernels.learn import speed as speed_mod

    def moved(front, bs, *args, **kw):
        return dict(measured=[1.0] * len(front), measured_again=None, refit=speed_mod.StepCost(0.1, 1.2),
                    budgets=[bs[0], bs[1] + 0.25], redo=[1])
    monkeypatch.setattr(speed_mod, "check_front", moved)
    budgets, speed = bp.speed_budgets(bundle, a, kw)
    assert budgets[1] == pytest.approx(speed["check"]["first_budgets"][1] + 0.25, abs=1e-4)
    assert Schedule.load(folder / f"learned_{round(100 * budgets[1])}.l2c.json").params["budget"] == pytest.approx(
        budgets[1], abs=1e-4)


def test_pareto_times_equal_work_once_whoever_found_it():
    """Two rows whose steps compute the same units (in any order) with the same forecast run the same work: one
    timing key; another forecast or another count of computed steps is other work, and full compute and peers are
    each their own."""
    sys.path.insert(0, str(ROOT / "bench"))
    import dataclasses

    import bench_pareto as bp

    from l2c_kernels.models import load
    from l2c_kernels.schedules import computed_steps

    tr = load("flux-digits").transformer
    ts = list(range(900, 0, -100))
    a = computed_steps(tr, ts, [0, 1, 2, 5, 8], forecast="linear")
    same = dataclasses.replace(a, method="dpcache", params=dict(budget=0.5, note="another searcher"))
    moved = computed_steps(tr, ts, [0, 1, 3, 4, 7], forecast="linear")   # other steps, as many of them
    key = bp._work_key
    assert key(dict(family="x", schedule=a), 3) == key(dict(family="y", schedule=same), 7) == key(
        dict(family="z", schedule=moved), 2)
    assert key(dict(family="x", schedule=a), 3) != key(dict(family="x", schedule=dataclasses.replace(
        a, forecast="quadratic")), 3)
    assert key(dict(family="x", schedule=a), 3) != key(dict(family="x", schedule=computed_steps(
        tr, ts, [0, 1, 2, 4, 6, 8], forecast="linear")), 3)
    assert key(dict(family="full compute"), 0) != key(dict(family="a peer"), 1)
    assert key(dict(family="full compute", schedule=a), 0) != key(dict(family="x", schedule=a), 1)


def test_branch_latency_benchmark_runs_at_two_tiny_sizes(tmp_path):
    """bench_compile_schedule.py at branch level end to end at 4 and 9 image tokens, 3 steps: one table per size, the
    FLOPs each schedule removes counted as the masks say, and the uniform 75% row's computed / reused steps split out."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_compile_schedule.py"), "--model", "flux", "--level",
                        "branch", "--steps", "3", "--image-sides", "2", "3", "--text-tokens", "4", "--repeats", "1",
                        "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "compile_schedule_cpu_flux_branches.json").read_text())
    assert [sz["image_tokens"] for sz in res["sizes"]] == [4, 9]
    for sz in res["sizes"]:
        rows = {row["schedule"]: row for row in sz["rows"]}
        assert rows["compiled 0%"]["unit_flops_removed"] == 0.0
        # 3 steps, step 0 always computed: uniform 50% reuses step 1 (every unit), 75% steps 1 and 2
        assert rows["compiled uniform 50%"]["unit_flops_removed"] == pytest.approx(1 / 3, abs=1e-3)
        assert rows["compiled uniform 75%"]["unit_flops_removed"] == pytest.approx(2 / 3, abs=1e-3)
        split = sz["uniform_75_steps"]
        assert split["reused_step_ms"] > 0 and split["computed_step_ms"] > 0
    md = (tmp_path / "compile_schedule_cpu_flux_branches.md").read_text()
    assert md.count("## ") == 2 and "fully reused step ms" in md
    assert res["meta"]["command"].startswith("python bench/bench_compile_schedule.py --model flux --level branch")
    assert md.rstrip().endswith(f"Regenerate: `{res['meta']['command']}`")


def test_block_latency_benchmark_runs_at_a_tiny_size(tmp_path):
    """bench_compile_schedule.py at block level (once bench_blocks.py), 4 steps: 0/25/50/75% and the spread row."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_compile_schedule.py"), "--model", "flux",
                        "--steps", "4", "--image-side", "2", "--text-tokens", "4", "--repeats", "1", "--threads", "1",
                        "--tag", "tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "compile_schedule_cpu_flux_tiny.json").read_text())
    rows = {row["schedule"]: row for row in res["rows"]}
    assert list(rows) == ["compiled 0%", "compiled 25%", "compiled 50%", "compiled 75%", "compiled 50% spread"]
    # 4 steps, step 0 always computed: 25% reuses step 3, 50% steps 1 and 3, 75% steps 1-3
    assert [rows[k]["block_flops_removed"] for k in list(rows)[:4]] == pytest.approx([0, 0.25, 0.5, 0.75], abs=1e-4)
    assert res["image_tokens"] == 4 and res["original_step_ms"] > 0


def test_front_benchmark_tiny_run_writes_its_tables_and_its_schedules(tmp_path):
    """bench_front at 4 flux-digits steps and one budget: the learned row, the fixed intervals and the three static
    searchers on 2 held-out digits; the schedules in a folder of its own (not the timed tables'), with the command."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_front.py"), "--model", "flux-digits", "--steps", "4",
                        "--budgets", "0.5", "--samples", "2", "--threads", "1", "--relearn", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "front_flux-digits_4.json").read_text())
    fams = {row["family"] for row in res["rows"]}
    assert {"learned (L2C)", "fixed interval", "DPCache-style search (static)", "CEM-style search (static)",
            "LeMiCa-style search (static)"} <= fams
    assert res["meta"]["command"].startswith("python bench/bench_front.py --model flux-digits --steps 4")
    for row in res["rows"]:
        assert row["worst"] <= row["psnr"] + 1e-9
    sched_dir = tmp_path / "front_flux-digits_4_schedules"
    assert not (tmp_path / "pareto_flux-digits_4_schedules").exists()
    assert {p.name for p in sched_dir.iterdir()} == {"learned_50.l2c.json", "dpcache_50.l2c.json", "cem_50.l2c.json",
                                                    "lemica_50.l2c.json"}
    assert "Regenerate: `python bench/bench_front.py" in (tmp_path / "front_flux-digits_4.md").read_text()
    # the 4-step front resampled to 6 steps, beside the 6-step front and FORA
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_front.py"), "--model", "flux-digits", "--steps", "6",
                        "--budgets", "0.5", "--samples", "2", "--threads", "1", "--resample-from", "4", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "resample_flux-digits.json").read_text())
    assert [row["family"] for row in res["rows"]] == ["learned for 4 steps, resampled", "learned for 6 steps",
                                                      "uniform (FORA)"]
    assert res["from_steps"] == 4 and res["to_steps"] == 6 and "--resample-from 4" in res["meta"]["command"]
