"""The layers of the package: imports point one way, nothing private crosses a package, exports are explicit.

Read from the source with ``ast`` (every ``import`` statement, also inside a
function), so a violation fails here whether or not the code path runs.
"""

import ast
import importlib
import importlib.util
import pathlib
import subprocess
import sys

import pytest

import hvpopt

PACKAGE = pathlib.Path(hvpopt.__file__).parent

# Each unit may import the units of lower rank; units of one rank do not import each other, except the
# shared pieces of rank 0.
RANKS = {
    "hvpopt.types": 0,
    "hvpopt.tree": 0,
    "hvpopt._checks": 0,
    "hvpopt._moved": 0,
    "hvpopt.losses": 0,
    "hvpopt.sharding": 0,
    "hvpopt.jacobians": 0,
    "hvpopt.frameworks": 0,
    "hvpopt.compiled_memory": 0,
    "hvpopt.curvature": 1,
    "hvpopt.linalg": 1,  # products and solvers know nothing of each other
    "hvpopt.optim": 2,  # consumers: the optimizers, which influence's validation retrains with
    "hvpopt.influence": 3,
    "hvpopt.spectrum": 3,
    "hvpopt": 4,  # the package's __init__: the library's names in one place
    "hvpopt.testbed": 5,  # models, data, tasks, training, checkpoints
    "hvpopt.cli": 6,  # the command line
}
SHARED_PRIVATE = {"hvpopt._checks", "hvpopt._moved"}  # private to the package root, for every layer


def unit_of(module: str) -> str | None:
    """The unit ``module`` belongs to: the longest prefix in RANKS (None outside hvpopt)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in RANKS:
            return name
    return None


def module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imports(path: pathlib.Path):
    """``(line, module, names)`` of every absolute import of hvpopt in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hvpopt":
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hvpopt":
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            for alias in node.names:  # `from hvpopt import influence` imports the subpackage
                submodule = f"{node.module}.{alias.name}"
                if _is_module(submodule):
                    yield node.lineno, submodule, []
                else:
                    yield node.lineno, node.module, [alias.name]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    assert [path for path in SOURCES if unit_of(module_name(path)) is None] == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: module_name(path))
def test_imports_point_to_lower_layers_only(path):
    importer = unit_of(module_name(path))
    wrong = []
    for line, module, names in imports(path):
        target = unit_of(module)
        if target == importer or RANKS[target] == RANKS[importer] == 0:  # the shared pieces use each other
            continue
        if RANKS[target] >= RANKS[importer]:
            wrong.append(f"line {line}: {importer} (rank {RANKS[importer]}) imports {module} (rank {RANKS[target]})")
        private = [part for part in module.split(".")[1:] if part.startswith("_")] + [
            n for n in names if n.startswith("_")
        ]
        if private and module not in SHARED_PRIVATE:
            wrong.append(f"line {line}: {importer} imports the private {module} {names or ''} of {target}")
    assert wrong == [], f"{module_name(path)}: " + "; ".join(wrong)


def test_the_rule_catches_an_upward_and_a_private_import(tmp_path):
    """The checker itself: a linalg module importing curvature, an optimizer importing linalg._tree."""
    assert RANKS[unit_of("hvpopt.curvature.hvp")] >= RANKS[unit_of("hvpopt.linalg.cg")]  # same rank: refused
    assert RANKS[unit_of("hvpopt.testbed.tasks")] > RANKS[unit_of("hvpopt.influence.scores")]
    source = tmp_path / "bad.py"
    source.write_text("from hvpopt.linalg.lanczos import _select\ndef f():\n    import hvpopt.testbed.tasks\n")
    found = list(imports(source))
    assert found == [(1, "hvpopt.linalg.lanczos", ["_select"]), (3, "hvpopt.testbed.tasks", [])]


PACKAGES = sorted(module_name(path) for path in PACKAGE.rglob("__init__.py"))


@pytest.mark.parametrize("name", PACKAGES)
def test_every_package_lists_its_exports_and_they_resolve(name):
    package = importlib.import_module(name)
    exports = getattr(package, "__all__", None)
    assert isinstance(exports, list) and exports, f"{name} has no explicit __all__"
    missing = [export for export in exports if not hasattr(package, export)]
    assert missing == []
    assert len(set(exports)) == len(exports)


def test_the_top_level_lists_every_public_subpackage():
    public = {
        path.stem if path.name != "__init__.py" else path.parent.name
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" or (path / "__init__.py").exists()) and not path.name.startswith("_")
    }
    assert public - set(hvpopt.__all__) == set()


def test_importing_the_library_loads_neither_testbed_nor_command_line():
    code = (
        "import sys, hvpopt, hvpopt.influence, hvpopt.spectrum\n"
        "print(sorted(m for m in sys.modules if m.startswith(('hvpopt.testbed', 'hvpopt.cli', 'flax', 'matplotlib'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_moved_names_still_work_for_this_release():
    with pytest.warns(DeprecationWarning, match="hvpopt.testbed.tasks"):
        assert hvpopt.tasks.make_task is importlib.import_module("hvpopt.testbed.tasks").make_task
    with pytest.warns(DeprecationWarning, match="hvpopt.linalg.dense_matrix"):
        assert hvpopt.curvature.dense_matrix is hvpopt.linalg.dense_matrix
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = hvpopt.nonsense


def test_the_moved_module_paths_still_import_for_this_release():
    """In a fresh process, so that the first import (the one that warns) happens there."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import hvpopt.testbed.tasks as tasks, hvpopt.testbed.models.transformer as transformer\n"
        "try:\n"
        "    from hvpopt.tasks import make_task\n"
        "except DeprecationWarning as warning:\n"
        "    print(warning)\n"
        "warnings.simplefilter('ignore')\n"
        "from hvpopt.tasks import make_task\n"
        "from hvpopt.models.transformer import rotate_positions\n"
        "print(make_task is tasks.make_task, rotate_positions is transformer.rotate_positions)\n"
        "try:\n"
        "    import hvpopt.nonsense\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        "hvpopt.tasks is now hvpopt.testbed.tasks; the old name goes in the next release.",
        "True True",
        "No module named 'hvpopt.nonsense'",
    ]
