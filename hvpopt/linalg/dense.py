"""Dense materialisation of a matrix-free operator, for small models."""

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from hvpopt.types import MatVec, PyTree


def dense_matrix(matvec: MatVec, like: PyTree, *, batch_size: int | None = None) -> jax.Array:
    """The ``P x P`` matrix of a linear operator on pytrees shaped like ``like``.

    Rows and columns follow ``jax.flatten_util.ravel_pytree(like)``: column
    ``j`` is ``ravel(matvec(unravel(e_j)))``. Costs ``P`` products and ``P^2``
    numbers: meant for tests, exact influence on small models and debugging.

    Args:
      matvec: ``v -> A v``.
      like: a pytree with the structure, shapes and dtypes of ``v``.
      batch_size: products evaluated together (vectorized); all at once by
        default.

    Returns:
      ``A`` as a ``[P, P]`` array.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> f = lambda p: p["a"] ** 2 * p["b"]
      >>> p = {"a": jnp.array(1.0), "b": jnp.array(2.0)}
      >>> hvpopt.dense_matrix(hvpopt.hessian_operator(f, p), p)
      Array([[4., 2.],
             [2., 0.]], dtype=float32)
    """
    flat, unravel = ravel_pytree(like)
    column = lambda e: ravel_pytree(matvec(unravel(e)))[0]
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    if batch_size is None:
        return jax.vmap(column, out_axes=1)(basis)
    return jax.lax.map(column, basis, batch_size=batch_size).T
