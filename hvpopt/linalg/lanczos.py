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
against the filled part of the basis twice (block Gram-Schmidt twice, "twice is
enough"), so ``Q`` stays orthonormal to working precision and ``T`` has no
spurious copies, at ``O(m^2 P)`` work and ``m P`` memory for ``P`` parameters.
The basis is stored in blocks of at most 32 rows and step ``j`` reads only the
blocks that hold vectors, so its orthogonalisation costs about ``4 j P`` flops,
not ``4 m P``.

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

:func:`eigsh` restarts the basis when it is full (thick restart, Wu & Simon
2000), which keeps memory at ``m + 1`` vectors however many products it takes
to converge, and checks a converged answer with a block from a fresh random
start orthogonal to it, which finds the copies of a multiple eigenvalue that
one Krylov space misses: see its docstring.

References:
  Lanczos, "An iteration method for the solution of the eigenvalue problem of
  linear differential and integral operators", J. Res. NBS 1950.
  Parlett, "The Symmetric Eigenvalue Problem", SIAM 1998 (ch. 13, full
  reorthogonalisation; "twice is enough", sec. 6.9).
  Golub, Van Loan, "Matrix Computations", 4th ed., sec. 10.1.
  Wu, Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
  problems", SIAM J. Matrix Anal. Appl. 22(2), 2000.
  Stathopoulos, Saad, Wu, "Dynamic thick restarting of the Davidson, and the
  implicitly restarted Arnoldi methods", SIAM J. Sci. Comput. 19(1), 1998.
  Saad, "Numerical Methods for Large Eigenvalue Problems", 2nd ed., SIAM 2011
  (locking and deflation of converged Ritz pairs).
  Lehoucq, Sorensen, Yang, "ARPACK Users' Guide", SIAM 1998 (the stopping
  rule, sec. 4.6).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hvpopt import _checks
from hvpopt.linalg.flat import check_num_iters, flat_operator
from hvpopt.types import MatVec, PyTree

EIGSH_WHICH = ("LA", "SA", "LM")

# Breakdown when beta <= _BREAKDOWN_EPS * eps(dtype) * ||A||_est.
_BREAKDOWN_EPS = 100.0
# Gram-Schmidt reads the basis in blocks of at most this many rows.
_BLOCK_ROWS = 32
# eigsh's default tolerance: max(_DEFAULT_TOL, sqrt(eps)) of the dtype.
_DEFAULT_TOL = 1e-6
# eigsh's default budget of products: _BUDGET_CYCLES full bases.
_BUDGET_CYCLES = 20


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
      residual_norms: ``||A x_i - lambda_i x_i||``. Taken with ``k`` products
        after a verification block (see :func:`eigsh`); otherwise the Lanczos
        estimate ``beta_m |s_{m,i}|`` (no extra products), which with full
        reorthogonalisation matches the true residual to rounding, plus at
        most ``100 eps ||A||`` per breakdown.
      num_matvecs: products with ``A`` used.
      converged: ``[k]`` booleans: ``residual_norms[i] <= tol * norm_estimate``
        and, where the basis restarts, a verification block found no other
        wanted eigenvalue (all ``False`` if the budget ended first).
      all_converged: ``converged.all()``, the flag to branch on.
      norm_estimate: ``||A||_est``, the largest ``|Ritz value|`` of the final
        basis (a lower bound on ``||A||_2``): the scale of the stopping rule.
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residual_norms: jax.Array
    num_matvecs: jax.Array
    converged: jax.Array
    all_converged: jax.Array
    norm_estimate: jax.Array


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
    tol: float | jax.Array | None = None,
    max_matvecs: int | None = None,
    num_iters: int | None = None,
) -> EigshResult:
    """``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos (like scipy's ``eigsh``).

    Lanczos from a Gaussian random start fills a basis of ``m`` vectors; the
    Ritz pairs ``(theta_i, Q s_i)`` come from ``T = S diag(theta) S^T``
    (``jnp.linalg.eigh``). ``which`` picks the ``k`` wanted ones:

    * ``"LA"``: the ``k`` largest algebraic (the top of a Hessian's spectrum);
    * ``"SA"``: the ``k`` smallest algebraic (its most negative curvature);
    * ``"LM"``: the ``k`` largest in magnitude.

    Stopping rule (ARPACK's ``||r_i|| <= tol |theta_i|`` with the operator's
    scale in place of ``|theta_i|``, so that eigenvalues near zero converge
    too): pair ``i`` has converged when its residual

    .. math:: \\|A x_i - \\theta_i x_i\\| = \\beta_m |s_{m,i}|
       \\le \\mathrm{tol} \\cdot \\|A\\|_{est}, \\qquad
       \\|A\\|_{est} = \\max_j |\\theta_j|,

    the largest Ritz value in magnitude of the current basis. Then an
    eigenvalue of ``A`` lies within ``tol ||A||_est`` of ``theta_i``, and within
    ``(tol ||A||_est)^2 / gap`` if ``theta_i`` is isolated by ``gap`` from the
    rest of the spectrum.

    Thick restart (Wu & Simon 2000): when the basis is full and some wanted
    pair has not converged, keep the ``l = k + (m - k) // 2`` Ritz vectors
    ``Y = Q S_l`` nearest the wanted end and the residual direction
    ``q_{m+1}``. Since ``A Y = Y Theta_l + beta_m q_{m+1} (e_m^T S_l)``, the
    projection on ``[Y, q_{m+1}, ...]`` is an arrowhead matrix followed by the
    usual tridiagonal,

    .. math:: T' = \\begin{pmatrix} \\Theta_l & b & \\\\ b^\\top & \\alpha_{l+1}
       & \\beta_{l+1} \\\\ & \\beta_{l+1} & \\ddots \\end{pmatrix},
       \\qquad b = \\beta_m S_l^\\top e_m,

    and Lanczos continues from ``q_{m+1}`` with full reorthogonalisation
    against all kept vectors, ``m - l`` products per restart, until every
    wanted pair has converged or the next restart would pass ``max_matvecs``.
    Each restart is equivalent to an implicit restart of ARPACK with exact
    shifts at the unwanted Ritz values (Stathopoulos, Saad & Wu 1998). Memory is
    ``m + 1`` vectors throughout. A basis of all ``P`` dimensions (``m = P``,
    a small operator) is exact after one pass and never restarts nor needs
    the verification below.

    Verification (locking, as in Saad 2011): a single Krylov space sees
    a multiple eigenvalue once (``p(A) q_1`` has one direction in its
    eigenspace), so ``[2, 4, 4]`` can converge where the top three are
    ``[4, 4, 4]`` -- true eigenpairs, but not the wanted ones (scipy's
    ``eigsh`` returns them as converged). So when all ``k`` wanted pairs have
    converged, the ``k`` Ritz vectors ``X`` are locked (their couplings ``b``
    dropped: the basis is then exact for ``A - E``, ``||E|| = ||b||``) and
    the basis refilled by ``m - k`` Lanczos steps from a Gaussian vector
    orthogonalised twice against ``X`` (from ``jax.random.fold_in(key, j)``
    for the ``j``-th block), which explores what the first start missed: the
    other copies of a multiple eigenvalue. If no new Ritz value enters the
    wanted ``k`` (the wanted values move by at most ``tol ||A||_est``), the
    answer stands and ``k`` products take the true residuals
    ``||A x_i - theta_i x_i||``, which decide ``converged``. Otherwise thick
    restarts go on, and the next convergence is verified again. A verification
    costs ``m`` products (``m - k + k``); an eigenvalue of multiplicity ``r``
    in the wanted set needs at most ``r`` verification blocks (each brings one
    more copy, up to rounding), all within ``max_matvecs``. What this
    guarantees: every pair flagged ``converged`` has a true residual of at
    most ``tol ||A||_est``, so an eigenvalue of ``A`` lies that near; that it
    is the wanted one rests, as for any Krylov method, on the random starts:
    a wanted eigenvector almost orthogonal to all of them, or a missed copy
    inside a tight cluster that ``m - k`` steps do not lift past the ``k``-th
    wanted value, can still escape.

    Args:
      matvec: ``v -> A v`` with ``A`` symmetric (a Hessian, Gauss-Newton or
        Fisher operator), on pytrees shaped like ``like``.
      like: a pytree with the structure, shapes and dtypes of ``v``. bfloat16
        and float16 are computed in float32 (the products are still taken in
        ``like``'s dtype) and the results cast back.
      k: the number of eigenpairs, at most ``P`` (the number of parameters).
      key: a JAX PRNG key for the starting vector (and, folded in, those of
        the verification blocks).
      which: ``"LA"`` (default), ``"SA"`` or ``"LM"``.
      tol: the relative residual of the stopping rule above;
        ``max(1e-6, sqrt(eps))`` of ``like``'s dtype by default (``1e-6`` in
        float64, ``3.5e-4`` in float32, ``0.088`` in bfloat16). A smaller
        ``tol`` may be asked, but near ``eps`` the residuals are rounding
        and the flags stop meaning much. May be traced.
      max_matvecs: the budget of products, verification included: ``20 m``
        by default, where ``m = min(P, max(2k + 1, 20))`` is the basis size
        (ARPACK's default subspace); ``m`` shrinks to ``max_matvecs`` if that
        is smaller. At least ``k``. Unused products are not spent: the loop
        stops on convergence. A verification block starts only if ``m`` more
        products fit; a budget that ends before one agreed reports every
        ``converged`` as ``False``.
      num_iters: a fixed cost instead: exactly ``min(num_iters, P)`` Lanczos
        steps, no restart and no verification, ``converged`` by ``tol`` alone
        (a true eigenpair, not necessarily the wanted one where a multiple
        eigenvalue is involved). At least ``k``; not with ``max_matvecs``.

    Returns:
      An :class:`EigshResult`, eigenvalues in ascending order; check
      ``all_converged``.

    Raises:
      ValueError: ``k`` is not a positive integer or exceeds ``P``, ``which``
        is unknown, ``tol`` is not a positive finite number, ``num_iters`` or
        ``max_matvecs`` is below ``k``, or both are given.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from hvpopt.linalg.lanczos import eigsh
      >>> a = jnp.diag(jnp.arange(1.0, 101.0))
      >>> result = eigsh(lambda v: a @ v, jnp.zeros(100), 2, key=jax.random.key(0))
      >>> result.eigenvalues.round(2), result.eigenvectors.shape
      (Array([ 99., 100.], dtype=float32), (2, 100))
      >>> bool(result.all_converged), bool(result.residual_norms.max() <= 3.5e-4 * 100)
      (True, True)
      >>> eigsh(lambda v: a @ v, jnp.zeros(100), 1, key=jax.random.key(0),
      ...       which="SA").eigenvalues.round(2)
      Array([1.], dtype=float32)
      >>> bool(eigsh(lambda v: a @ v, jnp.zeros(100), 2, key=jax.random.key(0),
      ...            num_iters=5).all_converged)  # five steps are not enough
      False
    """
    flat_like, unravel, flat_matvec = flat_operator("like", matvec, like)
    size, out_dtype = flat_like.size, flat_like.dtype
    _checks.check_positive_int("k", k)
    if k > size:
        raise ValueError(f"k must be at most the number of parameters {size}; got {k}.")
    _checks.check_choice("which", which, EIGSH_WHICH)
    basis_size, budget = _eigsh_sizes(k, size, num_iters, max_matvecs)
    tol = _check_tol(tol, out_dtype)

    dtype = jnp.promote_types(out_dtype, jnp.float32)  # bfloat16/float16 -> float32
    compute_matvec = lambda x: flat_matvec(x.astype(out_dtype)).astype(dtype)
    # Ritz vectors kept at a restart; a basis of all P dimensions is exact and never restarts.
    keep = k + (basis_size - k) // 2 if basis_size < size else basis_size
    cycle = basis_size - keep  # products per restart
    verifies = basis_size < size and num_iters is None  # a restarted basis needs a verification block

    def ritz(state):
        theta, s = jnp.linalg.eigh(state.projected)  # ascending
        residuals = jnp.abs(state.residual_norm * s[-1, _select(theta, k, which)])
        return theta, s, residuals, residuals <= tol * jnp.max(jnp.abs(theta))

    def more(carry):
        state, (*_, converged), used, verified, _ = carry
        unsettled = ~jnp.all(converged) | (verifies & ~verified)
        # A verification block takes m - k products, and k more check the final residuals.
        can_go_on = jnp.where(jnp.all(converged), used + basis_size <= budget, used + cycle <= budget)
        return (state.size < basis_size) | (bool(cycle) & unsettled & can_go_on)

    def restart_and_extend(carry):  # the first pass only fills the empty basis
        state, (theta, s, _, converged), used, _, locks = carry
        full = state.size == basis_size
        verify = full & jnp.all(converged)
        wanted = _select(theta, k, which)
        state = jax.lax.cond(
            full,
            lambda: jax.lax.cond(
                verify,
                lambda: _lock_and_restart(
                    state, theta, s, wanted, jax.random.normal(jax.random.fold_in(key, locks + 1), (size,), dtype)
                ),
                lambda: _thick_restart(state, theta, s, _select(theta, keep, which)),
            ),
            lambda: state,
        )
        state = _extend(compute_matvec, state, basis_size)
        new = new_theta, _, _, new_converged = ritz(state)
        moved = jnp.max(jnp.abs(new_theta[_select(new_theta, k, which)] - theta[wanted]))  # a new wanted value?
        verified = verify & jnp.all(new_converged) & (moved <= tol * jnp.max(jnp.abs(new_theta)))
        spent = jnp.where(full, jnp.where(verify, basis_size - k, cycle), basis_size)
        return state, new, used + spent, verified, locks + verify

    empty = _start(jax.random.normal(key, (size,), dtype), basis_size)
    no_ritz = (jnp.zeros(basis_size, dtype), jnp.eye(basis_size, dtype=dtype), jnp.zeros(k, dtype), jnp.zeros(k, bool))
    state, (theta, s, residuals, converged), used, verified, locks = jax.lax.while_loop(
        more, restart_and_extend, (empty, no_ritz, jnp.asarray(0), jnp.asarray(False), jnp.asarray(0))
    )

    index = _select(theta, k, which)
    vectors = s[:, index].T @ _basis(state)[:basis_size]  # [k, P]
    if verifies:  # locking dropped couplings: the final residuals are taken with k products
        true_residuals = lambda: jnp.linalg.norm(
            jax.lax.map(compute_matvec, vectors) - theta[index, None] * vectors, axis=1
        )
        residuals = jax.lax.cond(locks > 0, true_residuals, lambda: residuals)
        used = used + jnp.where(locks > 0, k, 0)
        converged = verified & (residuals <= tol * jnp.max(jnp.abs(theta)))
    return EigshResult(
        eigenvalues=theta[index].astype(out_dtype),
        eigenvectors=jax.vmap(unravel)(vectors.astype(out_dtype)),
        residual_norms=residuals.astype(out_dtype),
        num_matvecs=used,
        converged=converged,
        all_converged=jnp.all(converged),
        norm_estimate=jnp.max(jnp.abs(theta)).astype(out_dtype),
    )


def _eigsh_sizes(k: int, size: int, num_iters: Any, max_matvecs: Any) -> tuple[int, int]:
    """``(basis size m, budget of products)`` from eigsh's arguments, checked."""
    if num_iters is not None:
        if max_matvecs is not None:
            raise ValueError("pass num_iters (a fixed number of steps) or max_matvecs (a budget), not both.")
        _checks.check_positive_int("num_iters", num_iters)
        if num_iters < k:
            raise ValueError(f"num_iters must be at least k={k}; got {num_iters}.")
        basis_size = min(num_iters, size)
        return basis_size, basis_size
    basis_size = min(size, max(2 * k + 1, 20))
    if max_matvecs is None:
        return basis_size, _BUDGET_CYCLES * basis_size
    _checks.check_positive_int("max_matvecs", max_matvecs)
    if max_matvecs < k:
        raise ValueError(f"max_matvecs must be at least k={k}; got {max_matvecs}.")
    return min(basis_size, max_matvecs), max_matvecs


def _check_tol(tol: Any, dtype) -> Any:
    """eigsh's default tolerance for ``dtype``, or ``tol`` checked if it is a number."""
    if tol is None:
        return max(_DEFAULT_TOL, float(np.sqrt(jnp.finfo(dtype).eps)))
    if isinstance(tol, (int, float)) and not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number; got {tol!r}.")
    return tol


def _select(theta: jax.Array, count: int, which: str) -> jax.Array:
    """Indices (ascending) of the ``count`` wanted entries of the ascending ``theta``."""
    size = theta.shape[0]
    if which == "LA":
        return jnp.arange(size - count, size)
    if which == "SA":
        return jnp.arange(count)
    return jnp.sort(jnp.argsort(-jnp.abs(theta), stable=True)[:count])


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
    state = _extend(matvec, _start(v0, num_iters), num_iters)
    t = state.projected
    return _basis(state)[:num_iters], jnp.diagonal(t), jnp.diagonal(t, 1), state.residual_norm


class _Krylov(NamedTuple):
    """A Lanczos basis being filled: ``A Q_n = Q_n T_n + beta_n q_{n+1} e_n^T``.

    ``blocks`` holds the ``m + 1`` rows of ``Q`` (and a few spare) in blocks of
    at most 32 rows, so that Gram-Schmidt can skip the empty blocks without
    copying the basis; rows ``0..n`` hold ``q_1..q_{n+1}``, later rows are
    stale and never read. ``projected`` is ``T`` (``m x m``), filled in its
    first ``n`` columns; ``residual_norm`` is ``beta_n``; ``scale`` is
    ``max ||A q_i||``.
    """

    blocks: tuple[jax.Array, ...]
    projected: jax.Array
    size: jax.Array
    residual_norm: jax.Array
    scale: jax.Array


def _start(v0: jax.Array, basis_size: int) -> _Krylov:
    """An empty basis of ``basis_size`` (+1) vectors starting at ``v0 / ||v0||`` (``e_1`` if zero)."""
    dtype = v0.dtype
    norm0 = jnp.linalg.norm(v0)
    q0 = jnp.where(norm0 > 0, v0 / jnp.where(norm0 > 0, norm0, 1), jnp.zeros_like(v0).at[0].set(1))
    rows = jnp.zeros((basis_size + 1, v0.size), dtype).at[0].set(q0)
    zero = jnp.zeros((), dtype)
    return _Krylov(_split_rows(rows, basis_size), jnp.zeros((basis_size,) * 2, dtype), jnp.asarray(0), zero, zero)


def _split_rows(rows: jax.Array, basis_size: int) -> tuple[jax.Array, ...]:
    """``rows`` (at least ``m + 1``) as Gram-Schmidt blocks: equal blocks of at most ``_BLOCK_ROWS`` rows."""
    num_blocks = -(-(basis_size + 1) // _BLOCK_ROWS)
    block = -(-(basis_size + 1) // num_blocks)
    rows = jnp.pad(rows, ((0, num_blocks * block - rows.shape[0]), (0, 0)))
    return tuple(rows[i * block : (i + 1) * block] for i in range(num_blocks))


def _row(blocks: tuple[jax.Array, ...], n: jax.Array) -> jax.Array:
    block = blocks[0].shape[0]
    return jax.lax.switch(n // block, [lambda b=b: b[n % block] for b in blocks])


def _set_row(blocks: tuple[jax.Array, ...], n: jax.Array, row: jax.Array) -> tuple[jax.Array, ...]:
    block = blocks[0].shape[0]
    local = lambda i: jnp.where((n >= i * block) & (n < (i + 1) * block), n - i * block, block)
    return tuple(b.at[local(i)].set(row, mode="drop") for i, b in enumerate(blocks))


def _extend(matvec: Callable[[jax.Array], jax.Array], state: _Krylov, basis_size: int) -> _Krylov:
    """Lanczos steps with full reorthogonalisation until the basis has ``basis_size`` columns of ``T``."""
    dtype = state.projected.dtype
    threshold = _BREAKDOWN_EPS * jnp.finfo(dtype).eps

    def step(n, state):
        blocks, t, _, _, scale = state
        q = _row(blocks, n)
        w = matvec(q)
        scale = jnp.maximum(scale, jnp.linalg.norm(w))
        alpha = jnp.vdot(q, w)
        w = _orthogonalise(blocks, n + 1, w)
        beta = jnp.linalg.norm(w)
        broke = beta <= threshold * scale
        q_next = jax.lax.cond(broke, lambda: _fresh_direction(blocks, n + 1), lambda: w / jnp.where(broke, 1, beta))
        beta = jnp.where(broke, 0, beta)
        t = t.at[n, n].set(alpha).at[n, n + 1].set(beta, mode="drop").at[n + 1, n].set(beta, mode="drop")
        return _Krylov(_set_row(blocks, n + 1, q_next), t, n + 1, beta, scale)

    return jax.lax.fori_loop(state.size, basis_size, step, state)


def _orthogonalise(blocks: tuple[jax.Array, ...], count: jax.Array, w: jax.Array) -> jax.Array:
    """``w`` orthogonalised against the first ``count`` rows: block Gram-Schmidt, twice, skipping empty blocks."""
    block = blocks[0].shape[0]

    def against(i, rows):
        filled = i * block + jnp.arange(block) < count
        return lambda w: w - jnp.where(filled, rows @ w, 0) @ rows

    def one_pass(_, w):
        for i, rows in enumerate(blocks):
            w = jax.lax.cond(i * block < count, against(i, rows), lambda w: w, w)
        return w

    return jax.lax.fori_loop(0, 2, one_pass, w)


def _fresh_direction(blocks: tuple[jax.Array, ...], count: jax.Array) -> jax.Array:
    """A unit vector orthogonal to the first ``count`` rows (zero if those rows span everything).

    The coordinate vector least represented in the basis: ``sum_j Q_ij^2 <=
    count / P`` for it, so its orthogonal part has norm^2 ``>= 1 - count / P``.
    """
    rows = jnp.concatenate(blocks)
    size, dtype = rows.shape[1], rows.dtype
    filled = (jnp.arange(rows.shape[0]) < count)[:, None]
    coverage = jnp.sum(jnp.where(filled, rows * rows, 0), axis=0)
    e = _orthogonalise(blocks, count, jnp.zeros(size, dtype).at[jnp.argmin(coverage)].set(1))
    return jnp.where(count < size, e / jnp.maximum(jnp.linalg.norm(e), jnp.finfo(dtype).tiny), 0)


def _basis(state: _Krylov) -> jax.Array:
    """The ``m + 1`` rows ``[q_1 ... q_{m+1}]`` of a full basis as one ``[m + 1, P]`` array."""
    return jnp.concatenate(state.blocks)[: state.projected.shape[0] + 1]


def _thick_restart(state: _Krylov, theta: jax.Array, s: jax.Array, keep: jax.Array) -> _Krylov:
    """The full basis cut to the Ritz vectors ``keep`` and the residual direction (Wu & Simon 2000).

    ``Q' = [Q S_l, q_{m+1}]`` with ``T'`` the arrowhead ``[[Theta_l, b], [b^T, .]]``,
    ``b = beta_m S_l^T e_m``; the next step fills ``T'``'s last diagonal entry.
    """
    basis_size, num_keep = state.projected.shape[0], keep.shape[0]
    rows = _basis(state)
    rows = jnp.concatenate([s[:, keep].T @ rows[:basis_size], rows[basis_size:], rows[num_keep:basis_size]])
    coupling = state.residual_norm * s[-1, keep]
    t = jnp.zeros_like(state.projected).at[jnp.arange(num_keep), jnp.arange(num_keep)].set(theta[keep])
    t = t.at[:num_keep, num_keep].set(coupling).at[num_keep, :num_keep].set(coupling)
    return _Krylov(_split_rows(rows, basis_size), t, jnp.asarray(num_keep), state.residual_norm, state.scale)


def _lock_and_restart(state: _Krylov, theta: jax.Array, s: jax.Array, wanted: jax.Array, fresh: jax.Array) -> _Krylov:
    """The full basis cut to the Ritz vectors ``wanted``, locked, and a fresh block orthogonal to them.

    ``Q' = [Q S_k, q']`` with ``T' = Theta_k``: the couplings ``b = beta_m
    S_k^T e_m`` are dropped (locking), so the new block from ``q'``, ``fresh``
    orthogonalised twice against ``Q S_k``, explores what the old Krylov space
    missed. Exact for ``A - E`` with ``||E|| = ||b||``.
    """
    basis_size, num_keep = state.projected.shape[0], wanted.shape[0]
    rows = _basis(state)
    rows = jnp.concatenate([s[:, wanted].T @ rows[:basis_size], rows[num_keep:]])
    blocks = _split_rows(rows, basis_size)
    start = _orthogonalise(blocks, jnp.asarray(num_keep), fresh)
    norm = jnp.linalg.norm(start)
    lost = norm <= _BREAKDOWN_EPS * jnp.finfo(fresh.dtype).eps * jnp.linalg.norm(fresh)
    start = jax.lax.cond(
        lost, lambda: _fresh_direction(blocks, jnp.asarray(num_keep)), lambda: start / jnp.where(lost, 1, norm)
    )
    t = jnp.zeros_like(state.projected).at[jnp.arange(num_keep), jnp.arange(num_keep)].set(theta[wanted])
    return _Krylov(
        _set_row(blocks, jnp.asarray(num_keep), start), t, jnp.asarray(num_keep), state.residual_norm, state.scale
    )
