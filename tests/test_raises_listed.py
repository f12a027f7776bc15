"""Every user-facing ``raise`` in l2c_kernels has a test that triggers it and checks its message.

A raise's message is its first argument with every f-string placeholder (or other non-literal part of a
concatenation) rendered as "…". It counts as tested when a ``match=`` pattern in tests/ ``re.search``es it, or
when a string constant of 12 or more characters in tests/ is part of it (the CLI tests compare stderr text);
the ``match`` column of a parametrize table counts as ``match=``.
Skipped: re-raises (``raise``, ``raise e`` of a caught ``e``) and abstract methods' bare
``raise NotImplementedError``. A raise whose message is not a literal takes the message of the helper that
builds its exception (``raise _refuse(...)`` with ``def _refuse(...): return X("...")`` in the same file);
otherwise it must be listed in :data:`NO_MESSAGE` with the test that covers it.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ELLIPSIS = "…"

#: raises without a literal message: (file, exception) -> the test that runs them
NO_MESSAGE = {
    # control flow, caught by the library itself: a forward pre-hook stops the model's forward in front of a block
    ("l2c_kernels/parallel/runners.py", "_Stop"):
        "tests/parallel/test_single_process.py::test_emulation_runs_the_asynchronous_schedule",
    ("l2c_kernels/parallel/partition.py", "_StopForward"):
        "tests/parallel/test_async_mmdit.py::test_measured_split_on_the_first_call",
}


@dataclass(frozen=True)
class Raise:
    file: str
    line: int
    exception: str
    message: str | None  # None: not a literal

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.exception}: {self.message}"


def render(node, holes: bool = True) -> str | None:
    """The text ``node`` makes, placeholders as "…"; None when it is no string literal. ``holes=False`` (a
    pattern): a concatenation with a non-literal side is None too (it could match anything)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else ELLIPSIS for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = render(node.left, holes), render(node.right, holes)
        if (left is None and right is None) or (not holes and None in (left, right)):
            return None
        return (ELLIPSIS if left is None else left) + (ELLIPSIS if right is None else right)
    return None


def _name(func) -> str:
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "?")


def raises_in(source: str, file: str) -> list[Raise]:
    """The raises of one source file that carry (or should carry) a message for the user."""
    tree = ast.parse(source)
    caught = {h.name for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.name}
    helpers = {}  # function name -> message of the exception it returns
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for r in ast.walk(f):
                if isinstance(r, ast.Return) and isinstance(r.value, ast.Call) and r.value.args:
                    msg = render(r.value.args[0])
                    if msg is not None:
                        helpers[f.name] = msg
    out = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Raise) or n.exc is None:
            continue  # not a raise, or a bare re-raise
        exc = n.exc
        if isinstance(exc, ast.Name) and (exc.id in caught or exc.id == "NotImplementedError"):
            continue  # `raise e` of a caught exception, or an abstract method
        if isinstance(exc, ast.Call):
            name = _name(exc.func)
            msg = helpers[name] if name in helpers else render(exc.args[0]) if exc.args else None
            out.append(Raise(file, n.lineno, name, msg))
        else:
            out.append(Raise(file, n.lineno, _name(exc), None))
    return sorted(out, key=lambda r: r.line)


def package_raises() -> list[Raise]:
    return [r for p in sorted((ROOT / "l2c_kernels").rglob("*.py"))
            for r in raises_in(p.read_text(), p.relative_to(ROOT).as_posix())]


def _table_matches(call: ast.Call) -> list:
    """The ``match`` column of a ``parametrize("...,match,...", [rows])`` table written in the decorator."""
    names = call.args[0] if len(call.args) >= 2 else None
    if not (isinstance(names, ast.Constant) and isinstance(names.value, str)) or not isinstance(call.args[1], ast.List):
        return []
    names = [n.strip() for n in names.value.split(",")]
    if "match" not in names:
        return []
    i, out = names.index("match"), []
    for row in call.args[1].elts:
        row = row.args if isinstance(row, ast.Call) and _name(row.func) == "param" else row
        row = [row] if len(names) == 1 else getattr(row, "elts", row)
        if isinstance(row, list) and len(row) > i:
            out.append(row[i])
    return out


def matches_in(source: str) -> tuple[list[str], list[str]]:
    """A test file's match patterns (``match=`` and the ``match`` columns of parametrize tables) and its string
    constants of 12 or more characters."""
    patterns, texts = [], []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.keyword) and n.arg == "match":
            patterns.append(render(n.value, holes=False))
        elif isinstance(n, ast.Call) and _name(n.func) == "parametrize":
            patterns += [render(v, holes=False) for v in _table_matches(n)]
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and len(n.value) >= 12:
            texts.append(n.value)
    return [pat for pat in patterns if pat and pat.strip(ELLIPSIS)], texts


def match_texts() -> tuple[list[str], list[str]]:
    """:func:`matches_in` over tests/ (this file's own strings left out)."""
    patterns, texts = [], []
    for p in sorted((ROOT / "tests").rglob("*.py")):
        if p.resolve() != Path(__file__).resolve():
            pats, txts = matches_in(p.read_text())
            patterns += pats
            texts += txts
    return patterns, texts


def is_tested(message: str, patterns: list[str], texts: list[str]) -> bool:
    for pat in patterns:
        try:
            if re.search(pat, message):
                return True
        except re.error:
            pass
    return any(t in message for t in texts if ELLIPSIS not in t)


def untested(raises: list[Raise], patterns: list[str], texts: list[str]) -> list[Raise]:
    return [r for r in raises
            if (r.file, r.exception) not in NO_MESSAGE
            and (r.message is None or not is_tested(r.message, patterns, texts))]


def test_every_raise_has_a_test_that_checks_its_message():
    patterns, texts = match_texts()
    missing = untested(package_raises(), patterns, texts)
    assert not missing, (f"{len(missing)} raises have no test that triggers them and matches their message "
                         "(or, without a literal message, no entry in NO_MESSAGE):\n"
                         + "\n".join(map(str, missing)))


def test_the_tests_named_for_raises_without_a_message_exist():
    for (file, exc), node in NO_MESSAGE.items():
        assert any(r.exception == exc for r in raises_in((ROOT / file).read_text(), file)), (file, exc)
        path, test = node.split("::")
        assert f"def {test}(" in (ROOT / path).read_text(), node


def test_the_scan_finds_an_untested_raise():
    src = '''
def _refuse(why):
    return TypeError(f"refused: {why}")

def f(x):
    try:
        g(x)
    except KeyError as e:
        raise                                   # re-raises: skipped
        raise e
    if x:
        raise ValueError(f"x is {x}, " + str(x))
    if not x:
        raise _refuse("empty")
    raise RuntimeError(x)
'''
    found = raises_in(src, "synthetic.py")
    assert [(r.line, r.exception, r.message) for r in found] == [
        (12, "ValueError", "x is …, …"), (14, "_refuse", "refused: …"), (15, "RuntimeError", None)]
    tests = '''
@pytest.mark.parametrize("call,match", [(f, "^refused"), pytest.param(g, "x is .*, ", id="x")])
def test_f(call, match):
    with pytest.raises(ValueError, match=f"{call}"):  # no literal part: no pattern
        call()
'''
    assert matches_in(tests) == (["^refused", "x is .*, "], [])
    assert untested(found, patterns=["x is .*, "], texts=[]) == found[1:]
    assert untested(found, patterns=["x is .*, "], texts=["refused: …"]) == found[1:]  # a text with "…": no test
    assert untested(found, *matches_in(tests)) == found[2:]  # no literal message: listed until NO_MESSAGE names it
