"""Turning an NNX module into the ``(model_fn, params)`` pair the curvature code takes."""

from collections.abc import Callable

from flax import nnx

from hvpopt.frameworks import from_nnx


def pure(module: nnx.Module) -> tuple[Callable, nnx.State]:
    """``(model_fn, params)``: the module's parameters and a pure function that runs it, in its own mode.

    ``params`` is the module's ``nnx.Param`` state, its ``Variable`` wrappers
    kept (the testbed's checkpoints are of this structure); ``model_fn(params,
    x)`` runs a copy of the module, its other state (RNG streams, batch
    statistics) held fixed. :func:`hvpopt.from_nnx` is the library's entrance for
    a module of your own.
    """
    model_fn, _ = from_nnx(module, deterministic=False)
    return model_fn, nnx.state(module, nnx.Param)
