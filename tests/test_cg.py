"""Conjugate gradient against numpy.linalg.solve, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flat, make_mlp, problem_hessian, rel_error
from jax.flatten_util import ravel_pytree

import hvpopt
from hvpopt import CGStatus


def spd_matrix(n, condition, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.logspace(0, np.log10(condition), n)) @ q.T


def as_pytree_operator(a):
    """``a`` acting on a dict of two leaves, so every test exercises pytrees."""
    split = a.shape[0] // 3
    like = {"u": jnp.zeros(split), "w": jnp.zeros((a.shape[0] - split,))}
    unravel = ravel_pytree(like)[1]
    matvec = lambda v: unravel(jnp.asarray(a) @ ravel_pytree(v)[0])
    return matvec, unravel


@pytest.mark.parametrize("condition", [1e2, 1e4, 1e6])
def test_spd_systems_to_condition_1e6(condition):
    a = spd_matrix(60, condition)
    b = np.random.default_rng(1).normal(size=60)
    matvec, unravel = as_pytree_operator(a)
    result = jax.jit(lambda b: hvpopt.cg(matvec, b, rtol=1e-14, maxiter=2000))(unravel(jnp.asarray(b)))
    assert bool(result.converged) and int(result.status) == CGStatus.CONVERGED
    assert rel_error(flat(result.x), np.linalg.solve(a, b)) < 1e-8
    assert jax.tree.structure(result.x) == jax.tree.structure(unravel(jnp.asarray(b)))
    # The recurrence's residual drifts from the true one near machine precision.
    assert result.residual_norm <= 1e-14 * np.linalg.norm(b)
    assert np.linalg.norm(b - a @ flat(result.x)) <= 1e-10 * np.linalg.norm(b)


def test_damped_singular_system():
    rng = np.random.default_rng(2)
    low_rank = rng.normal(size=(40, 5))
    a = low_rank @ low_rank.T  # rank 5
    b = rng.normal(size=40)
    result = hvpopt.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), damping=0.1, rtol=1e-13, maxiter=200)
    assert bool(result.converged)
    assert rel_error(result.x, np.linalg.solve(a + 0.1 * np.eye(40), b)) < 1e-8


def test_indefinite_system_is_flagged_and_finite():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    a = (q * np.linspace(-2.0, 5.0, 30)) @ q.T
    b = jnp.asarray(rng.normal(size=30))
    result = hvpopt.cg(lambda v: jnp.asarray(a) @ v, b, damping=0.5)  # still indefinite
    assert bool(result.negative_curvature) and not bool(result.converged)
    assert CGStatus.NAMES[int(result.status)] == "negative_curvature"
    assert np.all(np.isfinite(result.x)) and np.isfinite(result.residual_norm)
    # The kept iterate is the last one before the bad direction: it lowered the model.
    q_model = 0.5 * result.x @ (a + 0.5 * np.eye(30)) @ result.x - b @ result.x
    assert q_model <= 0.0
    np.testing.assert_allclose(result.model_values[-1], q_model, rtol=1e-10)
    enough = hvpopt.cg(lambda v: jnp.asarray(a) @ v, b, damping=2.5, rtol=1e-12, maxiter=300)
    assert bool(enough.converged)
    assert rel_error(enough.x, np.linalg.solve(a + 2.5 * np.eye(30), b)) < 1e-8


def test_negative_curvature_at_the_first_step_returns_the_start():
    result = hvpopt.cg(lambda v: -v, jnp.ones(3), x0=jnp.array([0.5, 0.0, 0.0]))
    assert int(result.iterations) == 1 and bool(result.negative_curvature)
    np.testing.assert_array_equal(result.x, [0.5, 0.0, 0.0])


def test_batched_right_hand_sides_under_vmap():
    a = spd_matrix(20, 1e3, seed=4)
    bs = np.random.default_rng(5).normal(size=(4, 20))
    solve = jax.jit(jax.vmap(lambda b: hvpopt.cg(lambda v: jnp.asarray(a) @ v, b, rtol=1e-13, maxiter=200)))
    results = solve(jnp.asarray(bs))
    assert np.all(results.converged)
    for x, b in zip(results.x, bs):
        assert rel_error(x, np.linalg.solve(a, b)) < 1e-8


def test_jacobi_preconditioner_reduces_iterations_on_a_badly_scaled_system():
    rng = np.random.default_rng(6)
    d = np.logspace(-3, 3, 50)
    c = spd_matrix(50, 10.0, seed=7)
    a = np.sqrt(d)[:, None] * c * np.sqrt(d)[None, :]
    b = jnp.asarray(rng.normal(size=50))
    matvec = lambda v: jnp.asarray(a) @ v
    plain = hvpopt.cg(matvec, b, rtol=1e-10, maxiter=5000)
    diagonal = hvpopt.exact_diagonal(matvec, b)
    preconditioned = hvpopt.cg(matvec, b, rtol=1e-10, maxiter=5000, precond=hvpopt.jacobi_preconditioner(diagonal))
    assert bool(preconditioned.converged)
    assert int(preconditioned.iterations) * 3 < int(plain.iterations)
    assert rel_error(preconditioned.x, np.linalg.solve(a, b)) < 1e-6


def test_steihaug_trust_region():
    a = spd_matrix(25, 1e3, seed=8)
    b = jnp.asarray(np.random.default_rng(9).normal(size=25))
    matvec = lambda v: jnp.asarray(a) @ v
    exact = np.linalg.solve(a, b)
    loose = hvpopt.cg(matvec, b, radius=10 * np.linalg.norm(exact), rtol=1e-12, maxiter=200)
    assert bool(loose.converged) and not bool(loose.hit_boundary)
    radius = 0.3 * np.linalg.norm(exact)
    tight = hvpopt.cg(matvec, b, radius=radius, rtol=1e-12, maxiter=200)
    assert bool(tight.hit_boundary) and CGStatus.NAMES[int(tight.status)] == "trust_region"
    np.testing.assert_allclose(np.linalg.norm(tight.x), radius, rtol=1e-10)
    np.testing.assert_allclose(tight.residual_norm, np.linalg.norm(b - a @ tight.x), rtol=1e-8)
    indefinite = hvpopt.cg(lambda v: -v, b, radius=2.0)
    assert bool(indefinite.negative_curvature) and bool(indefinite.hit_boundary)
    np.testing.assert_allclose(np.linalg.norm(indefinite.x), 2.0, rtol=1e-12)
    np.testing.assert_allclose(indefinite.x, 2.0 * b / np.linalg.norm(b), rtol=1e-12)  # steepest descent


def test_warm_start_and_max_iterations():
    a = spd_matrix(15, 1e2, seed=10)
    b = jnp.asarray(np.random.default_rng(11).normal(size=15))
    matvec = lambda v: jnp.asarray(a) @ v
    exact = jnp.asarray(np.linalg.solve(a, b))
    warm = hvpopt.cg(matvec, b, x0=exact, rtol=1e-8)
    assert bool(warm.converged) and int(warm.iterations) == 0 and int(warm.num_matvecs) == 1
    short = hvpopt.cg(matvec, b, maxiter=3)
    assert int(short.iterations) == 3 and not bool(short.converged)
    assert CGStatus.NAMES[int(short.status)] == "max_iterations"


def test_model_values_and_saved_iterates():
    a = spd_matrix(12, 1e2, seed=12)
    b = np.random.default_rng(13).normal(size=12)
    save_at = (0, 1, 2, 5, 40)
    result = hvpopt.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), rtol=1e-12, maxiter=60, save_at=save_at)
    n = int(result.iterations)
    values = np.asarray(result.model_values)
    assert np.all(np.diff(values[: n + 1]) <= 1e-12)  # CG decreases the model monotonically
    assert np.all(values[n:] == values[n])
    for k, (x, iteration) in enumerate(zip(result.saved_iterates, result.saved_iterations)):
        q = 0.5 * x @ a @ x - b @ x
        np.testing.assert_allclose(values[int(iteration)], q, rtol=1e-8, atol=1e-12)
        assert int(iteration) == min(save_at[k], n)


def test_relative_progress_rule_stops_early():
    a = spd_matrix(200, 1e5, seed=14)
    b = jnp.asarray(np.random.default_rng(15).normal(size=200))
    matvec = lambda v: jnp.asarray(a) @ v
    full = hvpopt.cg(matvec, b, rtol=1e-12, maxiter=1000)
    early = hvpopt.cg(matvec, b, rtol=1e-12, maxiter=1000, progress_tol=5e-4)
    assert CGStatus.NAMES[int(early.status)] == "no_progress"
    assert int(early.iterations) < int(full.iterations)
    # It stopped where further progress was small: most of the model's decrease is in.
    assert float(early.model_values[-1]) <= 0.9 * float(full.model_values[-1])


def test_non_finite_matvec_keeps_the_last_good_iterate():
    calls = jnp.array([1.0, 1.0])
    result = hvpopt.cg(lambda v: jnp.where(v[0] > 0.5, jnp.nan, 2.0) * v, calls)
    assert CGStatus.NAMES[int(result.status)] == "non_finite"
    assert np.all(np.isfinite(result.x))


def test_solves_a_damped_hessian_of_a_model():
    problem = make_mlp()
    hessian = problem_hessian(problem)
    g = jax.grad(problem.objective)(problem.params)
    damping = abs(np.linalg.eigvalsh(hessian).min()) + 0.1

    @jax.jit
    def solve(params, g, damping):
        matvec = hvpopt.hessian_operator(problem.objective, params)
        return hvpopt.cg(matvec, g, damping=damping, rtol=1e-12, maxiter=500)

    result = solve(problem.params, g, damping)
    assert bool(result.converged)
    expected = np.linalg.solve(hessian + damping * np.eye(len(hessian)), flat(g))
    assert rel_error(flat(result.x), expected) < 1e-8


def test_differentiable_solution():
    a = jnp.asarray(spd_matrix(8, 10.0, seed=16))
    b = jnp.asarray(np.random.default_rng(17).normal(size=8))

    def solution_sum(scale, b):
        result = hvpopt.cg(lambda v: scale * (a @ v), b, rtol=1e-13, maxiter=100, differentiable=True)
        return jnp.sum(result.x)

    d_scale, d_b = jax.grad(solution_sum, argnums=(0, 1))(2.0, b)
    x = np.linalg.solve(2.0 * np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(d_scale, -np.sum(x) / 2.0, rtol=1e-8)
    np.testing.assert_allclose(d_b, np.linalg.solve(2.0 * np.asarray(a), np.ones(8)), rtol=1e-8)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x0={"w": jnp.ones(2)}), ValueError, "x0 must have the same pytree structure as b"),
        (dict(damping=-1.0), ValueError, "damping must be a finite number >= 0"),
        (dict(maxiter=0), ValueError, "maxiter must be a positive integer"),
        (dict(save_at=(5,), maxiter=3), ValueError, "save_at must hold iterations"),
        (dict(radius=-1.0), ValueError, "radius must be >= 0"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        hvpopt.cg(lambda v: v, jnp.ones(3), **kwargs)


def test_integer_right_hand_side_is_refused():
    with pytest.raises(TypeError, match="b must have a floating dtype"):
        hvpopt.cg(lambda v: v, jnp.arange(3))


def test_mixed_precision_pytree_keeps_each_leaf_dtype():
    b = {"full": jnp.ones(3, jnp.float32), "half": jnp.ones(2, jnp.bfloat16)}
    matvec = lambda v: {"full": 2.0 * v["full"], "half": 4.0 * v["half"]}
    for damping in (0.0, np.float64(0.5)):  # a float64 damping must not promote the iterates
        result = jax.jit(lambda b: hvpopt.cg(matvec, b, damping=damping, radius=np.float64(10.0)))(b)
        assert bool(result.converged)
        assert result.x["full"].dtype == jnp.float32 and result.x["half"].dtype == jnp.bfloat16
        np.testing.assert_allclose(result.x["full"], 1 / (2 + damping), rtol=1e-5)  # float32 on any backend
        np.testing.assert_allclose(np.asarray(result.x["half"], np.float32), 1 / (4 + damping), rtol=1e-2)


def test_warm_start_outside_the_trust_region_is_brought_onto_it():
    a = spd_matrix(6, 10.0, seed=18)
    b = jnp.asarray(np.random.default_rng(19).normal(size=6))
    result = hvpopt.cg(lambda v: jnp.asarray(a) @ v, b, x0=3 * jnp.ones(6), radius=1.0)
    assert np.linalg.norm(result.x) <= 1.0 + 1e-12


def test_indefinite_preconditioner_is_reported():
    a = spd_matrix(5, 10.0, seed=20)
    b = jnp.ones(5)
    flip = jnp.array([1.0, -1.0, 1.0, -1.0, 1.0])
    for precond in (lambda r: 0.0 * r, lambda r: flip * r):
        result = hvpopt.cg(lambda v: jnp.asarray(a) @ v, b, precond=precond, maxiter=50)
        assert CGStatus.NAMES[int(result.status)] == "bad_preconditioner"
        assert np.all(np.isfinite(result.x))


def test_matvec_output_and_sizes_are_checked():
    with pytest.raises(ValueError, match=r"matvec\(b\) must have shape \(3,\)"):
        hvpopt.cg(lambda v: v[:2], jnp.ones(3))
    with pytest.raises(ValueError, match="b must hold at least one number"):
        hvpopt.cg(lambda v: v, jnp.zeros(0))
    result = hvpopt.cg(lambda v: 2 * v, jnp.ones(3), maxiter=np.int64(3), save_at=np.array([1, 2]))
    assert bool(result.converged)


def _nan_after_first_direction(a):
    """``v -> A v``, NaN once ``v`` is no longer parallel to ``ones`` (from CG's second direction on)."""
    return lambda v: jnp.where(jnp.ptp(v) > 1e-3 * jnp.max(jnp.abs(v)), jnp.nan, a @ v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_non_finite_number_anywhere_stops_cg_with_the_last_finite_iterate(dtype):
    a = jnp.diag(jnp.arange(1.0, 5.0, dtype=dtype))
    ones = jnp.ones(4, dtype)
    bad = lambda value: ones.at[1].set(value)
    tiny = jnp.finfo(dtype).tiny * 1e3  # 1/tiny overflows the first step: x = inf
    one_step = (ones @ ones) / (ones @ a @ ones) * ones  # CG's first iterate from zero
    cases = {  # name: (matvec, b, options, the last finite iterate)
        "nan in b": (lambda v: a @ v, bad(jnp.nan), {}, 0 * ones),
        "inf in b": (lambda v: a @ v, bad(jnp.inf), {}, 0 * ones),
        "nan in x0": (lambda v: a @ v, ones, dict(x0=bad(jnp.nan)), 0 * ones),
        "inf in x0": (lambda v: a @ v, ones, dict(x0=bad(-jnp.inf)), 0 * ones),
        "matvec nan at iteration 2": (_nan_after_first_direction(a), ones, {}, one_step),
        "the same, trust region": (_nan_after_first_direction(a), ones, dict(radius=10.0), one_step),
        "matvec inf": (lambda v: jnp.inf * v, ones, {}, 0 * ones),
        "overflowing update": (lambda v: tiny * v, 1e10 * ones, {}, 0 * ones),
        "damping inf": (lambda v: a @ v, ones, dict(damping=jnp.asarray(jnp.inf, dtype)), 0 * ones),
        "damping nan": (lambda v: a @ v, ones, dict(damping=jnp.asarray(jnp.nan)), 0 * ones),
        "preconditioner nan": (lambda v: a @ v, ones, dict(precond=lambda r: r / (r - r)), 0 * ones),
    }
    for name, (matvec, b, options, last_finite) in cases.items():
        result = hvpopt.cg(matvec, b, maxiter=20, **options)
        assert CGStatus.NAMES[int(result.status)] == "non_finite", name
        assert not bool(result.converged) and not bool(result.negative_curvature), name
        assert result.x.dtype == dtype and np.all(np.isfinite(result.x)), name
        np.testing.assert_allclose(result.x, last_finite, rtol=1e-6, err_msg=name)
        assert np.all(np.isfinite(result.model_values)), name
