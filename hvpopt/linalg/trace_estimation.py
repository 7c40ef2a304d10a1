"""Stochastic trace estimation: Hutchinson and Hutch++.

Hutchinson (1989) averages quadratic forms with Rademacher probes ``z``
(entries +-1, ``E[z z^T] = I``):

.. math:: \\mathrm{tr}(A) \\approx \\frac1S \\sum_{s=1}^S z_s^\\top A z_s,
   \\qquad \\mathrm{Var}[z^\\top A z] = 2 (\\|A\\|_F^2 - \\textstyle\\sum_i A_{ii}^2).

Hutch++ (Meyer, Musco, Musco, Woodruff 2021) spends a third of the products on
a sketch ``Q = orth(A S)`` of the dominant range, takes the trace there exactly
and runs Hutchinson only on the deflated remainder:

.. math:: \\mathrm{tr}(A) \\approx \\mathrm{tr}(Q^\\top A Q)
   + \\frac1G \\sum_{g=1}^G z_g^\\top (I - Q Q^\\top) A (I - Q Q^\\top) z_g .

Its error falls as ``1/num_samples`` instead of ``1/sqrt(num_samples)`` when
the spectrum decays, and it is exact for ``rank(A) <= num_samples // 3``.

References:
  Hutchinson, "A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines", Comm. Stat. Simul. Comput. 1989.
  Meyer, Musco, Musco, Woodruff, "Hutch++: Optimal stochastic trace
  estimation", SOSA 2021.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hvpopt import _checks
from hvpopt.linalg.flat import flat_operator
from hvpopt.types import MatVec, PyTree

TRACE_METHODS = ("hutchinson", "hutch++")


class TraceEstimate(NamedTuple):
    """The outcome of :func:`trace`.

    Attributes:
      value: the estimate of ``tr(A)``.
      std_error: the sample standard error of the Hutchinson part,
        ``sqrt(sum_s (x_s - mean(x))^2 / (n (n - 1)))`` over its ``n``
        quadratic forms ``x_s`` (``n = num_samples`` for Hutchinson,
        ``num_samples - 2 (num_samples // 3)`` for Hutch++, whose exact part
        has no sampling error). An estimate itself, from the same probes.
    """

    value: jax.Array
    std_error: jax.Array


def trace(
    matvec: MatVec,
    like: PyTree,
    *,
    key: jax.Array,
    num_samples: int,
    method: str = "hutchinson",
) -> TraceEstimate:
    """Estimates ``tr(A)`` from ``num_samples`` products with Rademacher probes.

    * ``"hutchinson"``: ``mean_s z_s^T A z_s``. Products run one at a time in a
      ``lax.scan``: memory is one product.
    * ``"hutch++"``: ``k = num_samples // 3`` sketch probes ``S``,
      ``Q = orth(A S)`` (reduced QR), ``tr(Q^T A Q)`` with ``k`` products, and
      Hutchinson with the remaining ``num_samples - 2k`` probes projected off
      ``Q``. Holds ``S``, ``A S`` and ``Q``: ``3 k P`` numbers.

    Args:
      matvec: ``v -> A v`` (``A`` square; symmetric for ``"hutch++"``'s
        guarantees), on pytrees shaped like ``like``.
      like: a pytree with the structure, shapes and dtypes of ``v``.
      key: a JAX PRNG key for the probes.
      num_samples: the number of products with ``A``; at least 2 for
        ``"hutchinson"`` and 4 for ``"hutch++"`` (so that a standard error
        exists).
      method: ``"hutchinson"`` (default) or ``"hutch++"``.

    Returns:
      A :class:`TraceEstimate`.

    Raises:
      ValueError: ``method`` is unknown or ``num_samples`` too small.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from hvpopt.linalg.trace_estimation import trace
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> trace(lambda v: a @ v, jnp.zeros(3), key=jax.random.key(0), num_samples=4)
      TraceEstimate(value=Array(6., dtype=float32), std_error=Array(0., dtype=float32))
      >>> b = jnp.outer(jnp.arange(6.0), jnp.arange(6.0))  # rank 1
      >>> est = trace(lambda v: b @ v, jnp.zeros(6), key=jax.random.key(0),
      ...             num_samples=6, method="hutch++")
      >>> round(float(est.value), 3), float(jnp.trace(b))
      (55.0, 55.0)
    """
    _checks.check_choice("method", method, TRACE_METHODS)
    _checks.check_positive_int("num_samples", num_samples)
    least = 2 if method == "hutchinson" else 4
    if num_samples < least:
        raise ValueError(f"num_samples must be at least {least} for {method!r}; got {num_samples}.")
    flat, _, flat_matvec = flat_operator("like", matvec, like)
    size, dtype = flat.size, flat.dtype
    probe_key, sketch_key = jax.random.split(key)

    if method == "hutchinson":
        return _mean_and_error(_quadratic_forms(flat_matvec, probe_key, num_samples, size, dtype))

    k = num_samples // 3
    sketch = jax.random.rademacher(sketch_key, (k, size), dtype)
    q = jnp.linalg.qr(jax.lax.map(flat_matvec, sketch).T)[0].T  # [k, P], orthonormal rows
    exact = jnp.sum(q * jax.lax.map(flat_matvec, q))
    deflate = lambda z: z - (q @ z) @ q
    forms = _quadratic_forms(flat_matvec, probe_key, num_samples - 2 * k, size, dtype, deflate)
    remainder = _mean_and_error(forms)
    return TraceEstimate(exact + remainder.value, remainder.std_error)


def _quadratic_forms(matvec, key, num, size, dtype, project=lambda z: z) -> jax.Array:
    """``[g_s^T A g_s for s < num]`` with ``g_s = project(z_s)``, one product at a time."""

    def form(_, probe_key):
        g = project(jax.random.rademacher(probe_key, (size,), dtype))
        return None, jnp.vdot(g, matvec(g))

    return jax.lax.scan(form, None, jax.random.split(key, num))[1]


def _mean_and_error(forms: jax.Array) -> TraceEstimate:
    n = forms.shape[0]
    return TraceEstimate(jnp.mean(forms), jnp.std(forms, ddof=1) / jnp.sqrt(n))
