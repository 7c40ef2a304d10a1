"""Pytree arithmetic that keeps every leaf in its own dtype (mixed precision).

What ``optax.tree_utils`` does not offer, shared by the solvers and the
optimizers: a scaled add that casts back, a finiteness test over several
trees, and a leafwise select.

Example:
  >>> import jax.numpy as jnp
  >>> from hvpopt import tree
  >>> x = {"w": jnp.ones(2, jnp.bfloat16)}
  >>> tree.add_scaled(x, jnp.float32(0.5), x)["w"].dtype
  dtype(bfloat16)
  >>> bool(tree.all_finite(x, jnp.array(jnp.nan)))
  False
"""

import jax
import jax.numpy as jnp

from hvpopt.types import PyTree

__all__ = ["add_scaled", "all_finite", "select"]


def add_scaled(x: PyTree, alpha: jax.Array, y: PyTree) -> PyTree:
    """``x + alpha y``, each leaf cast back to the dtype of ``x``'s leaf.

    ``optax.tree_utils.tree_add_scale`` promotes a bfloat16 leaf to the dtype of
    ``alpha`` (float32 from a ``tree_vdot``), which breaks a loop's carry.
    """
    return jax.tree.map(lambda a, b: (a + alpha * b).astype(a.dtype), x, y)


def all_finite(*trees: PyTree) -> jax.Array:
    """Whether every entry of every leaf of ``trees`` (arrays or scalars) is finite."""
    leaves = jax.tree.leaves(trees)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.asarray(True)


def select(condition: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """``on_true`` where ``condition`` else ``on_false``, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)
