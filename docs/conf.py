"""Sphinx configuration: built-in extensions only, every warning an error (``-W``).

Build: ``.venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html``.

Two handlers beside the settings:

* ``source-read`` fills the placeholder ``.. hvpopt-top-level-names`` on
  ``api/hvpopt.rst`` with a linked list of ``hvpopt.__all__``, each name linked
  to the subpackage that documents it, so the top-level re-exports are listed,
  never documented twice.
* ``env-check-consistency`` warns about every public name that no reference page
  documents, so a new export without a page fails the build.
"""

import importlib
import inspect
import pathlib
import sys

from sphinx.util import logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hvpopt  # noqa: E402

project = "hvpopt"
author = "the hvpopt authors"
copyright = "the hvpopt authors"
release = hvpopt.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
html_title = f"hvpopt {release}"

autodoc_default_options = {"members": True, "undoc-members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a NamedTuple's "Attributes:" become :ivar:, not a second description of its fields

# The library, the testbed and the command line: every module whose names the reference documents.
PUBLIC = [
    "hvpopt",
    "hvpopt.types",
    "hvpopt.tree",
    "hvpopt.losses",
    "hvpopt.sharding",
    "hvpopt.jacobians",
    "hvpopt.compiled_memory",
    "hvpopt.frameworks",
    "hvpopt.curvature",
    "hvpopt.linalg",
    "hvpopt.optim",
    "hvpopt.influence",
    "hvpopt.spectrum",
    "hvpopt.testbed",
    "hvpopt.testbed.models",
    "hvpopt.testbed.data",
    "hvpopt.testbed.tasks",
    "hvpopt.testbed.training",
    "hvpopt.testbed.checkpoint",
    "hvpopt.testbed.demo",
    "hvpopt.testbed.files",
    "hvpopt.testbed.interrupts",
    "hvpopt.testbed.progress",
    "hvpopt.cli",
]

logger = logging.getLogger("hvpopt-docs")


def public_names(module_name: str) -> list[str]:
    """``__all__``, or (a module without one) the functions and classes it defines itself."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module_name
    ]


def home(name: str) -> str:
    """The full name under which a top-level ``hvpopt.<name>`` is documented."""
    value = getattr(hvpopt, name)
    if inspect.ismodule(value):
        return value.__name__
    for module_name in PUBLIC[1:]:
        module = importlib.import_module(module_name)
        if name in public_names(module_name) and getattr(module, name, None) is value:
            return f"{module_name}.{name}"
    return f"hvpopt.{name}"


def top_level_names() -> str:
    """A reST list of ``hvpopt.__all__``, grouped by the subpackage that documents each name."""
    groups: dict[str, list[str]] = {}
    for name in hvpopt.__all__:
        full = home(name)
        if inspect.ismodule(getattr(hvpopt, name)):
            groups.setdefault("Subpackages", []).append(f":mod:`{full}`")
        else:
            groups.setdefault(full.rsplit(".", 1)[0], []).append(f":obj:`~{full}`")
    lines = []
    for group, links in groups.items():
        title = group if group == "Subpackages" else f"From :mod:`{group}`"
        lines += [f"{title}:", "", "   " + ", ".join(links), ""]
    return "\n".join(lines)


def fill_top_level_names(app, docname, source):
    if docname == "api/hvpopt":
        source[0] = source[0].replace(".. hvpopt-top-level-names", top_level_names())


def check_every_public_name_is_documented(app, env):
    objects = env.get_domain("py").objects
    for module_name in PUBLIC:
        for name in public_names(module_name):
            full = f"{module_name}.{name}"
            documented = full in objects or (module_name == "hvpopt" and home(name) in objects)
            if not documented:
                logger.warning(f"{full} is in the public API but no reference page documents it (docs/api/)")


def setup(app):
    app.connect("source-read", fill_top_level_names)
    app.connect("env-check-consistency", check_every_public_name_is_documented)
    return {"parallel_read_safe": True}
