"""Framework entrances: a model written with Flax NNX, Flax Linen or Equinox as ``(model_fn, params)``.

Every hvpopt function takes a model as a pure function ``model_fn(params,
inputs) -> outputs`` of a parameter pytree. These adapters split a framework's
model into that pair: ``params`` holds the trainable parameters, everything
else (RNG streams, batch statistics, counters, static fields) is held fixed at
its value when the model is split. By default the model runs deterministically
(dropout off, batch norm on its running averages), what curvature and influence
are usually measured on; ``deterministic=False`` keeps the model's own mode, and
a dropout then draws from the RNG state held fixed: the same mask at every call.

The frameworks are imported when an adapter is called: hvpopt itself needs none.

Example:
  >>> import jax.numpy as jnp, hvpopt
  >>> from flax import nnx
  >>> class Model(nnx.Module):
  ...     def __init__(self, rngs):
  ...         self.linear = nnx.Linear(3, 2, rngs=rngs)
  ...         self.dropout = nnx.Dropout(0.5, rngs=rngs)
  ...     def __call__(self, x):
  ...         return self.dropout(self.linear(x))
  >>> model_fn, params = hvpopt.from_nnx(Model(nnx.Rngs(0)))
  >>> model_fn(params, jnp.ones((4, 3))).shape
  (4, 2)
"""

import sys
from collections.abc import Callable
from typing import Any

import jax

from hvpopt.types import PyTree

__all__ = ["from_equinox", "from_linen", "from_nnx", "plain_arrays"]


def from_nnx(module: Any, *, deterministic: bool = True) -> tuple[Callable, PyTree]:
    """``(model_fn, params)`` of a Flax NNX module: its ``nnx.Param`` state and a pure function that runs it.

    ``params`` is the module's ``nnx.Param`` state as plain arrays (an
    ``nnx.State``, the structure ``nnx.Optimizer`` hands its transformation);
    ``model_fn(params, x)`` merges it into a fresh copy of the module, with the
    other state (``nnx.Rngs`` streams, ``nnx.BatchStat``, ...) held at its
    value now, and calls it on ``x``. The module itself is left untouched.

    Args:
      module: an ``nnx.Module``.
      deterministic: run it in evaluation mode (``nnx.Dropout`` off,
        ``nnx.BatchNorm`` on its running averages), else in its own mode.
    """
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module; got {type(module).__name__}.")
    if deterministic:
        module = nnx.view(module, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)

    def model_fn(params: PyTree, inputs: Any) -> jax.Array:
        return nnx.merge(graphdef, params, rest)(inputs)

    return model_fn, params


def from_linen(
    module: Any, variables: dict, *, deterministic: bool | None = True, method: Callable | str | None = None
) -> tuple[Callable, PyTree]:
    """``(model_fn, params)`` of a Flax Linen module and its variables: ``variables["params"]`` and ``apply``.

    The other collections (``batch_stats``, ...) are held fixed, none is
    mutated. ``deterministic`` is passed to the module's ``__call__`` (or
    ``method``) when it is not None, as Linen models that use dropout take it.

    Args:
      module: an ``nn.Module``.
      variables: what ``module.init`` returned (``{"params": ..., ...}``).
      deterministic: the value of the call's ``deterministic`` argument, or None to pass none.
      method: the module's method to apply (default ``__call__``).
    """
    if not isinstance(variables, dict) or "params" not in variables:
        raise TypeError("variables must be what module.init returned, a dict with a 'params' collection.")
    rest = {name: value for name, value in variables.items() if name != "params"}
    options = {} if deterministic is None else {"deterministic": deterministic}
    if method is not None:
        options["method"] = method

    def model_fn(params: PyTree, inputs: Any) -> jax.Array:
        return module.apply({**rest, "params": params}, inputs, **options)

    return model_fn, variables["params"]


def from_equinox(model: Any, *, batched: bool = True, deterministic: bool = True) -> tuple[Callable, PyTree]:
    """``(model_fn, params)`` of an Equinox module: its floating arrays, and the module called on ``inputs``.

    Equinox models take one example; with ``batched`` the function is
    ``jax.vmap``-ed over the leading axis of ``inputs``, as hvpopt's batches
    are. ``params`` is the module with its non-floating fields set to None
    (``eqx.partition(model, eqx.is_inexact_array)``).

    Args:
      model: an ``eqx.Module``.
      batched: map the model over the leading axis of the inputs.
      deterministic: call it in inference mode (``eqx.nn.inference_mode``: dropout off).
    """
    import equinox as eqx

    if not isinstance(model, eqx.Module):
        raise TypeError(f"model must be an equinox.Module; got {type(model).__name__}.")
    if deterministic:
        model = eqx.nn.inference_mode(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def model_fn(params: PyTree, inputs: Any) -> jax.Array:
        call = eqx.combine(params, static)
        return jax.vmap(call)(inputs) if batched else call(inputs)

    return model_fn, params


def plain_arrays(tree: PyTree) -> PyTree:
    """``tree`` with Flax NNX ``Variable`` wrappers replaced by their arrays (``nnx.as_pure``); else as it is.

    ``nnx.Optimizer`` initialises its transformation on ``Variable``-wrapped
    parameters and updates it with plain arrays; a state whose structure
    depends on the parameters' is built from this, so that both agree.
    """
    if "flax.nnx" not in sys.modules:
        return tree  # no Variable can exist
    from flax import nnx

    return nnx.as_pure(tree)
