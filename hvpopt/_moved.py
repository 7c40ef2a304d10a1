"""The names that moved in 0.2, still found for this release with a ``DeprecationWarning``.

Two ways in, one message (:func:`warn_moved`):

- an attribute, ``hvpopt.tasks`` or ``hvpopt.curvature.dense_matrix``: the
  package's ``__getattr__`` (PEP 562) is :func:`forwarding_getattr`, which
  imports the name where it went;
- a module path, ``import hvpopt.tasks`` or ``from hvpopt.models import mlp``,
  which finds no file any more: :class:`MovedModules`, last on
  ``sys.meta_path``, answers for exactly the paths of :data:`MOVED` (and their
  submodules, ``hvpopt.models.transformer``) with a module that forwards every
  attribute to the new one, so the objects are the same.

Nothing is imported until such a name is. This module imports nothing of
hvpopt, so every layer may use it.
"""

import importlib
import importlib.abc
import importlib.util
import types
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["MOVED", "MovedModules", "forwarding_getattr", "warn_moved"]

MOVED = {f"hvpopt.{name}": f"hvpopt.testbed.{name}" for name in ("checkpoint", "data", "models", "tasks", "training")}


def warn_moved(old: str, new: str, *, stacklevel: int) -> None:
    """The ``DeprecationWarning`` of a name that moved; ``stacklevel`` as for ``warnings.warn``, from the caller."""
    warnings.warn(
        f"{old} is now {new}; the old name goes in the next release.", DeprecationWarning, stacklevel=stacklevel + 1
    )


def forwarding_getattr(module: str, moved: dict[str, str], *, lazy: tuple[str, ...] = ()) -> Callable[[str], Any]:
    """A module ``__getattr__`` that finds the names of ``moved`` where they went, warning, and ``lazy`` ones quietly.

    Args:
      module: the module's name, for the messages.
      moved: old attribute name -> where it is now, ``"package.module"`` (a
        module) or ``"package.module:name"`` (an attribute of one).
      lazy: submodules imported on first use, without a warning.
    """

    def __getattr__(name: str) -> Any:
        if name in lazy:
            return importlib.import_module(f"{module}.{name}")
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, attribute = moved[name].partition(":")
        warn_moved(f"{module}.{name}", where + (f".{attribute}" if attribute else ""), stacklevel=2)
        found = importlib.import_module(where)
        return getattr(found, attribute) if attribute else found

    return __getattr__


class _Forward(importlib.abc.Loader):
    """Loads an old module path as a module that forwards its attributes to ``target``."""

    def __init__(self, old: str, target: str):
        self.old, self.target = old, target

    def exec_module(self, module: types.ModuleType) -> None:
        warn_moved(self.old, self.target, stacklevel=2)  # the import statement (importlib's frames are skipped)
        target = importlib.import_module(self.target)
        module.__getattr__ = lambda name: getattr(target, name)  # PEP 562, from the module's own namespace
        module.__all__ = list(getattr(target, "__all__", ()))
        module.__doc__ = f"Moved: see {self.target}."


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`MOVED` (consulted only after every real finder found nothing)."""

    def find_spec(self, fullname: str, path=None, target=None):
        for old, new in MOVED.items():
            if fullname == old or fullname.startswith(old + "."):
                target = new + fullname[len(old) :]
                found = importlib.util.find_spec(target)
                if found is None:
                    return None
                package = found.submodule_search_locations is not None  # then its submodules resolve too
                return importlib.util.spec_from_loader(fullname, _Forward(fullname, target), is_package=package)
        return None
