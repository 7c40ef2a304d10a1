"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric ``A`` with eigenvalues ``lambda_i`` is
``phi(t) = (1/P) sum_i delta(t - lambda_i)``. For a unit probe ``v`` with
``E[v v^T] = I / P``, ``E[v^T f(A) v] = (1/P) tr f(A) = integral f phi``, and
``m`` Lanczos steps from ``v`` turn ``v^T f(A) v`` into a Gauss quadrature:

.. math:: v^\\top f(A) v \\approx \\sum_{i=1}^m \\tau_i f(\\theta_i), \\qquad
   T = S\\,\\mathrm{diag}(\\theta) S^\\top, \\quad \\tau_i = S_{1i}^2,

exact for polynomials ``f`` of degree up to ``2m - 1``. Averaging over probes
and replacing each node by a Gaussian of width ``sigma`` gives a smooth
density estimate:

.. math:: \\hat\\phi(t) = \\frac{1}{n_v} \\sum_{l=1}^{n_v} \\sum_{i=1}^m
   \\tau^{(l)}_i \\, \\mathcal{N}(t;\\, \\theta^{(l)}_i, \\sigma^2).

References:
  Lin, Saad, Yang, "Approximating spectral densities of large matrices",
  SIAM Review 2016.
  Ghorbani, Krishnan, Xiao, "An investigation into neural net optimization via
  Hessian eigenvalue density", ICML 2019.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hvpopt import _checks
from hvpopt.linalg.flat import check_num_iters, flat_operator
from hvpopt.linalg.lanczos import lanczos_flat, tridiagonal
from hvpopt.types import MatVec, PyTree

# Default Gaussian width, as a fraction of the range of the nodes.
_SIGMA_FRACTION = 0.01
# The grid extends this many widths beyond the extreme nodes.
_PAD_SIGMAS = 5.0


class SpectralDensity(NamedTuple):
    """The outcome of :func:`spectral_density`.

    Attributes:
      grid: ``grid_size`` evenly spaced points covering
        ``[min node - 5 sigma, max node + 5 sigma]``.
      density: the smoothed density at ``grid``; integrates (trapezoid rule)
        to 1 up to the Gaussian tails beyond 5 sigma (below ``1e-6``) and the
        quadrature of the grid.
      nodes: ``theta``, the Ritz values, ``[num_probes, num_iters]``.
      weights: ``tau``, their Gauss quadrature weights, ``[num_probes,
        num_iters]``; each row sums to 1. ``sum_i weights[l, i] * nodes[l, i]
        ** j = v_l^T A^j v_l`` for ``j <= 2 num_iters - 1``.
      sigma: the Gaussian width used.
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array
    sigma: jax.Array


def spectral_density(
    matvec: MatVec,
    like: PyTree,
    *,
    key: jax.Array,
    num_iters: int,
    num_probes: int,
    grid_size: int = 1000,
    sigma: float | jax.Array | None = None,
) -> SpectralDensity:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    Probe ``l`` is ``v_l = z_l / sqrt(P)`` with ``z_l`` Rademacher, drawn as
    ``jax.random.rademacher(jax.random.split(key, num_probes)[l], (P,))`` on
    the raveled parameters (``jax.flatten_util.ravel_pytree`` order). Each probe
    runs :func:`~hvpopt.linalg.lanczos.lanczos_tridiagonal` (full
    reorthogonalisation); probes run one after another (``lax.map``), so memory
    is one Lanczos basis, ``num_iters * P`` numbers.

    Args:
      matvec: ``v -> A v`` with ``A`` symmetric (a Hessian, say), on pytrees
        shaped like ``like``.
      like: a pytree with the structure, shapes and dtypes of ``v``.
      key: a JAX PRNG key for the probes.
      num_iters: Lanczos steps per probe (at most ``P``); Ghorbani et al. use
        about 90.
      num_probes: independent probes averaged; Ghorbani et al. find a few
        enough for large models.
      grid_size: points of the output grid.
      sigma: the Gaussian width; by default ``0.01 * (max node - min node)``
        (or ``0.01 * max |node|`` when all nodes coincide, or ``0.01`` when
        they are all zero).

    Returns:
      A :class:`SpectralDensity`.

    Raises:
      ValueError: a count is not a positive integer, ``num_iters`` exceeds
        ``P``, ``grid_size < 2``, or ``sigma`` is not positive.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from hvpopt.linalg.density import spectral_density
      >>> a = jnp.diag(jnp.array([-1.0, 1.0, 1.0, 2.0]))
      >>> sd = spectral_density(lambda v: a @ v, jnp.zeros(4), key=jax.random.key(0),
      ...                       num_iters=3, num_probes=2)
      >>> sd.nodes.round(3)
      Array([[-1.,  1.,  2.],
             [-1.,  1.,  2.]], dtype=float32)
      >>> sd.weights.mean(axis=0).round(3)  # the fraction of eigenvalues at each node
      Array([0.25, 0.5 , 0.25], dtype=float32)
      >>> jnp.trapezoid(sd.density, sd.grid).round(3)
      Array(1., dtype=float32)
    """
    flat, _, flat_matvec = flat_operator("like", matvec, like)
    size, dtype = flat.size, flat.dtype
    check_num_iters(num_iters, size)
    _checks.check_positive_int("num_probes", num_probes)
    _checks.check_positive_int("grid_size", grid_size)
    if grid_size < 2:
        raise ValueError(f"grid_size must be at least 2; got {grid_size}.")
    if isinstance(sigma, (int, float)) and not sigma > 0:
        raise ValueError(f"sigma must be positive; got {sigma!r}.")

    def quadrature(probe_key: jax.Array) -> tuple[jax.Array, jax.Array]:
        v0 = jax.random.rademacher(probe_key, (size,), dtype) / jnp.sqrt(size).astype(dtype)
        _, alphas, betas, _ = lanczos_flat(flat_matvec, v0, num_iters)
        theta, s = jnp.linalg.eigh(tridiagonal(alphas, betas))
        return theta, s[0] ** 2

    nodes, weights = jax.lax.map(quadrature, jax.random.split(key, num_probes))
    low, high = jnp.min(nodes), jnp.max(nodes)
    if sigma is None:
        spread = jnp.maximum(jnp.abs(low), jnp.abs(high))
        width = jnp.where(high > low, high - low, jnp.where(spread > 0, spread, 1))
        sigma = _SIGMA_FRACTION * width
    sigma = jnp.asarray(sigma, dtype)
    pad = _PAD_SIGMAS * sigma
    grid = jnp.linspace(low - pad, high + pad, grid_size, dtype=dtype)
    z = (grid[:, None] - nodes.reshape(-1)[None, :]) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi).astype(dtype))
    density = kernel @ weights.reshape(-1) / num_probes
    return SpectralDensity(grid, density, nodes, weights, sigma)
