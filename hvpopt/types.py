"""The two types every layer speaks: a parameter pytree and a linear operator on it.

A linear operator (a "matvec") is a plain function from a pytree to a pytree of
the same structure, ``v -> A v``; nothing wraps it. For example
:func:`hvpopt.hessian_operator` returns one and :func:`hvpopt.cg` takes one::

    >>> import jax.numpy as jnp
    >>> from hvpopt.types import MatVec
    >>> double: MatVec = lambda v: {"w": 2 * v["w"]}
    >>> double({"w": jnp.ones(2)})["w"]
    Array([2., 2.], dtype=float32)
"""

from collections.abc import Callable
from typing import Any

__all__ = ["MatVec", "PyTree"]

PyTree = Any
"""Any JAX pytree of arrays: a dict, list, tuple, NamedTuple or flax state of leaves."""

MatVec = Callable[[PyTree], PyTree]
"""A linear operator ``v -> A v`` on pytrees shaped like the parameters."""
