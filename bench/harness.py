"""What every benchmark shares: the repository on ``sys.path``, interleaved timing, the machine and version facts,
and the one result writer (``<name>.json`` with a ``meta`` block and ``<name>.md`` ending with the command that
regenerates both). Method notes: ``bench/NOTES.md``; the cases: ``python -m bench``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
for _path in (str(ROOT / "bench"), str(ROOT)):  # scripts import l2c_kernels and the bench helpers the same way
    if _path not in sys.path:
        sys.path.insert(0, _path)

_RUN: dict = dict(start=time.time(), load=None, argv=None)  # argv: the arguments given to parse()


# ---------------------------------------------------------------------------------------------- timing
from l2c_kernels.timing import device_clock, interleave  # noqa: E402,F401  (the library's one timing loop)


def spread(seconds: list[float], scale: float = 1.0, digits: int = 5) -> list[float]:
    """``[fastest, slowest]`` of a runner's timed rounds, times ``scale`` (1e3: milliseconds)."""
    return [round(scale * min(seconds), digits), round(scale * max(seconds), digits)]


def step_medians(seconds: list[float], steps: int) -> list[float]:
    """Per step, the median over generations of rounds timed step by step (round k = step k mod ``steps``)."""
    return [statistics.median(seconds[i::steps]) for i in range(steps)]


def generation_means(seconds: list[float], steps: int) -> list[float]:
    """Per generation, the mean step time of rounds timed step by step."""
    return [statistics.mean(seconds[g:g + steps]) for g in range(0, len(seconds) - steps + 1, steps)]


def flops(fn, custom: bool = True) -> int:
    """FLOPs of everything ``fn()`` runs, counted by ``torch.utils.flop_counter`` (``custom``: the package's
    mapping of CPU flash attention included)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from l2c_kernels.runtime.block_flops import _CUSTOM

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM if custom else None) as fc:
        fn()
    return fc.get_total_flops()


# ---------------------------------------------------------------------------------------------- facts
def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


_RUN["load"] = load_average()


def machine(device="cpu") -> dict:
    """The device, CPU, cores and torch threads a result was measured with."""
    import torch

    from l2c_kernels._machine import cpu_name

    facts = dict(cpu=cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(), arch=platform.machine())
    if getattr(device, "type", device) == "cuda" and torch.cuda.is_available():
        facts.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    else:
        facts["device"] = f"CPU ({facts['cpu']})"
    return facts


def versions() -> dict:
    """Versions of python, torch, diffusers, this package and the optional peers (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import l2c_kernels

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return dict(python=platform.python_version(), torch=torch.__version__, diffusers=installed("diffusers"),
                l2c_kernels=l2c_kernels.__version__, triton=installed("triton"), cache_dit=installed("cache-dit"),
                tgate=installed("tgate"))


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``ap.parse_args(argv)``, remembering the arguments for the command the results record; sets torch's
    intra-op threads to ``--threads`` where the parser has it."""
    _RUN["argv"] = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return args


def parser(doc: str, *, threads: int | None = 2, out=RESULTS) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as help and the usual ``--threads`` and ``--out``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help="torch intra-op threads")
    if out is not None:
        ap.add_argument("--out", default=str(out), help="where the result files go")
    return ap


def command(script: str | None = None, argv: list | None = None) -> str:
    """The command that regenerates a result: ``python bench/<script>.py <arguments>`` (the script from
    ``sys.argv[0]``, relative to the repository root; the arguments those given to :func:`parse`)."""
    script = Path(script or sys.argv[0]).resolve()
    try:
        shown = script.relative_to(ROOT).as_posix()
    except ValueError:
        shown = str(script)
    args = argv if argv is not None else _RUN["argv"] if _RUN["argv"] is not None else sys.argv[1:]
    return shlex.join(["python", shown, *args])


def meta(device="cpu", **extra) -> dict:
    """What a result records about its run: date, machine, versions, load average at the start and now, the
    seconds since the start and the command that regenerates it (``extra`` entries added)."""
    facts = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **machine(device), **versions(),
                 load_average_start=_RUN["load"], load_average_end=load_average(),
                 wall_seconds=round(time.time() - _RUN["start"], 1), command=command())
    return {**facts, **extra}


def describe(m: dict) -> str:
    """One line of a table's header: device, threads, versions, date and load (what of it ``m`` records)."""
    head = m.get("device", "CPU") + (f", {m['threads']} thread{'s' * (m['threads'] != 1)}" if m.get("threads") else "")
    head += f" of {m['cores']} cores" if m.get("threads") and m.get("cores") else ""
    parts = [head] + [f"{k.replace('_', '-')} {m[k]}" for k in ("torch", "diffusers", "cache_dit") if m.get(k)]
    la = [x for x in (m.get("load_average_start"), m.get("load_average_end")) if x]
    load = f", load average {' -> '.join(f'{x[0]:.1f}' for x in la)}" if la else ""
    return ", ".join(parts + [str(m.get("date", ""))]) + load


# ---------------------------------------------------------------------------------------------- writing
def write_result(out_dir, name: str, data: dict, markdown: str, device="cpu", add_meta: bool = True) -> Path:
    """Write ``<out_dir>/<name>.json`` (``data`` with this run's facts added under ``meta``, where entries the script
    put there win; ``add_meta=False``: a saved result rewritten, its meta kept) and ``<name>.md`` (``markdown`` and
    a line with the command in ``meta``); returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data["meta"] = {**(meta(device) if add_meta else {}), **data.get("meta", {})}
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    (out / f"{name}.md").write_text(with_command(markdown, data["meta"].get("command")))
    return out / f"{name}.json"


def with_command(markdown: str, command: str | None) -> str:
    """``markdown`` ending with the line that says how to regenerate it."""
    return markdown.rstrip("\n") + (f"\n\nRegenerate: `{command}`\n" if command else "\n")


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def table(header: list[str], rows: list[list], align="---") -> list[str]:
    """A Markdown table's lines: the header, the rule (``align``: one for every column, or a list) and the rows."""
    rule = align if isinstance(align, list) else [align] * len(header)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def elapsed() -> float:
    """Seconds since the benchmark started."""
    return time.time() - _RUN["start"]


def log(*parts) -> None:
    print(f"[{elapsed():7.1f}s]", *parts, flush=True)
