"""``python -m bench <case> [arguments]`` runs ``bench/<case>.py`` (or ``bench/bench_<case>.py``) with those
arguments; ``python -m bench`` lists the cases with the first line of each one's description."""
import ast
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cases() -> dict[str, Path]:
    """Every script of bench/ that runs as a program, by case name (``bench_`` dropped)."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("*.py"))
            if not p.name.startswith("_") and '__name__ == "__main__"' in p.read_text()}


def main(argv: list[str]) -> int:
    found = cases()
    if not argv or argv[0] not in found:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown case {argv[0]!r}", file=sys.stderr)
        for name, path in found.items():
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            print(f"{name:26s} {doc.splitlines()[0] if doc else ''}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    sys.argv = [str(found[argv[0]]), *argv[1:]]
    sys.path.insert(0, str(HERE))
    runpy.run_path(str(found[argv[0]]), run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
