"""Pytree arithmetic that keeps every leaf in its own dtype (mixed precision)."""

from typing import Any

import jax

PyTree = Any


def add_scaled(x: PyTree, alpha: jax.Array, y: PyTree) -> PyTree:
    """``x + alpha y``, each leaf cast back to the dtype of ``x``'s leaf.

    ``optax.tree_utils.tree_add_scale`` promotes a bfloat16 leaf to the dtype of
    ``alpha`` (float32 from a ``tree_vdot``), which breaks a loop's carry.
    """
    return jax.tree.map(lambda a, b: (a + alpha * b).astype(a.dtype), x, y)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` with each leaf cast to the dtype of the matching leaf of ``like``."""
    return jax.tree.map(lambda a, b: a.astype(b.dtype), tree, like)
