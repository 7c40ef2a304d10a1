"""Lanczos tridiagonalisation and extreme eigenpairs of a symmetric operator.

After ``m`` steps from a unit vector ``q_1``, Lanczos (1950) has an orthonormal
basis ``Q = [q_1 ... q_m]`` of the Krylov space
``span(q_1, A q_1, ..., A^{m-1} q_1)`` and the tridiagonal ``T = Q^T A Q``:

.. math:: A Q = Q T + \\beta_m q_{m+1} e_m^\\top, \\qquad
   T = \\mathrm{tridiag}(\\beta_{1..m-1}; \\alpha_{1..m}; \\beta_{1..m-1}).

The eigenvalues of ``T`` (Ritz values) approximate the extreme eigenvalues of
``A`` first; a Ritz pair ``(theta, Q s)`` has residual
``||A Q s - theta Q s|| = beta_m |s_m|``.

In floating point the ``q_i`` lose orthogonality as Ritz values converge and
spurious copies of eigenvalues appear. Here every new vector is orthogonalised
against the whole basis twice (classical Gram-Schmidt twice, "twice is
enough"), so ``Q`` stays orthonormal to working precision and ``T`` has no
spurious copies, at ``O(m^2 P)`` work and ``m P`` memory for ``P`` parameters.

Breakdown: when the Krylov space is exhausted (``A`` has fewer than ``m``
distinct eigenvalues along ``q_1``, or rank below ``m``), the new residual
vanishes. Where ``beta_j <= 100 eps ||A||_est`` (``eps`` of the dtype,
``||A||_est = max_i ||A q_i||`` so far), the residual is dropped, the
off-diagonal ``beta_j`` is stored as exactly ``0`` and the recurrence restarts
from a fresh direction orthogonal to the basis: the coordinate vector ``e_i``
least represented in it (``i`` minimising ``sum_j Q_ij^2``), orthogonalised
twice. No randomness and no NaN; ``T`` becomes block diagonal, each block the
projection of ``A`` on an invariant (to rounding) Krylov space, so every Ritz
value is still an eigenvalue estimate of ``A``.

References:
  Lanczos, "An iteration method for the solution of the eigenvalue problem of
  linear differential and integral operators", J. Res. NBS 1950.
  Parlett, "The Symmetric Eigenvalue Problem", SIAM 1998 (ch. 13, full
  reorthogonalisation; "twice is enough", sec. 6.9).
  Golub, Van Loan, "Matrix Computations", 4th ed., sec. 10.1.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from hvpopt import _checks

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

EIGSH_WHICH = ("LA", "SA", "LM")

# Breakdown when beta <= _BREAKDOWN_EPS * eps(dtype) * ||A||_est.
_BREAKDOWN_EPS = 100.0


class LanczosDecomposition(NamedTuple):
    """The outcome of :func:`lanczos_tridiagonal`.

    Attributes:
      basis: ``Q``, the orthonormal Lanczos vectors, a pytree like ``v0`` whose
        leaves have a leading axis of size ``num_iters`` (``basis[i]`` is
        ``q_{i+1}``).
      diagonal: ``alpha``, the ``num_iters`` diagonal entries of ``T = Q^T A Q``.
      off_diagonal: ``beta``, the ``num_iters - 1`` off-diagonal entries of
        ``T``; exactly ``0`` where the Krylov space was exhausted and the
        recurrence restarted.
    """

    basis: PyTree
    diagonal: jax.Array
    off_diagonal: jax.Array


class EigshResult(NamedTuple):
    """The outcome of :func:`eigsh`.

    Attributes:
      eigenvalues: the ``k`` Ritz values, in ascending order (as scipy's
        ``eigsh`` returns them, for every ``which``).
      eigenvectors: the unit Ritz vectors, a pytree like ``like`` whose leaves
        have a leading axis of size ``k``; ``eigenvectors[i]`` goes with
        ``eigenvalues[i]``. Each is defined up to sign.
      residual_norms: ``||A x_i - lambda_i x_i||`` by the Lanczos estimate
        ``beta_m |s_{m,i}|`` (no extra products). With full
        reorthogonalisation it matches the true residual to rounding, plus at
        most ``100 eps ||A||`` per breakdown.
      num_matvecs: products with ``A`` used (``num_iters``).
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residual_norms: jax.Array
    num_matvecs: jax.Array


def lanczos_tridiagonal(matvec: MatVec, v0: PyTree, num_iters: int) -> LanczosDecomposition:
    """Lanczos tridiagonalisation ``A Q = Q T + r e_m^T`` with full reorthogonalisation.

    .. math:: T = Q^\\top A Q, \\qquad Q^\\top Q = I, \\qquad q_1 = v_0 / \\|v_0\\|.

    ``e_1^T f(T) e_1`` is the Gauss quadrature of ``q_1^T f(A) q_1`` (exact for
    polynomials of degree up to ``2 m - 1``), which :func:`spectral_density`
    uses. See the module docstring for breakdown (no NaN: a fresh orthogonal
    direction); a zero ``v0`` starts from ``e_1``.

    Args:
      matvec: ``v -> A v`` with ``A`` symmetric, on pytrees shaped like ``v0``.
      v0: the starting vector, any pytree of floating arrays (need not be
        normalised).
      num_iters: ``m``, the Lanczos steps (products with ``A``); at most the
        number of parameters ``P``.

    Returns:
      A :class:`LanczosDecomposition`.

    Raises:
      ValueError: ``num_iters`` is not a positive integer or exceeds ``P``.

    Example:
      >>> import jax.numpy as jnp
      >>> from hvpopt.linalg.lanczos import lanczos_tridiagonal, tridiagonal
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> dec = lanczos_tridiagonal(lambda v: a @ v, jnp.ones(3), 3)
      >>> jnp.linalg.eigvalsh(tridiagonal(dec.diagonal, dec.off_diagonal)).round(4)
      Array([1., 2., 3.], dtype=float32)
      >>> dec.basis.shape
      (3, 3)
    """
    flat_v0, unravel, flat_matvec = flat_operator("v0", matvec, v0)
    check_num_iters(num_iters, flat_v0.size)
    basis, alphas, betas, _ = lanczos_flat(flat_matvec, flat_v0, num_iters)
    return LanczosDecomposition(jax.vmap(unravel)(basis), alphas, betas)


def eigsh(
    matvec: MatVec,
    like: PyTree,
    k: int,
    *,
    key: jax.Array,
    which: str = "LA",
    num_iters: int | None = None,
) -> EigshResult:
    """``k`` extreme eigenpairs of a symmetric operator by Lanczos (like scipy's ``eigsh``).

    One Lanczos run of ``m = num_iters`` steps from a Gaussian random start,
    then ``T = S diag(theta) S^T`` (``jnp.linalg.eigh``) and the Ritz pairs
    ``(theta_i, Q s_i)``. ``which`` picks them:

    * ``"LA"``: the ``k`` largest algebraic (the top of a Hessian's spectrum);
    * ``"SA"``: the ``k`` smallest algebraic (its most negative curvature);
    * ``"LM"``: the ``k`` largest in magnitude.

    There is no restart: accuracy grows with ``num_iters`` (exact, up to
    rounding, at ``num_iters = P``). Check ``residual_norms``; an eigenvalue's
    error is at most its residual norm, and at most ``residual^2 / gap`` for an
    isolated one.

    Args:
      matvec: ``v -> A v`` with ``A`` symmetric (a Hessian, Gauss-Newton or
        Fisher operator), on pytrees shaped like ``like``.
      like: a pytree with the structure, shapes and dtypes of ``v``.
      k: the number of eigenpairs, at most ``P`` (the number of parameters).
      key: a JAX PRNG key for the starting vector.
      which: ``"LA"`` (default), ``"SA"`` or ``"LM"``.
      num_iters: Lanczos steps ``m`` (products with ``A``), at least ``k``;
        ``min(P, max(2k + 1, 20))`` by default (ARPACK's default subspace
        size); clamped to ``P``. Memory is ``m P`` numbers.

    Returns:
      An :class:`EigshResult`, eigenvalues in ascending order.

    Raises:
      ValueError: ``k`` is not a positive integer or exceeds ``P``, ``which``
        is unknown, or ``num_iters`` is below ``k``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from hvpopt.linalg.lanczos import eigsh
      >>> a = jnp.diag(jnp.arange(1.0, 11.0))
      >>> result = eigsh(lambda v: a @ v, jnp.zeros(10), 2, key=jax.random.key(0))
      >>> result.eigenvalues.round(3), result.eigenvectors.shape
      (Array([ 9., 10.], dtype=float32), (2, 10))
      >>> eigsh(lambda v: a @ v, jnp.zeros(10), 1, key=jax.random.key(0),
      ...       which="SA").eigenvalues.round(3)
      Array([1.], dtype=float32)
    """
    flat_like, unravel, flat_matvec = flat_operator("like", matvec, like)
    size = flat_like.size
    _checks.check_positive_int("k", k)
    if k > size:
        raise ValueError(f"k must be at most the number of parameters {size}; got {k}.")
    _checks.check_choice("which", which, EIGSH_WHICH)
    if num_iters is None:
        num_iters = max(2 * k + 1, 20)
    _checks.check_positive_int("num_iters", num_iters)
    if num_iters < k:
        raise ValueError(f"num_iters must be at least k={k}; got {num_iters}.")
    num_iters = min(num_iters, size)

    v0 = jax.random.normal(key, (size,), flat_like.dtype)
    basis, alphas, betas, last_beta = lanczos_flat(flat_matvec, v0, num_iters)
    theta, s = jnp.linalg.eigh(tridiagonal(alphas, betas))  # ascending
    if which == "LA":
        index = jnp.arange(num_iters - k, num_iters)
    elif which == "SA":
        index = jnp.arange(k)
    else:
        index = jnp.sort(jnp.argsort(-jnp.abs(theta), stable=True)[:k])
    vectors = s[:, index].T @ basis  # [k, P]
    return EigshResult(
        eigenvalues=theta[index],
        eigenvectors=jax.vmap(unravel)(vectors),
        residual_norms=jnp.abs(last_beta * s[-1, index]),
        num_matvecs=jnp.asarray(num_iters),
    )


def tridiagonal(diagonal: jax.Array, off_diagonal: jax.Array) -> jax.Array:
    """The dense symmetric tridiagonal matrix with these diagonals."""
    return jnp.diag(diagonal) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)


def lanczos_flat(
    matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, num_iters: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Lanczos on flat vectors: ``(Q [m, P], alpha [m], beta [m - 1], beta_m)``.

    ``beta_m = ||r||`` is the norm of the final residual (after
    reorthogonalisation), for residual estimates of Ritz pairs.
    """
    size, dtype = v0.size, v0.dtype
    threshold = _BREAKDOWN_EPS * jnp.finfo(dtype).eps

    def orthogonalise(basis, w):
        # Classical Gram-Schmidt twice against every row; rows not yet filled are zero.
        for _ in range(2):
            w = w - (basis @ w) @ basis
        return w

    def fresh_direction(basis):
        # The coordinate vector least represented in the basis: sum_j Q_ij^2 <= (m-1)/P
        # for it, so its orthogonal part has norm^2 >= 1/P while the basis is incomplete.
        coverage = jnp.sum(basis * basis, axis=0)
        e = jnp.zeros(size, dtype).at[jnp.argmin(coverage)].set(1)
        e = orthogonalise(basis, e)
        return e / jnp.maximum(jnp.linalg.norm(e), jnp.finfo(dtype).tiny)

    norm0 = jnp.linalg.norm(v0)
    q0 = jnp.where(norm0 > 0, v0 / jnp.where(norm0 > 0, norm0, 1), jnp.zeros_like(v0).at[0].set(1))
    basis = jnp.zeros((num_iters, size), dtype).at[0].set(q0)
    alphas = jnp.zeros(num_iters, dtype)
    betas = jnp.zeros(num_iters, dtype)  # the last entry is the final residual norm

    def step(j, state):
        basis, alphas, betas, scale = state
        q = basis[j]
        w = matvec(q)
        scale = jnp.maximum(scale, jnp.linalg.norm(w))
        alpha = jnp.vdot(q, w)
        beta_prev = jnp.where(j > 0, betas[j - 1], 0)
        w = w - alpha * q - beta_prev * basis[jnp.maximum(j - 1, 0)]
        w = orthogonalise(basis, w)
        beta = jnp.linalg.norm(w)
        broke = beta <= threshold * scale
        is_last = j == num_iters - 1
        q_next = jax.lax.cond(
            broke & ~is_last,
            lambda: fresh_direction(basis),
            lambda: w / jnp.where(broke, 1, beta),
        )
        basis = basis.at[j + 1].set(q_next, mode="drop")
        alphas = alphas.at[j].set(alpha)
        betas = betas.at[j].set(jnp.where(broke & ~is_last, 0, beta))
        return basis, alphas, betas, scale

    state = (basis, alphas, betas, jnp.zeros((), dtype))
    basis, alphas, betas, _ = jax.lax.fori_loop(0, num_iters, step, state)
    return basis, alphas, betas[:-1], betas[-1]


def check_num_iters(num_iters: Any, size: int) -> None:
    """Raises ValueError unless ``1 <= num_iters <= size`` (an int)."""
    _checks.check_positive_int("num_iters", num_iters)
    if num_iters > size:
        raise ValueError(
            f"num_iters must be at most the number of parameters {size}; got {num_iters}."
        )


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
