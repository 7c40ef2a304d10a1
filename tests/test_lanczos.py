"""Lanczos tridiagonalisation and eigsh against numpy.linalg.eigh, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mlp, problem_hessian
from jax.flatten_util import ravel_pytree

import hvpopt
from hvpopt.linalg.lanczos import eigsh, lanczos_tridiagonal, tridiagonal

jax.config.update("jax_enable_x64", True)

P = 200
LIKE = {"a": jnp.zeros(120), "b": jnp.zeros((8, 10))}  # P = 200 split into two leaves
OUTLIERS = [10.0, 9.0, 8.0, -9.5, -7.0, -6.0]  # a gap of 5 from the bulk in [-1, 3]


def random_symmetric(eigenvalues, seed=0) -> np.ndarray:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q``."""
    eigenvalues = np.asarray(eigenvalues, float)
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(eigenvalues.size,) * 2))[0]
    return (q * eigenvalues) @ q.T


def synthetic_matrix() -> np.ndarray:
    return random_symmetric(np.concatenate([OUTLIERS, np.linspace(-1.0, 3.0, P - 6)]))


def dense_matvec(a, like):
    unravel = ravel_pytree(like)[1]
    return lambda v: unravel(a @ ravel_pytree(v)[0])


def flat_rows(tree) -> np.ndarray:
    """A pytree with a leading axis as a ``[k, P]`` array (ravel_pytree order)."""
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree))


def true_selection(eigenvalues, k, which):
    order = {"LA": np.argsort(-eigenvalues), "SA": np.argsort(eigenvalues), "LM": np.argsort(-np.abs(eigenvalues))}[
        which
    ]
    return np.sort(order[:k])  # eigh's ascending order is scipy's order


def check_pairs(result, a, k, which, like):
    """Eigenvalues to 1e-6 relative, vectors up to sign where isolated, residuals."""
    true_values, true_vectors = np.linalg.eigh(a)
    index = true_selection(true_values, k, which)
    values = np.asarray(result.eigenvalues)
    np.testing.assert_allclose(values, true_values[index], rtol=1e-6)
    assert jax.tree.structure(result.eigenvectors) == jax.tree.structure(like)
    for leaf, like_leaf in zip(jax.tree.leaves(result.eigenvectors), jax.tree.leaves(like)):
        assert leaf.shape == (k, *like_leaf.shape)
    vectors = flat_rows(result.eigenvectors)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-10)
    for row, i in zip(vectors, index):
        gap = np.min(np.abs(np.delete(true_values, i) - true_values[i]))
        if gap > 1e-3 * np.max(np.abs(true_values)):
            assert abs(row @ true_vectors[:, i]) > 1 - 1e-6
    true_residuals = np.linalg.norm(vectors @ a - values[:, None] * vectors, axis=1)
    scale = np.max(np.abs(true_values))
    assert np.all(true_residuals < 1e-6 * scale)
    np.testing.assert_allclose(result.residual_norms, true_residuals, atol=1e-10 * scale)


SELECTIONS = {"LA": 3, "SA": 3, "LM": 4}


def all_selections(matvec, like, num_iters, key):
    return {which: eigsh(matvec, like, k, key=key, which=which, num_iters=num_iters) for which, k in SELECTIONS.items()}


def test_eigsh_synthetic_matrix_with_known_spectrum():
    a = synthetic_matrix()
    results = jax.jit(lambda a, key: all_selections(dense_matvec(a, LIKE), LIKE, 40, key))(
        jnp.asarray(a), jax.random.key(0)
    )
    np.testing.assert_allclose(results["LM"].eigenvalues, [-9.5, 8.0, 9.0, 10.0], rtol=1e-6)
    for which, k in SELECTIONS.items():
        check_pairs(results[which], a, k, which, LIKE)
        assert int(results[which].num_matvecs) == 40


def test_eigsh_mlp_hessian():
    problem = make_mlp()
    hessian = problem_hessian(problem)

    @jax.jit
    def run(params, key):
        matvec = hvpopt.hessian_operator(problem.objective, params)
        return all_selections(matvec, params, 30, key)

    results = run(problem.params, jax.random.key(1))
    for which, k in SELECTIONS.items():
        check_pairs(results[which], hessian, k, which, problem.params)
    # LM with k=4 reaches past the top three to the most negative eigenvalue.
    assert results["LM"].eigenvalues[0] < 0 < results["LM"].eigenvalues[1]


def test_lanczos_relation_orthonormal_basis_and_gauss_quadrature():
    a = synthetic_matrix() / 10.0  # ||A|| = 1, so powers stay of order one
    v0 = jax.tree.map(lambda x: x + 1.0, LIKE)
    m = 30
    dec = jax.jit(lambda a, v: lanczos_tridiagonal(dense_matvec(a, LIKE), v, m))(jnp.asarray(a), v0)
    assert jax.tree.structure(dec.basis) == jax.tree.structure(LIKE)
    assert dec.basis["b"].shape == (m, 8, 10)
    assert dec.diagonal.shape == (m,) and dec.off_diagonal.shape == (m - 1,)
    q = flat_rows(dec.basis)
    np.testing.assert_allclose(q @ q.T, np.eye(m), atol=1e-13)
    q1 = ravel_pytree(v0)[0] / np.linalg.norm(ravel_pytree(v0)[0])
    np.testing.assert_allclose(q[0], q1, atol=1e-15)
    t = np.asarray(tridiagonal(dec.diagonal, dec.off_diagonal))
    np.testing.assert_allclose(q @ a @ q.T, t, atol=1e-13)
    # e_1^T T^j e_1 = q_1^T A^j q_1 for j <= 2m - 1 (Gauss quadrature is exact there).
    a_power_q1, t_power_e1 = np.asarray(q1), np.eye(m)[0]
    for j in range(2 * m):
        assert abs(t_power_e1[0] - q1 @ a_power_q1) < 1e-12, j
        a_power_q1, t_power_e1 = a @ a_power_q1, t @ t_power_e1


def test_rank_deficient_matrix_has_no_nan_and_right_eigenvalues():
    size, m = 50, 20
    a = random_symmetric(np.concatenate([[5.0, 3.0, 2.0, 0.5, -1.0], np.zeros(size - 5)]), seed=1)
    like = jnp.zeros(size)

    @jax.jit
    def run(a, key):
        matvec = lambda v: a @ v
        return (
            lanczos_tridiagonal(matvec, jnp.ones(size), m),
            eigsh(matvec, like, 3, key=key, which="LA", num_iters=m),
            eigsh(matvec, like, 2, key=key, which="SA", num_iters=m),
        )

    dec, top, bottom = run(jnp.asarray(a), jax.random.key(2))
    for leaf in jax.tree.leaves((dec, top, bottom)):
        assert np.all(np.isfinite(leaf))
    np.testing.assert_allclose(dec.basis @ dec.basis.T, np.eye(m), atol=1e-13)
    # The Krylov space has dimension 6; T is block diagonal after it.
    assert np.all(np.abs(dec.off_diagonal[:5]) > 1e-3)
    ritz = np.linalg.eigvalsh(tridiagonal(dec.diagonal, dec.off_diagonal))
    np.testing.assert_allclose(ritz[[0, -4, -3, -2, -1]], [-1.0, 0.5, 2.0, 3.0, 5.0], atol=1e-12)
    np.testing.assert_allclose(ritz[1:-4], 0.0, atol=1e-12)
    check_pairs(top, a, 3, "LA", like)
    np.testing.assert_allclose(bottom.eigenvalues, [-1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize(
    "matrix, v0",
    [
        (jnp.diag(jnp.arange(1.0, 7.0)), jnp.zeros(6).at[0].set(1.0)),  # beta = 0 exactly
        (jnp.zeros((6, 6)), jnp.ones(6)),  # A = 0
        (jnp.diag(jnp.arange(1.0, 7.0)), jnp.zeros(6)),  # v0 = 0 starts from e_1
    ],
    ids=["exact-invariant-start", "zero-matrix", "zero-start"],
)
def test_exact_breakdown_restarts_with_an_orthogonal_direction(matrix, v0):
    dec = lanczos_tridiagonal(lambda v: matrix @ v, v0, 6)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(dec))
    np.testing.assert_allclose(dec.basis @ dec.basis.T, np.eye(6), atol=1e-14)
    np.testing.assert_array_equal(dec.off_diagonal, 0.0)
    ritz = np.linalg.eigvalsh(tridiagonal(dec.diagonal, dec.off_diagonal))
    np.testing.assert_allclose(ritz, np.linalg.eigvalsh(matrix), atol=1e-14)


def test_default_num_iters_is_clamped_and_exact_for_small_operators():
    a = jnp.asarray(random_symmetric(np.arange(1.0, 11.0)))
    result = jax.jit(lambda a: eigsh(lambda v: a @ v, jnp.zeros(10), 2, key=jax.random.key(3)))(a)
    assert int(result.num_matvecs) == 10  # min(P, max(2k + 1, 20))
    np.testing.assert_allclose(result.eigenvalues, [9.0, 10.0], rtol=1e-12)


def test_dtype_follows_the_inputs():
    a = jnp.diag(jnp.arange(1.0, 9.0, dtype=jnp.float32))
    like = jnp.zeros(8, jnp.float32)
    result = jax.jit(lambda a: eigsh(lambda v: a @ v, like, 2, key=jax.random.key(4)))(a)
    assert result.eigenvalues.dtype == result.eigenvectors.dtype == jnp.float32
    np.testing.assert_allclose(result.eigenvalues, [7.0, 8.0], rtol=1e-5)


def test_argument_errors():
    matvec = lambda v: v
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="k must be at most the number of parameters 200"):
        eigsh(matvec, LIKE, 201, key=key)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        eigsh(matvec, LIKE, 0, key=key)
    with pytest.raises(ValueError, match="which must be one of 'LA', 'SA', 'LM'; got 'BE'"):
        eigsh(matvec, LIKE, 2, key=key, which="BE")
    with pytest.raises(ValueError, match="num_iters must be at least k=5"):
        eigsh(matvec, LIKE, 5, key=key, num_iters=4)
    with pytest.raises(ValueError, match="num_iters must be at most the number of parameters 200"):
        lanczos_tridiagonal(matvec, LIKE, 201)
    with pytest.raises(ValueError, match="num_iters must be a positive integer"):
        lanczos_tridiagonal(matvec, LIKE, 2.0)
    with pytest.raises(TypeError, match="like must have a floating dtype"):
        eigsh(matvec, jnp.arange(4), 1, key=key)
    with pytest.raises(ValueError, match=r"matvec\(v\)\['b'\] must have shape"):
        eigsh(lambda v: {"a": v["a"], "b": v["b"].ravel()}, LIKE, 1, key=key)


# Thick-restart eigsh at its defaults: converged flags against numpy.linalg.eigh.

N = 120
SPECTRA = {
    "clustered": np.concatenate([np.linspace(-2.0, 3.0, N - 5), [10.0, 20.0, 30.0, 40.0, 50.0]]),
    # Multiplicity 3 at both ends (LM wants 4, 4, 4, -3), then pairs; multiplicity 2 at both ends.
    "degenerate": np.concatenate([[4.0] * 3, [-3.0] * 3, np.repeat(np.linspace(-1.0, 2.0, (N - 6) // 2), 2)]),
    "degenerate_pairs": np.concatenate([[5.0] * 2, [-4.0] * 2, np.linspace(-1.0, 2.0, N - 4)]),
    "wide_gap": np.concatenate([[1e3, 5e2, -8e2], np.linspace(-1e-2, 1e-2, N - 3)]),
}
WANTED = (("LA", 3), ("SA", 3), ("LM", 4))
DTYPES = (jnp.float64, jnp.float32)


@jax.jit(static_argnames=("wanted", "max_matvecs"))
def eigsh_at_defaults(a, key, wanted=WANTED, max_matvecs=None):
    return {
        (which, dtype.__name__): eigsh(
            lambda v: a.astype(dtype) @ v, jnp.zeros(N, dtype), k, key=key, which=which, max_matvecs=max_matvecs
        )
        for which, k in wanted
        for dtype in DTYPES
    }


def check_flags(result, a, which, k, dtype):
    """Converged pairs are within tol of the k wanted eigenvalues of eigh; pairs within tol are flagged."""
    true_values = np.linalg.eigvalsh(a)
    eps = np.finfo(dtype).eps
    tol = max(1e-6, np.sqrt(eps))
    scale = float(result.norm_estimate)
    floor = 100 * eps * np.abs(true_values).max()  # rounding of the products, and one breakdown
    values = np.asarray(result.eigenvalues, float)
    vectors = np.asarray(result.eigenvectors, float)
    true_residuals = np.linalg.norm(vectors @ a - values[:, None] * vectors, axis=1)
    np.testing.assert_allclose(result.residual_norms, true_residuals, atol=floor)  # honest estimates
    converged = np.asarray(result.converged)
    assert converged.shape == (k,) and bool(result.all_converged) == converged.all()
    nearest = np.min(np.abs(values[:, None] - true_values[None, :]), axis=1)
    assert np.all(nearest[converged] <= true_residuals[converged] + floor)
    assert np.all(true_residuals[converged] <= tol * scale + floor)
    assert np.all(converged[true_residuals <= 0.5 * tol * scale])
    # The wanted eigenvalues themselves (every copy of a multiple one), not only some eigenvalues.
    wanted = true_values[true_selection(true_values, k, which)]
    assert np.all(np.abs(values - wanted)[converged] <= tol * scale + floor)
    return converged


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_eigsh_defaults_converge_and_flags_tell_the_truth(spectrum):
    a = random_symmetric(SPECTRA[spectrum], seed=3)
    results = eigsh_at_defaults(jnp.asarray(a), jax.random.key(0))
    for which, k in WANTED:
        for dtype in DTYPES:
            result = results[which, dtype.__name__]
            assert result.eigenvalues.dtype == dtype
            assert int(result.num_matvecs) <= 20 * 20  # the default budget
            # Every copy of a multiple eigenvalue: the k wanted values of eigh, not only some eigenvalues.
            converged = check_flags(result, a, which, k, dtype)
            assert converged.all(), (spectrum, which, dtype)


def test_a_budget_that_ends_before_the_verification_block_says_not_converged():
    """The first Krylov space of the degenerate spectrum converges on [2, 4, 4] (one copy of 4 missed)."""
    a = jnp.asarray(random_symmetric(SPECTRA["degenerate"], seed=3))
    run = jax.jit(
        lambda a: [eigsh(lambda v: a @ v, jnp.zeros(N), 3, key=jax.random.key(0), max_matvecs=m) for m in (50, 400)]
    )
    short, enough = run(a)
    assert int(short.num_matvecs) == 47 and not short.converged.any()  # 47 products: [2, 4, 4], unverified
    np.testing.assert_allclose(short.eigenvalues, [2.0, 4.0, 4.0], rtol=1e-6)
    assert bool(enough.all_converged)
    np.testing.assert_allclose(enough.eigenvalues, [4.0, 4.0, 4.0], rtol=1e-12)


def test_a_budget_too_small_says_not_converged():
    a = random_symmetric(SPECTRA["clustered"], seed=3)
    wanted = (("SA", 3),)
    results = eigsh_at_defaults(jnp.asarray(a), jax.random.key(0), wanted=wanted, max_matvecs=6)
    assert not results["SA", "float64"].converged.any()  # the cluster needs ~100 products
    for which, k in wanted:
        for dtype in DTYPES:
            result = results[which, dtype.__name__]
            assert int(result.num_matvecs) == 6
            check_flags(result, a, which, k, dtype)


def test_issue_example_bottom_of_a_cluster_at_the_defaults():
    """200 parameters in a dict, eigenvalues linspace(-2, 3, 195) and five large: SA, k=2."""
    values = np.concatenate([np.linspace(-2.0, 3.0, 195), [10.0, 20.0, 30.0, 40.0, 50.0]])
    a = random_symmetric(values)
    result = jax.jit(lambda a: eigsh(dense_matvec(a, LIKE), LIKE, 2, key=jax.random.key(0), which="SA"))(jnp.asarray(a))
    assert bool(result.all_converged)
    np.testing.assert_allclose(result.eigenvalues, np.sort(values)[:2], rtol=1e-6)
    assert 40.0 < float(result.norm_estimate) <= 50.0  # the largest Ritz value after restarts
    assert np.all(np.asarray(result.residual_norms) <= 1e-6 * 50.0)
    assert 20 < int(result.num_matvecs) <= 400  # restarted, within the default budget
    # At the old fixed cost (20 steps) the same start is far off, and says so.
    fixed = eigsh(dense_matvec(a, LIKE), LIKE, 2, key=jax.random.key(0), which="SA", num_iters=20)
    assert not fixed.converged.any() and int(fixed.num_matvecs) == 20
    assert np.abs(np.asarray(fixed.eigenvalues) - np.sort(values)[:2]).max() > 1e-2


def test_jit_compiles_with_a_traced_tol():
    a = jnp.asarray(random_symmetric(SPECTRA["clustered"], seed=4))
    run = lambda a, tol: eigsh(lambda v: a @ v, jnp.zeros(N), 2, key=jax.random.key(5), which="SA", tol=tol)
    compiled = jax.jit(run)(a, jnp.asarray(1e-8))
    np.testing.assert_allclose(compiled.eigenvalues, [-2.0, -2.0 + 5.0 / (N - 6)], rtol=1e-10)
    assert bool(compiled.all_converged)
    assert np.all(np.asarray(compiled.residual_norms) <= 1e-8 * 50)


def test_rank_deficient_operator_at_the_defaults():
    a = random_symmetric(np.concatenate([[5.0, 3.0, 2.0, 0.5, -1.0], np.zeros(45)]), seed=1)
    result = jax.jit(lambda a: eigsh(lambda v: a @ v, jnp.zeros(50), 3, key=jax.random.key(2)))(jnp.asarray(a))
    # A first pass of 20, a verification block of 20 - 3 and 3 products for the final residuals.
    assert bool(result.all_converged) and int(result.num_matvecs) == 20 + 17 + 3
    check_pairs(result, a, 3, "LA", jnp.zeros(50))


def test_bfloat16_is_computed_in_float32_and_cast_back():
    a = random_symmetric(np.concatenate([[8.0, 6.0], np.linspace(-1.0, 1.0, 62)]), seed=6)
    like = {"w": jnp.zeros((8, 4), jnp.bfloat16), "b": jnp.zeros(32, jnp.bfloat16)}
    unravel = ravel_pytree(like)[1]
    matvec = lambda v: unravel((jnp.asarray(a, jnp.bfloat16) @ ravel_pytree(v)[0]).astype(jnp.bfloat16))
    result = jax.jit(lambda: eigsh(matvec, like, 2, key=jax.random.key(7)))()
    assert result.eigenvalues.dtype == jnp.bfloat16 and result.eigenvectors["w"].dtype == jnp.bfloat16
    assert bool(result.all_converged)
    tol = np.sqrt(np.finfo(jnp.bfloat16).eps)  # 0.088: the default in bfloat16
    np.testing.assert_allclose(np.asarray(result.eigenvalues, float), [6.0, 8.0], atol=tol * 8.0)


def test_fixed_num_iters_takes_exactly_that_many_steps_and_flags_by_tol():
    a = jnp.asarray(synthetic_matrix())
    run = jax.jit(
        lambda a: [eigsh(dense_matvec(a, LIKE), LIKE, 3, key=jax.random.key(0), num_iters=m) for m in (4, 40)]
    )
    short, long = run(a)
    assert int(short.num_matvecs) == 4 and int(long.num_matvecs) == 40
    assert not short.all_converged and bool(long.all_converged)
    np.testing.assert_allclose(long.eigenvalues, [8.0, 9.0, 10.0], rtol=1e-10)


def test_convergence_argument_errors():
    key = jax.random.key(0)
    for tol in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol must be a positive finite number"):
            eigsh(lambda v: v, LIKE, 2, key=key, tol=tol)
    with pytest.raises(ValueError, match="max_matvecs must be at least k=3; got 2"):
        eigsh(lambda v: v, LIKE, 3, key=key, max_matvecs=2)
    with pytest.raises(ValueError, match="max_matvecs must be a positive integer"):
        eigsh(lambda v: v, LIKE, 3, key=key, max_matvecs=10.5)
    with pytest.raises(ValueError, match="pass num_iters .* or max_matvecs .*, not both"):
        eigsh(lambda v: v, LIKE, 3, key=key, num_iters=10, max_matvecs=100)
