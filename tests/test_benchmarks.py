"""The benchmarks and experiments use only hvpopt's public API, and the benchmarks share one harness.

Cheap: the scripts are parsed with ``ast``, never run.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("bench_*.py"))
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "experiments").glob("*.py"))
SHARED = ("round_robin", "summarize", "num_params", "print_targets")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_hvpopt_uses(tree: ast.AST) -> list[str]:
    """Imports (and ``hvpopt.x._y`` attribute chains) that reach a private hvpopt name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "hvpopt" and any(_private(p) for p in parts):
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "hvpopt":
                continue
            names = [alias.name for alias in node.names]
            if any(_private(p) for p in parts) or any(_private(n) for n in names):
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id == "hvpopt" and any(_private(a) for a in chain):
                found.append(f"line {node.lineno}: hvpopt.{'.'.join(reversed(chain))}")
    return found


def parse(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_there_are_benchmarks_and_a_harness():
    assert len(BENCHMARKS) >= 5, BENCHMARKS
    assert (ROOT / "benchmarks" / "harness.py").is_file()
    assert not (ROOT / "benchmarks" / "__init__.py").exists(), "benchmarks/ is a folder of scripts, not a package"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_uses_no_private_hvpopt_name(path):
    assert private_hvpopt_uses(parse(path)) == []


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_the_harness_instead_of_its_own_copy(path):
    tree = parse(path)
    imports_harness = any(
        (isinstance(node, ast.Import) and any(alias.name == "harness" for alias in node.names))
        or (isinstance(node, ast.ImportFrom) and node.module == "harness")
        for node in ast.walk(tree)
    )
    assert imports_harness, f"{path.name} does not import the harness"
    defined = sorted(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name in SHARED
    )
    assert defined == [], f"{path.name} defines {defined} itself: use harness's"


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_says_how_to_run_it(path):
    doc = ast.get_docstring(parse(path))
    assert doc, f"{path.name} has no docstring"
    assert f"python benchmarks/{path.name}" in doc


def test_harness_offers_the_shared_pieces():
    harness = parse(ROOT / "benchmarks" / "harness.py")
    defined = {node.name for node in harness.body if isinstance(node, ast.FunctionDef)}
    assert set(SHARED) | {"environment", "write_results", "compile_timed"} <= defined


def test_the_check_finds_private_imports():
    source = (
        "import hvpopt._checks\n"
        "from hvpopt._checks import check\n"
        "from hvpopt.linalg.lanczos import _select\n"
        "import hvpopt\n"
        "x = hvpopt.linalg._private\n"
        "from hvpopt.linalg import cg\n"
        "y = hvpopt.__version__\n"
    )
    assert [use.split(":")[0] for use in private_hvpopt_uses(ast.parse(source))] == [
        "line 1",
        "line 2",
        "line 3",
        "line 5",
    ]
