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
