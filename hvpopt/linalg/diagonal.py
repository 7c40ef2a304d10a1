"""Diagonals of curvature matrices: Hutchinson's estimate and the exact diagonal.

Hutchinson's estimator (Bekas, Kokiopoulou, Saad, 2007) uses Rademacher probes
``z`` (entries +-1, so ``E[z z^T] = I``):

.. math:: \\mathrm{diag}(A) = \\mathbb{E}[z \\odot A z]
   \\approx \\frac{1}{S}\\sum_{s=1}^{S} z_s \\odot A z_s .

Its error in entry ``i`` has variance ``(sum_j A_ij^2 - A_ii^2) / S``.

Reference:
  Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix",
  Applied Numerical Mathematics 2007.
"""

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from hvpopt import _checks
from hvpopt.types import MatVec, PyTree


def hutchinson_diagonal(matvec: MatVec, like: PyTree, *, key: jax.Array, num_samples: int) -> PyTree:
    """Hutchinson estimate of ``diag(A)`` with Rademacher probes.

    Args:
      matvec: ``v -> A v`` (a Hessian, Gauss-Newton or Fisher operator).
      like: a pytree with the structure, shapes and dtypes of ``v``.
      key: a JAX PRNG key for the probes.
      num_samples: number of probes ``S``; the products run one at a time in a
        ``lax.scan``, so memory is that of one product.

    Returns:
      The estimate, a pytree like ``like``.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> hvpopt.hutchinson_diagonal(lambda v: a @ v, jnp.zeros(3),
      ...                            key=jax.random.key(0), num_samples=4)
      Array([1., 2., 3.], dtype=float32)
    """
    _checks.check_positive_int("num_samples", num_samples)

    def add_probe(total: PyTree, probe_key: jax.Array) -> tuple[PyTree, None]:
        z = otu.tree_random_like(probe_key, like, jax.random.rademacher)
        return otu.tree_add(total, otu.tree_mul(z, matvec(z))), None

    keys = jax.random.split(key, num_samples)
    total = jax.lax.scan(add_probe, otu.tree_zeros_like(like), keys)[0]
    return otu.tree_scale(1.0 / num_samples, total)


def exact_diagonal(matvec: MatVec, like: PyTree, *, batch_size: int | None = None) -> PyTree:
    """The exact diagonal ``A_ii = e_i^T A e_i``, one product per parameter.

    For small models (tests, ground truth): it costs ``P`` products for ``P``
    parameters but keeps only ``O(P)`` numbers.

    Args:
      matvec: ``v -> A v``.
      like: a pytree with the structure, shapes and dtypes of ``v``.
      batch_size: products evaluated together (vectorized); one at a time by
        default.

    Returns:
      The diagonal, a pytree like ``like``.
    """
    flat, unravel = ravel_pytree(like)
    size = flat.size

    def entry(i: jax.Array) -> jax.Array:
        e_i = jnp.zeros(size, flat.dtype).at[i].set(1)
        return ravel_pytree(matvec(unravel(e_i)))[0][i]

    return unravel(jax.lax.map(entry, jnp.arange(size), batch_size=batch_size))
