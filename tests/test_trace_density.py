"""Trace estimators and stochastic Lanczos quadrature against dense spectra, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mlp, problem_hessian
from test_lanczos import LIKE, P, dense_matvec, random_symmetric, synthetic_matrix

import hvpopt
from hvpopt.linalg.density import spectral_density
from hvpopt.linalg.trace_estimation import trace

jax.config.update("jax_enable_x64", True)

METHODS = ("hutchinson", "hutch++")


def both_estimates(matvec, like, key, num_samples):
    return {m: trace(matvec, like, key=key, num_samples=num_samples, method=m) for m in METHODS}


@jax.jit
def dense_estimates(a, key):
    return both_estimates(dense_matvec(a, LIKE), LIKE, key, 30)


def test_trace_within_four_standard_errors_synthetic_and_mlp_hessian():
    a = synthetic_matrix()
    problem = make_mlp()

    @jax.jit
    def mlp_estimates(params, key):
        return both_estimates(hvpopt.hessian_operator(problem.objective, params), params, key, 30)

    cases = [
        (dense_estimates(jnp.asarray(a), jax.random.key(0)), np.trace(a)),
        (mlp_estimates(problem.params, jax.random.key(1)), np.trace(problem_hessian(problem))),
    ]
    for estimates, true_trace in cases:
        for estimate in estimates.values():
            assert 0 < estimate.std_error < np.inf
            assert abs(estimate.value - true_trace) < 4 * estimate.std_error


def test_hutchinson_std_error_formula():
    a = synthetic_matrix()
    key = jax.random.key(5)
    estimate = dense_estimates(jnp.asarray(a), key)["hutchinson"]
    # White box: the probes come from the first half of jax.random.split(key).
    probe_keys = jax.random.split(jax.random.split(key)[0], 30)
    z = np.stack([jax.random.rademacher(k, (P,), jnp.float64) for k in probe_keys])
    forms = np.einsum("sp,pq,sq->s", z, a, z)
    np.testing.assert_allclose(estimate.value, forms.mean(), rtol=1e-12)
    np.testing.assert_allclose(estimate.std_error, forms.std(ddof=1) / np.sqrt(30), rtol=1e-12)


def test_hutchpp_is_exact_for_rank_at_most_a_third_of_the_budget():
    # rank 10 plus zeros; num_samples=30 gives a sketch of 30 // 3 = 10 probes.
    a = random_symmetric(np.concatenate([np.linspace(-2.0, 5.0, 10), np.zeros(P - 10)]), seed=4)
    estimate = dense_estimates(jnp.asarray(a), jax.random.key(2))["hutch++"]
    assert abs(estimate.value - np.trace(a)) < 1e-12
    assert estimate.std_error < 1e-12


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    a = jnp.asarray(random_symmetric(0.6 ** np.arange(P), seed=3))
    keys = jax.random.split(jax.random.key(3), 4)
    estimates = jax.vmap(dense_estimates, in_axes=(None, 0))(a, keys)  # 30 products each
    error = {m: np.sqrt(np.mean((estimates[m].value - np.trace(a)) ** 2)) for m in METHODS}
    assert error["hutch++"] < error["hutchinson"] / 10


def test_trace_argument_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="method must be one of 'hutchinson', 'hutch\\+\\+'"):
        trace(lambda v: v, LIKE, key=key, num_samples=10, method="exact")
    with pytest.raises(ValueError, match="num_samples must be at least 4 for 'hutch\\+\\+'; got 3"):
        trace(lambda v: v, LIKE, key=key, num_samples=3, method="hutch++")
    with pytest.raises(ValueError, match="num_samples must be at least 2 for 'hutchinson'"):
        trace(lambda v: v, LIKE, key=key, num_samples=1)


def slq_cdf_distance(nodes, weights, eigenvalues) -> float:
    """Kolmogorov-Smirnov distance between the averaged SLQ quadrature and the spectrum."""
    nodes, weights = np.ravel(nodes), np.ravel(weights) / len(nodes)
    points = np.sort(np.concatenate([nodes, eigenvalues]))
    distance = 0.0
    for below in (np.less_equal, np.less):  # both one-sided limits at every jump
        slq = np.array([weights[below(nodes, t)].sum() for t in points])
        dense = np.array([below(eigenvalues, t).mean() for t in points])
        distance = max(distance, np.max(np.abs(slq - dense)))
    return distance


def test_slq_density_matches_the_dense_spectrum():
    a = synthetic_matrix()
    num_iters, num_probes, key = 30, 10, jax.random.key(4)
    sd = jax.jit(
        lambda a: spectral_density(dense_matvec(a, LIKE), LIKE, key=key, num_iters=num_iters, num_probes=num_probes)
    )(jnp.asarray(a))
    eigenvalues = np.linalg.eigvalsh(a)
    assert sd.nodes.shape == sd.weights.shape == (num_probes, num_iters)
    assert sd.grid.shape == sd.density.shape == (1000,)
    assert slq_cdf_distance(sd.nodes, sd.weights, eigenvalues) < 0.1
    assert abs(np.trapezoid(sd.density, sd.grid) - 1) < 1e-3
    assert sd.grid[0] < eigenvalues[0] and eigenvalues[-1] < sd.grid[-1]
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, atol=1e-12)
    # Per probe the quadrature is exact for low moments: sum_i tau_i theta_i^j = v^T A^j v,
    # with the documented probes v = rademacher(split(key)[l]) / sqrt(P).
    for probe_key, nodes, weights in zip(jax.random.split(key, num_probes), sd.nodes, sd.weights):
        v = np.asarray(jax.random.rademacher(probe_key, (P,), jnp.float64)) / np.sqrt(P)
        a_power_v = v
        for j in range(4):
            assert abs(np.sum(weights * nodes**j) - v @ a_power_v) < 1e-10 * 10.0**j
            a_power_v = a @ a_power_v
    # Averaged over probes the first moment estimates tr(A) / P, with
    # Var[v^T A v] = 2 (||A||_F^2 - sum_i A_ii^2) / P^2 for one probe.
    std = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / P**2 / num_probes)
    assert abs(np.mean(np.sum(sd.weights * sd.nodes, axis=1)) - np.trace(a) / P) < 4 * std


def test_slq_on_a_rank_deficient_matrix_and_the_mlp_hessian():
    # Rank 5 of 200: the Krylov space is exhausted after 6 steps of 20.
    a = random_symmetric(np.concatenate([[4.0, 3.0, 2.0, -1.0, 0.5], np.zeros(P - 5)]), seed=5)
    problem = make_mlp()
    hessian_eigenvalues = np.linalg.eigvalsh(problem_hessian(problem))

    @jax.jit
    def run(a, params, key):
        low_rank = spectral_density(
            dense_matvec(a, LIKE), LIKE, key=key, num_iters=20, num_probes=3, sigma=0.05, grid_size=500
        )
        matvec = hvpopt.hessian_operator(problem.objective, params)
        mlp = spectral_density(matvec, params, key=key, num_iters=30, num_probes=2)
        return low_rank, mlp

    low_rank, mlp = run(jnp.asarray(a), problem.params, jax.random.key(6))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves((low_rank, mlp)))
    assert float(low_rank.sigma) == 0.05 and low_rank.grid.shape == (500,)
    at_zero = np.where(np.abs(low_rank.nodes) < 1e-8, low_rank.weights, 0.0).sum(axis=1)
    np.testing.assert_allclose(at_zero, (P - 5) / P, atol=0.05)
    np.testing.assert_allclose(low_rank.nodes.min(axis=1), -1.0, atol=1e-10)
    np.testing.assert_allclose(low_rank.nodes.max(axis=1), 4.0, atol=1e-10)
    # On the MLP Hessian (P = 51) 30 steps resolve the extreme eigenvalues.
    np.testing.assert_allclose(mlp.nodes.min(axis=1), hessian_eigenvalues[0], rtol=1e-6)
    np.testing.assert_allclose(mlp.nodes.max(axis=1), hessian_eigenvalues[-1], rtol=1e-6)
    assert abs(np.trapezoid(mlp.density, mlp.grid) - 1) < 1e-3


def test_density_argument_errors():
    key = jax.random.key(0)
    matvec = lambda v: v
    with pytest.raises(ValueError, match="num_iters must be at most the number of parameters 200"):
        spectral_density(matvec, LIKE, key=key, num_iters=201, num_probes=1)
    with pytest.raises(ValueError, match="num_probes must be a positive integer"):
        spectral_density(matvec, LIKE, key=key, num_iters=5, num_probes=0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        spectral_density(matvec, LIKE, key=key, num_iters=5, num_probes=1, sigma=0.0)
    with pytest.raises(ValueError, match="grid_size must be at least 2"):
        spectral_density(matvec, LIKE, key=key, num_iters=5, num_probes=1, grid_size=1)
