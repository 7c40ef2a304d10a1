"""The README's commands and examples, and every docstring example, run as written."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import jax
import pytest

import hvpopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_set_up_commands_verbatim():
    # The first two commands CI runs are the README's set-up and test commands, as written;
    # the lines after them (lint, docs, ...) are CI's own.
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.startswith((".venv/", "python3 -m venv"))]
    set_up, tests = commands[:2]
    assert set_up.startswith("python3 -m venv") and "pytest" in tests
    for command in (set_up, tests):
        assert f"\n{command}\n" in README, command


def test_readme_python_examples_run_in_order():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    namespace = {}
    with jax.enable_x64(False):
        for index, block in enumerate(blocks):
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)


MODULES = [name for _, name, _ in pkgutil.walk_packages(hvpopt.__path__, "hvpopt.") if not name.endswith(".__main__")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    with jax.enable_x64(False):  # examples show float32, the default
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
