"""Pytree operators as operators on flat vectors: the plumbing under Lanczos, SLQ and the trace.

Krylov methods keep a basis of vectors as rows of one ``[m, P]`` array, so they
work on the parameters raveled to one vector of length ``P``
(``jax.flatten_util.ravel_pytree``). :func:`flat_operator` turns a pytree
matvec into a matvec on such vectors, checking the operator's output at trace
time.

Example:
  >>> import jax.numpy as jnp
  >>> from hvpopt.linalg import flat_operator
  >>> like = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
  >>> flat, unravel, flat_matvec = flat_operator("like", lambda v: {"a": 2 * v["a"], "b": -v["b"]}, like)
  >>> flat_matvec(jnp.array([1.0, 2.0, 3.0]))
  Array([ 2.,  4., -3.], dtype=float32)
"""

from collections.abc import Callable
from typing import Any

import jax
from jax.flatten_util import ravel_pytree

from hvpopt import _checks
from hvpopt.types import MatVec, PyTree

__all__ = ["check_num_iters", "flat_operator"]


def check_num_iters(num_iters: Any, size: int) -> None:
    """Raises ValueError unless ``1 <= num_iters <= size`` (an int)."""
    _checks.check_positive_int("num_iters", num_iters)
    if num_iters > size:
        raise ValueError(f"num_iters must be at most the number of parameters {size}; got {num_iters}.")


def flat_operator(
    name: str, matvec: MatVec, like: PyTree
) -> tuple[jax.Array, Callable, Callable[[jax.Array], jax.Array]]:
    """``(flat like, unravel, flat matvec)``, checking ``like`` and the matvec's output.

    ``like`` must hold at least one floating array. The flat matvec checks, at
    trace time, that ``matvec`` returns a pytree shaped like ``like``, and casts
    its output to ``like``'s dtype.
    """
    leaves = jax.tree_util.tree_leaves(like)
    if not leaves:
        raise ValueError(f"{name} must hold at least one array; got {like!r}.")
    _checks.check_floating(name, like)
    flat, unravel = ravel_pytree(like)
    if flat.size == 0:
        raise ValueError(f"{name} must hold at least one number; got size 0.")

    def flat_matvec(x: jax.Array) -> jax.Array:
        out = matvec(unravel(x))
        _checks.check_like("matvec(v)", out, name, like, dtypes=False)
        return ravel_pytree(out)[0].astype(flat.dtype)

    return flat, unravel, flat_matvec
