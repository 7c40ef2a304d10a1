"""Lanczos tridiagonalisation and eigsh against numpy.linalg.eigh, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hvpopt
from conftest import make_mlp, problem_hessian
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
    order = {"LA": np.argsort(-eigenvalues), "SA": np.argsort(eigenvalues),
             "LM": np.argsort(-np.abs(eigenvalues))}[which]
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
    return {
        which: eigsh(matvec, like, k, key=key, which=which, num_iters=num_iters)
        for which, k in SELECTIONS.items()
    }


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
