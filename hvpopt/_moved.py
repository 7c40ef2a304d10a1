"""The module paths that moved in 0.2, still importable for this release with a ``DeprecationWarning``.

``import hvpopt.tasks`` and ``from hvpopt.models import mlp`` find no file any
more: the testbed lives in :mod:`hvpopt.testbed`. :class:`MovedModules`, last
on ``sys.meta_path``, answers for exactly those names (and their submodules,
``hvpopt.models.transformer``) with a module that forwards every attribute to
the new one, so the objects are the same. Nothing is imported until such a
name is.
"""

import importlib
import importlib.abc
import importlib.util
import types
import warnings

__all__ = ["MOVED", "MovedModules"]

MOVED = {f"hvpopt.{name}": f"hvpopt.testbed.{name}" for name in ("checkpoint", "data", "models", "tasks", "training")}


class _Forward(importlib.abc.Loader):
    """Loads an old module path as a module that forwards its attributes to ``target``."""

    def __init__(self, old: str, target: str):
        self.old, self.target = old, target

    def exec_module(self, module: types.ModuleType) -> None:
        warnings.warn(
            f"{self.old} is now {self.target}; the old name goes in the next release.", DeprecationWarning, stacklevel=2
        )
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
