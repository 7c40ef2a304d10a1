"""Turning an NNX module into the ``(model_fn, params)`` pair the curvature code takes."""

from collections.abc import Callable

from flax import nnx


def pure(module: nnx.Module) -> tuple[Callable, nnx.State]:
    """``(model_fn, params)``: the module's parameters and a pure function that runs it.

    ``params`` is the module's ``nnx.Param`` state, a pytree; ``model_fn(params,
    x)`` merges it back into a copy of the module and calls it on ``x``.
    """
    graphdef, params = nnx.split(module, nnx.Param)
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params
