"""Dense materialisation and diagonal estimates against dense Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_ggn, flat, make_mlp, problem_hessian

import hvpopt


@pytest.fixture(scope="module")
def mlp():
    return make_mlp()


def test_dense_matrix_matches_jax_hessian(mlp):
    @jax.jit
    def dense(params):
        matvec = hvpopt.hessian_operator(mlp.objective, params)
        return hvpopt.dense_matrix(matvec, params), hvpopt.dense_matrix(matvec, params, batch_size=7)

    expected = problem_hessian(mlp)
    for matrix in dense(mlp.params):
        np.testing.assert_allclose(matrix, expected, atol=1e-13)


def test_exact_diagonal_of_hessian_and_ggn(mlp):
    @jax.jit
    def diagonals(params):
        hessian = hvpopt.hessian_operator(mlp.objective, params)
        ggn = hvpopt.ggn_operator(mlp.model_fn, mlp.loss, params, mlp.inputs, mlp.targets)
        return hvpopt.exact_diagonal(hessian, params), hvpopt.exact_diagonal(ggn, params, batch_size=5)

    hessian_diagonal, ggn_diagonal = diagonals(mlp.params)
    np.testing.assert_allclose(flat(hessian_diagonal), np.diag(problem_hessian(mlp)), atol=1e-13)
    np.testing.assert_allclose(flat(ggn_diagonal), np.diag(dense_ggn(mlp)), atol=1e-13)


def test_hutchinson_is_exact_for_a_diagonal_matrix():
    d = jnp.array([1.0, -2.0, 3.0])
    estimate = hvpopt.hutchinson_diagonal(lambda v: d * v, jnp.zeros(3), key=jax.random.key(0), num_samples=1)
    np.testing.assert_allclose(estimate, d)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_hutchinson_within_its_standard_error(mlp, curvature):
    if curvature == "hessian":
        matvec, dense = hvpopt.hessian_operator(mlp.objective, mlp.params), problem_hessian(mlp)
    else:
        args = (mlp.model_fn, mlp.loss, mlp.params, mlp.inputs, mlp.targets)
        matvec, dense = hvpopt.ggn_operator(*args), dense_ggn(mlp)
    num_samples = 2000
    estimate = jax.jit(lambda key: hvpopt.hutchinson_diagonal(matvec, mlp.params, key=key, num_samples=num_samples))(
        jax.random.key(1)
    )
    # Var[z_i (A z)_i] = sum_{j != i} A_ij^2 for Rademacher z.
    std_error = np.sqrt(((dense**2).sum(1) - np.diag(dense) ** 2) / num_samples)
    assert np.all(np.abs(flat(estimate) - np.diag(dense)) <= 5 * std_error + 1e-12)
    assert np.all(std_error > 0)  # the bound above is not vacuous


def test_hutchinson_estimate_is_a_pytree_like_params(mlp):
    matvec = hvpopt.hessian_operator(mlp.objective, mlp.params)
    estimate = hvpopt.hutchinson_diagonal(matvec, mlp.params, key=jax.random.key(0), num_samples=2)
    assert jax.tree.structure(estimate) == jax.tree.structure(mlp.params)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        hvpopt.hutchinson_diagonal(matvec, mlp.params, key=jax.random.key(0), num_samples=0)
