"""Conjugate gradient with diagnostics, for curvature systems ``(A + damping I) x = b``.

Preconditioned CG (Hestenes & Stiefel, 1952) minimises the quadratic model

.. math:: q(x) = \\tfrac12 x^\\top (A + \\lambda I) x - b^\\top x

over growing Krylov spaces. It assumes ``A + lambda I`` is positive definite; a
damped Hessian often is not. Where CG meets a direction ``p`` with
``p^T (A + lambda I) p <= 0`` this solver stops, keeps the last iterate (all
finite) and says so, instead of stepping to a meaningless point or returning
NaN. Every quantity CG computes (the start, the products, the step lengths, the
updated iterate) is checked the same way: at the first one that is not finite
(a NaN in ``b``, ``x0``, the matvec's output or the preconditioner's, an update
that overflows) CG stops with status ``NON_FINITE`` and returns the last finite
iterate, or zero if there is none. The options the second-order optimizers
need are built in:

* ``radius``: Steihaug-Toint truncation (Steihaug, 1983): stop where the
  iterate leaves the ball ``||x|| <= radius``, or on negative curvature, at the
  boundary point of the last direction.
* ``progress_tol``: Martens' (2010) relative-progress rule: stop at iteration
  ``i`` once ``(q_i - q_{i-k}) / q_i < k * progress_tol`` with
  ``k = max(10, i // 10)``.
* ``save_at`` and ``model_values``: iterates at chosen iterations and ``q`` at
  every iteration, for Martens' CG backtracking.
* ``x0`` (warm start), ``precond`` (a callable ``r -> M^{-1} r``; see
  :func:`jacobi_preconditioner`), and ``differentiable`` (gradients through
  the solution by ``lax.custom_linear_solve``).

References:
  Hestenes, Stiefel, "Methods of conjugate gradients for solving linear
  systems", J. Res. NBS 1952.
  Steihaug, "The conjugate gradient method and trust regions in large scale
  optimization", SIAM J. Numer. Anal. 1983.
  Martens, "Deep learning via Hessian-free optimization", ICML 2010.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from hvpopt import _checks
from hvpopt.tree import add_scaled, all_finite, select
from hvpopt.types import MatVec, PyTree


class CGStatus:
    """Why :func:`cg` stopped (the ``status`` field of :class:`CGResult`)."""

    CONVERGED = 0  #: ``||r|| <= max(rtol ||b||, atol)``.
    MAX_ITERATIONS = 1  #: ``maxiter`` iterations without converging.
    NEGATIVE_CURVATURE = 2  #: met ``p^T (A + damping I) p <= 0``.
    TRUST_REGION = 3  #: the iterate reached ``||x|| = radius``.
    NO_PROGRESS = 4  #: Martens' relative-progress rule fired.
    NON_FINITE = 5  #: a NaN or inf (in ``b``, ``x0``, a product, or an overflowing update).
    BAD_PRECONDITIONER = 6  #: ``r^T M^{-1} r <= 0``: the preconditioner is not positive definite.

    NAMES = (
        "converged",
        "max_iterations",
        "negative_curvature",
        "trust_region",
        "no_progress",
        "non_finite",
        "bad_preconditioner",
    )


class CGResult(NamedTuple):
    """The outcome of :func:`cg`.

    Attributes:
      x: the solution estimate, a pytree like ``b``; always finite (the last
        finite iterate, or zero, when ``status`` is ``NON_FINITE``).
      iterations: CG iterations taken.
      num_matvecs: products with ``A`` used (one more than ``iterations`` with
        a warm start).
      residual_norm: ``||b - (A + damping I) x||`` by the CG recurrence (no
        extra matvec); near machine precision it drifts from the true residual.
      converged: whether the residual reached the tolerance.
      negative_curvature: whether a direction of non-positive curvature was met.
      hit_boundary: whether the trust-region boundary was reached.
      status: a :class:`CGStatus` code; ``CGStatus.NAMES[status]`` in words.
      model_values: ``q(x_i)`` for ``i = 0..maxiter``; entries past
        ``iterations`` repeat the final value.
      saved_iterates: the iterates at iterations ``save_at`` (leading axis of
        size ``len(save_at)``); an iteration not reached holds the final
        iterate.
      saved_iterations: the iteration each saved iterate comes from.
    """

    x: PyTree
    iterations: jax.Array
    num_matvecs: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array
    hit_boundary: jax.Array
    status: jax.Array
    model_values: jax.Array
    saved_iterates: PyTree
    saved_iterations: jax.Array


def cg(
    matvec: MatVec,
    b: PyTree,
    *,
    x0: PyTree | None = None,
    damping: float | jax.Array = 0.0,
    precond: MatVec | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    radius: float | jax.Array | None = None,
    progress_tol: float | None = None,
    save_at: Sequence[int] = (),
    differentiable: bool = False,
) -> CGResult:
    """Solves ``(A + damping I) x = b`` by (preconditioned) conjugate gradient.

    Args:
      matvec: ``v -> A v`` on pytrees shaped like ``b`` (a Hessian, Gauss-Newton
        or Fisher operator, say). ``A`` should be symmetric.
      b: the right-hand side, any pytree of floating arrays (mixed precision
        is fine: every iterate keeps each leaf's dtype).
      x0: a warm start (costs one extra matvec); zero by default. With
        ``radius``, a start outside the trust region is scaled onto its boundary.
      damping: ``lambda >= 0`` added to the diagonal; may be traced.
      precond: ``r -> M^{-1} r`` with ``M`` symmetric positive definite (if
        ``r^T M^{-1} r <= 0`` CG stops with ``BAD_PRECONDITIONER``).
      rtol, atol: stop when ``||r|| <= max(rtol * ||b||, atol)``.
      maxiter: the most iterations; the size of ``b`` by default. ``model_values``
        holds ``maxiter + 1`` numbers.
      radius: trust-region radius for Steihaug-Toint truncation; none by default.
      progress_tol: Martens' relative-progress tolerance (he uses 5e-4); off by
        default.
      save_at: iterations whose iterates to keep, for CG backtracking (Martens
        saves ``ceil(1.3^j)``).
      differentiable: make ``x`` differentiable in ``b`` and in what ``matvec``
        closes over, by implicit differentiation (``lax.custom_linear_solve``).

    Returns:
      A :class:`CGResult`.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> result = hvpopt.cg(lambda v: a @ v, jnp.array([1.0, 2.0]))
      >>> result.x, bool(result.converged), int(result.iterations)
      (Array([0.09090909, 0.6363636 ], dtype=float32), True, 2)
      >>> indefinite = hvpopt.cg(lambda v: -v, jnp.ones(2))
      >>> hvpopt.CGStatus.NAMES[int(indefinite.status)], indefinite.x
      ('negative_curvature', Array([0., 0.], dtype=float32))
    """
    _checks.check_floating("b", b)
    size = ravel_pytree(b)[0].size
    if size == 0:
        raise ValueError("b must hold at least one number; got none.")
    if x0 is not None:
        _checks.check_like("x0", x0, "b", b)
    _checks.check_matvec_output(matvec, b, "b")
    maxiter = _checks.check_positive_int("maxiter", size if maxiter is None else maxiter)
    _checks.check_nonnegative("damping", damping, finite=True)
    _checks.check_nonnegative("rtol", rtol)
    _checks.check_nonnegative("atol", atol)
    if radius is not None:
        _checks.check_nonnegative("radius", radius)
    if progress_tol is not None:
        _checks.check_nonnegative("progress_tol", progress_tol)
    save_at = tuple(_check_iteration(index, maxiter) for index in save_at)

    if isinstance(damping, (int, float)) and damping == 0:
        damped = lambda v: otu.tree_cast_like(matvec(v), v)
    else:
        damped = lambda v: otu.tree_cast_like(add_scaled(matvec(v), damping, v), v)
    options = dict(
        x0=x0,
        precond=precond,
        rtol=rtol,
        atol=atol,
        maxiter=maxiter,
        radius=radius,
        progress_tol=progress_tol,
        save_at=save_at,
    )
    if not differentiable:
        return _cg(damped, b, **options)

    def solve(operator, rhs):
        result = _cg(operator, rhs, **options)
        return result.x, result._replace(x=None)

    x, diagnostics = jax.lax.custom_linear_solve(damped, b, solve, symmetric=True, has_aux=True)
    return diagnostics._replace(x=x)


def jacobi_preconditioner(diagonal: PyTree, *, damping: float = 0.0, exponent: float = 1.0) -> MatVec:
    """``r -> r / (|d| + damping)^exponent``, a diagonal (Jacobi) preconditioner.

    ``diagonal`` is the curvature's diagonal, exact or estimated (see
    :func:`hvpopt.hutchinson_diagonal`); its absolute value is used because an
    estimate of a positive diagonal can come out negative. Martens (2010) uses
    the empirical Fisher diagonal with ``exponent=0.75``. Entries are floored at
    a tiny multiple of the largest so the division stays finite.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> hvpopt.jacobi_preconditioner(jnp.array([4.0, 1.0]))(jnp.array([2.0, 2.0]))
      Array([0.5, 2. ], dtype=float32)
    """
    scale = jax.tree.map(lambda d: (jnp.abs(d) + damping) ** exponent, diagonal)
    largest = otu.tree_max(scale)
    floor = jnp.finfo(ravel_pytree(scale)[0].dtype).tiny + 1e-12 * largest
    scale = jax.tree.map(lambda s: jnp.maximum(s, floor), scale)
    return lambda r: otu.tree_div(r, scale)


class _State(NamedTuple):
    iteration: jax.Array
    x: PyTree
    r: PyTree
    z: PyTree
    p: PyTree
    rz: jax.Array
    status: jax.Array
    done: jax.Array
    model_values: jax.Array
    saved: PyTree
    saved_iterations: jax.Array


def _cg(matvec, b, *, x0, precond, rtol, atol, maxiter, radius, progress_tol, save_at) -> CGResult:
    precond = precond or (lambda r: r)
    dtype = ravel_pytree(b)[0].dtype
    b_norm = otu.tree_norm(b)
    tolerance = jnp.maximum(rtol * b_norm, atol)
    zero = otu.tree_zeros_like(b)
    x = zero if x0 is None else x0
    if x0 is not None and radius is not None:  # a warm start outside the region: onto its boundary
        x = otu.tree_scale(jnp.minimum(1.0, radius / jnp.maximum(otu.tree_norm(x), 1e-30)), x)
        x = otu.tree_cast_like(x, b)
    r = b if x0 is None else otu.tree_cast_like(otu.tree_sub(b, matvec(x)), b)
    # A start that is not finite: zero, whose residual is b (non-finite too if b is).
    finite0 = all_finite(b, b_norm, x, r)
    x, r = select(finite0, x, zero), select(finite0, r, b)
    z = precond(r)
    model = lambda x, r: -0.5 * otu.tree_vdot(x, otu.tree_add(b, r))  # q(x), as b - r = A x
    q0 = jnp.where(finite0, model(x, r), 0.0)  # q(0) = 0
    model_values = jnp.zeros(maxiter + 1, dtype).at[0].set(q0.astype(dtype))
    saved = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (len(save_at), *leaf.shape)), x)
    save_at_array = jnp.asarray(save_at, jnp.int32).reshape(len(save_at))
    rz0 = otu.tree_vdot(r, z)
    finite0 = finite0 & all_finite(z, rz0)
    converged0 = finite0 & (otu.tree_norm(r) <= tolerance)
    bad0 = finite0 & ~converged0 & ~(rz0 > 0)
    status0 = jnp.select(
        [~finite0, converged0, bad0],
        [CGStatus.NON_FINITE, CGStatus.CONVERGED, CGStatus.BAD_PRECONDITIONER],
        CGStatus.MAX_ITERATIONS,
    )
    state = _State(
        iteration=jnp.asarray(0, jnp.int32),
        x=x,
        r=r,
        z=z,
        p=z,
        rz=rz0,
        status=status0.astype(jnp.int32),
        done=~finite0 | converged0 | bad0,
        model_values=model_values,
        saved=saved,
        saved_iterations=jnp.zeros(len(save_at), jnp.int32),
    )

    def step(state: _State) -> _State:
        i = state.iteration + 1
        ap = matvec(state.p)
        curvature = otu.tree_vdot(state.p, ap)
        negative = curvature <= 0
        alpha = state.rz / jnp.where(negative, 1.0, curvature)
        x_next = add_scaled(state.x, alpha, state.p)
        r_next = add_scaled(state.r, -alpha, ap)
        status = state.status
        if radius is None:
            x_next = select(negative, state.x, x_next)
            r_next = select(negative, state.r, r_next)
            hit_boundary = jnp.asarray(False)
        else:
            outside = otu.tree_norm(x_next) >= radius
            hit_boundary = negative | outside
            tau = _to_boundary(state.x, state.p, radius)
            x_next = select(hit_boundary, add_scaled(state.x, tau, state.p), x_next)
            r_next = select(hit_boundary, add_scaled(state.r, -tau, ap), r_next)
        z_next = precond(r_next)
        rz_next = otu.tree_vdot(r_next, z_next)
        beta = rz_next / jnp.where(state.rz == 0, 1.0, state.rz)
        p_next = add_scaled(z_next, beta, state.p)
        # One check for every way a number can go bad; the direction matters only if CG goes on.
        going_on = ~(negative | hit_boundary)
        finite = all_finite(curvature, x_next, r_next) & (~going_on | all_finite(rz_next, p_next))
        x_next, r_next = select(finite, x_next, state.x), select(finite, r_next, state.r)
        z_next, p_next = select(finite, z_next, state.z), select(finite, p_next, state.p)
        rz_next = jnp.where(finite, rz_next, state.rz)
        negative, hit_boundary = finite & negative, finite & hit_boundary
        if radius is not None:
            status = jnp.where(outside & ~negative, CGStatus.TRUST_REGION, status)
        q_next = model(x_next, r_next)
        model_values = state.model_values.at[i].set(q_next.astype(dtype))
        window = jnp.maximum(10, i // 10)
        converged = otu.tree_norm(r_next) <= tolerance
        bad_precond = ~converged & ~(rz_next > 0)
        stalled = jnp.asarray(False)
        if progress_tol is not None:
            q_before = model_values[jnp.maximum(i - window, 0)]
            stalled = (i > window) & (q_next < 0) & ((q_next - q_before) / q_next < window * progress_tol)
        status = jnp.select(
            [~finite, negative, hit_boundary, converged, bad_precond, stalled],
            [
                CGStatus.NON_FINITE,
                CGStatus.NEGATIVE_CURVATURE,
                status,
                CGStatus.CONVERGED,
                CGStatus.BAD_PRECONDITIONER,
                CGStatus.NO_PROGRESS,
            ],
            status,
        ).astype(jnp.int32)
        done = ~finite | negative | hit_boundary | converged | bad_precond | stalled | (i >= maxiter)
        is_saved = save_at_array == i
        saved = jax.tree.map(
            lambda s, leaf: jnp.where(is_saved.reshape(-1, *([1] * leaf.ndim)), leaf[None], s),
            state.saved,
            x_next,
        )
        return _State(
            iteration=i,
            x=x_next,
            r=r_next,
            z=z_next,
            p=p_next,
            rz=rz_next,
            status=status,
            done=done,
            model_values=model_values,
            saved=saved,
            saved_iterations=jnp.where(is_saved, i, state.saved_iterations),
        )

    final = jax.lax.while_loop(lambda s: ~s.done, step, state)
    reached = save_at_array <= final.iteration
    saved = jax.tree.map(
        lambda s, leaf: jnp.where(reached.reshape(-1, *([1] * leaf.ndim)), s, leaf[None]),
        final.saved,
        final.x,
    )
    last_value = final.model_values[final.iteration]
    steps = jnp.arange(maxiter + 1)
    return CGResult(
        x=final.x,
        iterations=final.iteration,
        num_matvecs=final.iteration + (0 if x0 is None else 1),
        residual_norm=otu.tree_norm(final.r),
        converged=final.status == CGStatus.CONVERGED,
        negative_curvature=final.status == CGStatus.NEGATIVE_CURVATURE,
        hit_boundary=(final.status == CGStatus.TRUST_REGION)
        | ((final.status == CGStatus.NEGATIVE_CURVATURE) & (radius is not None)),
        status=final.status,
        model_values=jnp.where(steps <= final.iteration, final.model_values, last_value),
        saved_iterates=saved,
        saved_iterations=jnp.where(reached, final.saved_iterations, final.iteration),
    )


def _to_boundary(x: PyTree, p: PyTree, radius) -> jax.Array:
    """``tau >= 0`` with ``||x + tau p|| = radius`` (``||x|| <= radius``)."""
    xp, pp, xx = otu.tree_vdot(x, p), otu.tree_vdot(p, p), otu.tree_vdot(x, x)
    pp = jnp.where(pp > 0, pp, 1.0)
    return (-xp + jnp.sqrt(jnp.maximum(xp**2 + pp * (radius**2 - xx), 0.0))) / pp


def _check_iteration(index: Any, maxiter: int) -> int:
    number = _checks.as_int(index)
    if number is None or not 0 <= number <= maxiter:
        raise ValueError(f"save_at must hold iterations in [0, maxiter={maxiter}]; got {index!r}.")
    return number
