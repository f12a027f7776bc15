"""The benchmarks' harness (bench/harness.py): its timing summaries (the loop itself: test_timing.py), the facts a
result records, and the one writer (JSON and Markdown that agree, the command that regenerates them)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402


from tests.test_timing import FakeClock, fake_runners  # noqa: E402


def test_medians_and_spreads_are_those_of_the_timed_rounds():
    clock = FakeClock()
    times = harness.interleave(fake_runners(clock, dict(a=[5, 1, 3, 100], b=[2, 8, 4, 6]), []), 4, warmup=0,
                               clock=clock)
    assert statistics.median(times["a"]) == 4.0 and statistics.median(times["b"]) == 5.0
    assert harness.spread(times["a"]) == [1, 100] and harness.spread([0.0012, 0.0034], 1e3, 3) == [1.2, 3.4]
    # rounds timed step by step: round k is step k mod 2, three generations
    seconds = [1, 10, 3, 30, 2, 20]
    assert harness.step_medians(seconds, 2) == [2, 20]
    assert harness.generation_means(seconds, 2) == [5.5, 16.5, 11.0]


def test_write_result_records_the_command_and_the_machine_and_the_markdown_agrees(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "bench_example.py"), "ignored"])
    monkeypatch.setitem(harness._RUN, "argv", None)
    ap = harness.parser("An example.", threads=1)
    ap.add_argument("--title", default="")
    args = harness.parse(ap, ["--title", "two words", "--threads", "1", "--out", str(tmp_path)])
    data = dict(rows=[dict(x=1)], meta=dict(model="tiny"))
    path = harness.write_result(args.out, "example", data, "# Example\n\n| x |\n|---|\n| 1 |\n")
    saved = json.loads(path.read_text())
    m = saved["meta"]
    assert m["command"] == f"python bench/bench_example.py --title 'two words' --threads 1 --out {tmp_path}"
    assert m["model"] == "tiny" and saved["rows"] == [dict(x=1)]   # the script's own entries are kept
    for key in ("date", "device", "cpu", "cores", "threads", "python", "torch", "diffusers", "l2c_kernels",
                "load_average_start", "load_average_end", "wall_seconds"):
        assert key in m, key
    md = (tmp_path / "example.md").read_text()
    assert md.startswith("# Example") and md.endswith(f"\n\nRegenerate: `{m['command']}`\n")
    assert data["meta"] == m   # what the script holds is what was written


def test_a_rewritten_result_keeps_its_own_meta(tmp_path):
    data = dict(rows=[], meta=dict(command="python bench/bench_old.py --x 1", date="2026-01-01"))
    harness.write_result(tmp_path, "old", data, "# Old", add_meta=False)
    assert json.loads((tmp_path / "old.json").read_text())["meta"] == dict(command="python bench/bench_old.py --x 1",
                                                                            date="2026-01-01")
    assert (tmp_path / "old.md").read_text() == "# Old\n\nRegenerate: `python bench/bench_old.py --x 1`\n"


def test_facts_and_header_line():
    m = harness.meta()
    assert m["cores"] >= 1 and m["threads"] >= 1 and m["torch"] and m["python"]
    line = harness.describe(m)
    assert m["device"] in line and f"torch {m['torch']}" in line and m["date"] in line
    # results written before the harness recorded less: the line says what there is
    assert harness.describe(dict(device="CPU (2 threads)", torch="2.0", date="2026-01-01")) == \
        "CPU (2 threads), torch 2.0, 2026-01-01"
    assert harness.table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]


@pytest.mark.parametrize("argv, expect", [([], "compile_schedule"), (["nope"], "unknown case")])
def test_python_m_bench_lists_the_cases(argv, expect):
    r = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert expect in r.stdout + r.stderr and "pareto" in r.stdout
    assert r.returncode == (0 if not argv else 2)
