"""LiSSA: the inverse of a curvature matrix applied to a vector by a Neumann series.

With ``B = (A + lambda I) / s`` and ``0 < eig(B) < 2``,

.. math:: (A + \\lambda I)^{-1} b = \\frac{1}{s} \\sum_{j \\ge 0} (I - B)^j b,

so the recursion ``h_0 = b``, ``h_{j+1} = b + (I - B) h_j`` gives
``x = h_depth / s`` (Agarwal, Bullins, Hazan, 2017). Each step may use a
different stochastic estimate of ``A`` (a mini-batch Hessian, say), as Koh &
Liang (2017) do for influence functions; independent repeats are averaged.

The series converges only if ``A + lambda I`` is positive definite and ``s``
exceeds half its largest eigenvalue. When ``scale`` is not given it is set to
``1.1`` times a power-iteration estimate of that eigenvalue. If the series
diverges anyway (an indefinite matrix, a scale too small) the recursion stops
at the first sign of growth and the result says ``diverged`` instead of
overflowing: with deterministic products, the first step longer than an
earlier one (the terms of a convergent series never grow); with stochastic
ones, a step 100 times ``||b||``. In the same way the recursion stops at the
first number that is not finite (in ``b``, a product, the scale, an update), and
returns the last finite partial sum (zero if there is none) with status
``NON_FINITE``.

References:
  Agarwal, Bullins, Hazan, "Second-order stochastic optimization for machine
  learning in linear time", JMLR 2017.
  Koh, Liang, "Understanding black-box predictions via influence functions",
  ICML 2017.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from hvpopt import _checks
from hvpopt.tree import add_scaled, all_finite, select
from hvpopt.types import PyTree

#: Deterministic products: the series is declared divergent once a step is
#: longer than the shortest so far by this fraction (beyond rounding). The steps
#: ``(I - B)^j b`` of a convergent series never grow.
GROWTH_TOLERANCE = 1e-3

#: Stochastic products, whose steps fluctuate: divergent once a step is this
#: many times ``||b||``.
DIVERGENCE_FACTOR = 100.0


class LissaStatus:
    """How :func:`lissa`'s series ended (the ``status`` field of :class:`LissaResult`)."""

    COMPLETED = 0  #: every repeat summed ``depth`` terms.
    DIVERGED = 1  #: a repeat's terms grew (the series does not converge).
    NON_FINITE = 2  #: a NaN or inf (in ``b``, a product, the scale or an update).

    NAMES = ("completed", "diverged", "non_finite")


class LissaResult(NamedTuple):
    """The outcome of :func:`lissa`.

    Attributes:
      x: the estimate of ``(A + damping I)^{-1} b``, averaged over repeats;
        always finite.
      scale: the scale ``s`` used.
      diverged: whether any repeat stopped before ``depth`` terms, its series
        growing or a number not finite (then ``x`` holds the partial sums
        before that, zero if none was finite, and should not be trusted).
      status: a :class:`LissaStatus` code, the worst over repeats;
        ``LissaStatus.NAMES[status]`` in words.
      step_norm: ``||h_depth - h_{depth-1}|| / s``, the size of the last term,
        averaged over repeats. It shows whether the terms still matter, but it
        is no error bound: the remaining error is about ``step_norm`` divided
        by the smallest eigenvalue of ``(A + damping I) / s``.
      num_matvecs: products with ``A`` used, the scale estimate included.
    """

    x: PyTree
    scale: jax.Array
    diverged: jax.Array
    status: jax.Array
    step_norm: jax.Array
    num_matvecs: jax.Array


def lissa(
    matvec: Callable,
    b: PyTree,
    *,
    damping: float | jax.Array,
    depth: int,
    key: jax.Array,
    num_repeats: int = 1,
    scale: float | jax.Array | None = None,
    stochastic: bool = False,
    power_iters: int = 20,
) -> LissaResult:
    """Estimates ``(A + damping I)^{-1} b`` by the stochastic Neumann series.

    Args:
      matvec: ``v -> A v``, or with ``stochastic=True``, ``(v, key) -> A_key v``
        with ``E[A_key] = A`` (a Hessian on a mini-batch drawn with ``key``).
      b: the right-hand side, any pytree of floating arrays.
      damping: ``lambda >= 0``.
      depth: terms of the series per repeat.
      key: a JAX PRNG key (for the stochastic products and the scale estimate).
      num_repeats: independent series to average (useful when stochastic).
      scale: ``s``; by default ``1.1`` times a power-iteration estimate of the
        largest eigenvalue of ``A + damping I``.
      stochastic: whether ``matvec`` takes a key.
      power_iters: power iterations for the default scale.

    Returns:
      A :class:`LissaResult`.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> a = jnp.diag(jnp.array([1.0, 2.0]))
      >>> result = hvpopt.lissa(lambda v: a @ v, jnp.ones(2), damping=0.0, depth=100,
      ...                       key=jax.random.key(0))
      >>> result.x.round(4), bool(result.diverged)
      (Array([1. , 0.5], dtype=float32), False)
    """
    _checks.check_floating("b", b)
    depth = _checks.check_positive_int("depth", depth)
    num_repeats = _checks.check_positive_int("num_repeats", num_repeats)
    power_iters = _checks.check_positive_int("power_iters", power_iters)
    _checks.check_nonnegative("damping", damping, finite=True)
    if isinstance(scale, (int, float)) and not scale > 0:
        raise ValueError(f"scale must be > 0; got {scale!r}.")
    product = matvec if stochastic else (lambda v, _: matvec(v))
    _checks.check_matvec_output(lambda v: product(v, key), b, "b")
    damped = lambda v, k: otu.tree_cast_like(add_scaled(product(v, k), damping, v), v)
    dtype = ravel_pytree(b)[0].dtype
    scale_key, series_key = jax.random.split(key)
    used = 0
    if scale is None:
        scale = 1.1 * _largest_eigenvalue(damped, b, scale_key, power_iters)
        used = power_iters
    scale = jnp.asarray(scale, dtype)
    valid = scale > 0  # a traced scale is checked here
    inverse_scale = jnp.where(valid, 1.0 / jnp.where(valid, scale, 1.0), 0.0).astype(dtype)
    b_norm = otu.tree_norm(b)
    start_finite = all_finite(b, b_norm, scale, inverse_scale)
    start_status = jnp.select(
        [~start_finite, ~valid], [LissaStatus.NON_FINITE, LissaStatus.DIVERGED], LissaStatus.COMPLETED
    ).astype(jnp.int32)
    h0 = select(start_finite, b, otu.tree_zeros_like(b))  # the first partial sum, zero if not finite
    rounding = 1e3 * jnp.finfo(dtype).eps * b_norm

    def series(repeat_key: jax.Array):
        def step(carry):
            j, h, last_size, smallest, _, k = carry
            k, step_key = jax.random.split(k)
            update = add_scaled(b, -inverse_scale, damped(h, step_key))
            h_next = jax.tree.map(lambda a, u: (a + u).astype(a.dtype), h, update)
            size = otu.tree_norm(update).astype(dtype)
            if stochastic:  # noisy steps: only a blow-up is a sure sign
                growing = size > DIVERGENCE_FACTOR * b_norm
            else:  # a convergent series has non-increasing steps
                growing = (size > (1 + GROWTH_TOLERANCE) * smallest) & (size > rounding)
            finite = all_finite(size, h_next)
            status = jnp.select(
                [~finite, growing], [LissaStatus.NON_FINITE, LissaStatus.DIVERGED], LissaStatus.COMPLETED
            ).astype(jnp.int32)
            stop = status != LissaStatus.COMPLETED
            h_next = select(stop, h, h_next)
            size = jnp.where(stop, last_size, size)
            return j + 1, h_next, size, jnp.minimum(smallest, size), status, k

        def keep_going(carry):
            j, _, _, _, status, _ = carry
            return (j < depth) & (status == LissaStatus.COMPLETED)

        first_size = jnp.where(start_finite, b_norm, 0.0)
        start = (jnp.asarray(0, jnp.int32), h0, first_size, first_size, start_status, repeat_key)
        steps, h, size, _, status, _ = jax.lax.while_loop(keep_going, step, start)
        inverse = jnp.where(start_finite, inverse_scale, 0.0)
        return otu.tree_scale(inverse, h), size * inverse, status, steps

    estimates, sizes, statuses, steps = jax.lax.map(series, jax.random.split(series_key, num_repeats))
    status = jnp.max(statuses)
    return LissaResult(
        x=otu.tree_cast_like(jax.tree.map(lambda e: jnp.mean(e, axis=0), estimates), b),
        scale=scale,
        diverged=status != LissaStatus.COMPLETED,
        status=status,
        step_norm=jnp.mean(sizes),
        num_matvecs=(used + jnp.sum(steps)).astype(jnp.int32),
    )


def _largest_eigenvalue(damped: Callable, like: PyTree, key: jax.Array, num_iters: int) -> jax.Array:
    """Power iteration: ``|lambda|_max`` of ``damped`` (a lower estimate)."""
    start_key, product_key = jax.random.split(key)
    v = otu.tree_random_like(start_key, like, jax.random.normal)
    v = otu.tree_cast_like(otu.tree_scale(1.0 / otu.tree_norm(v), v), like)
    zero = jnp.zeros((), ravel_pytree(like)[0].dtype)

    def step(carry, step_key):
        v, _ = carry
        av = damped(v, step_key)
        norm = otu.tree_norm(av)
        v_next = otu.tree_cast_like(otu.tree_scale(1.0 / jnp.where(norm > 0, norm, 1.0), av), v)
        return (v_next, norm.astype(zero.dtype)), None

    (_, estimate), _ = jax.lax.scan(step, (v, zero), jax.random.split(product_key, num_iters))
    return jnp.where(estimate > 0, estimate, 1.0)
