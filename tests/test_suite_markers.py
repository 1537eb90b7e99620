"""``-m 'not slow'`` means what it says: every test that starts a process (``subprocess``, ``mp.spawn``,
torch's ``start_processes``), itself or through a helper or fixture of its module, carries the
``slow`` marker (on the function or as the module's ``pytestmark``)."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROCESS_CALLS = {"spawn", "start_processes"}


def _calls(node: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)]


def _starts_process(call: ast.Call, helpers: set[str]) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute):
        return (isinstance(func.value, ast.Name) and func.value.id == "subprocess") or func.attr in PROCESS_CALLS
    return isinstance(func, ast.Name) and func.id in helpers


def _is_slow(decorators: list[ast.expr]) -> bool:
    return any("slow" in ast.unparse(d) for d in decorators)


def unmarked_process_tests(source: str) -> list[str]:
    """Names of the test functions in ``source`` that start a process without a ``slow`` marker."""
    tree = ast.parse(source)
    if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets) and "slow" in ast.unparse(n.value)
           for n in tree.body):
        return []
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    helpers: set[str] = set()
    while True:  # helpers (and fixtures) that start a process, directly or through another helper
        found = {f.name for f in functions if any(_starts_process(c, helpers) for c in _calls(f))}
        if found <= helpers:
            break
        helpers |= found
    return [
        f.name for f in functions
        if f.name.startswith("test")
        and (f.name in helpers or any(a.arg in helpers for a in f.args.args))
        and not _is_slow(f.decorator_list)
    ]


def test_every_test_that_starts_a_process_is_marked_slow():
    offenders = {path.name: unmarked_process_tests(path.read_text()) for path in sorted(TESTS.glob("test_*.py"))}
    assert {name: tests for name, tests in offenders.items() if tests} == {}


def test_the_scan_finds_a_process_started_through_a_helper_or_a_fixture():
    source = '''
import subprocess, pytest
def launch(): return subprocess.run(["tune"])
@pytest.fixture
def launched(): return launch()
def test_direct(): subprocess.run(["python"])
def test_helper(): launch()
def test_fixture(launched): pass
@pytest.mark.slow
def test_marked(): launch()
def test_spawn(): mp.spawn(f, nprocs=2)
def test_plain(): pass
'''
    assert unmarked_process_tests(source) == ["test_direct", "test_helper", "test_fixture", "test_spawn"]
    assert unmarked_process_tests("import pytest\npytestmark = pytest.mark.slow\n" + source) == []
