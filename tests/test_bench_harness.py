"""The benchmarks' harness (bench/harness.py): interleaved timing on fake runners and clocks, the facts a result
records, and the one writer (JSON and Markdown that agree, the command that regenerates them)."""
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


class FakeClock:
    """A clock that only moves when a runner says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_runners(clock, durations: dict, calls: list) -> dict:
    """Runners that log their name and advance ``clock`` by their next duration."""
    left = {k: list(v) for k, v in durations.items()}

    def runner(name):
        def run(*args):
            calls.append((name, *args))
            clock.now += left[name].pop(0) if left[name] else 0.0
        return run
    return {name: runner(name) for name in durations}


def test_interleaved_rounds_call_every_runner_once_per_round_in_rotating_order():
    clock, calls = FakeClock(), []
    runners = fake_runners(clock, dict(a=[9, 1, 2, 3], b=[9, 4, 5, 6], c=[9, 7, 8, 9]), calls)
    times = harness.interleave(runners, 3, warmup=1, clock=clock)
    order = [c[0] for c in calls]
    assert order == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]
    # the warm-up round (9 s each) is not timed; each timed call is credited to its own runner
    assert times == dict(a=[1, 2, 3], b=[4, 5, 6], c=[7, 8, 9])


def test_shuffled_rounds_hold_every_runner_once_and_are_reproducible():
    def orders(seed):
        clock, calls = FakeClock(), []
        harness.interleave(fake_runners(clock, {k: [] for k in "abcde"}, calls), 6, warmup=0, order="shuffle",
                           seed=seed, clock=clock)
        names = [c[0] for c in calls]
        return [names[i:i + 5] for i in range(0, 30, 5)]
    rounds = orders(3)
    assert all(sorted(r) == list("abcde") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    assert orders(3) == rounds


def test_rounds_given_as_arguments_pass_one_to_every_runner():
    clock, calls = FakeClock(), []
    harness.interleave(fake_runners(clock, dict(a=[], b=[]), calls), [10, 20, 10, 20], warmup=[10, 20], clock=clock)
    assert calls[:4] == [("a", 10), ("b", 10), ("a", 20), ("b", 20)]          # warm-up: one step each
    assert calls[4:] == [("a", 10), ("b", 10), ("b", 20), ("a", 20), ("a", 10), ("b", 10), ("b", 20), ("a", 20)]


def test_stop_ends_the_timing_and_after_round_sees_every_timed_round():
    clock, calls, seen = FakeClock(), [], []
    times = harness.interleave(fake_runners(clock, dict(a=[1] * 9, b=[2] * 9), calls), 5, warmup=0, clock=clock,
                               after_round=lambda k, t: seen.append((k, len(t["a"]))), stop=lambda k: k >= 2)
    assert times == dict(a=[1, 1], b=[2, 2]) and seen == [(0, 1), (1, 2)]


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
