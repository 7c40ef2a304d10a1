"""Newton-CG, Hessian-free and natural gradient against ground truth: scipy, exact Newton steps, NaNs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from conftest import flat, rerun_optimized, to_float64
from jax.flatten_util import ravel_pytree
from test_tasks import tiny_task

import hvpopt
from hvpopt import CGStatus
from hvpopt.testbed.tasks import make_task


def minimise(tx, f, params, steps, stop=0.0, extra=None):
    """Runs ``steps`` jitted updates (fewer once ||grad|| <= stop); returns params, state, steps taken."""
    extra = extra or {}

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(f)(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f, **extra)
        return optax.apply_updates(params, updates), state

    grad_norm = jax.jit(lambda params: optax.tree_utils.tree_norm(jax.grad(f)(params)))
    state = tx.init(params)
    for taken in range(steps):
        if stop and float(grad_norm(params)) <= stop:
            return params, state, taken
        params, state = step(params, state)
    return params, state, steps


@pytest.mark.parametrize("condition", [1e1, 1e3, 1e6])
def test_newton_cg_solves_a_quadratic_in_one_step_whatever_its_conditioning(condition):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    a = q @ np.diag(np.geomspace(1, condition, 20)) @ q.T
    b = rng.standard_normal(20)
    f = lambda x: 0.5 * x @ a @ x - b @ x
    x, state, taken = minimise(hvpopt.newton_cg(forcing=1e-12, maxiter=100), f, jnp.zeros(20), 5, stop=1e-8)
    assert taken == 1 and np.allclose(x, np.linalg.solve(a, b), rtol=1e-6)
    x, state, taken = minimise(hvpopt.newton_cg(), f, jnp.zeros(20), 5, stop=1e-8)
    assert taken == 2  # the defaults: eta = 0.1, then, the linear model being exact, sqrt(eps)
    assert np.allclose(x, np.linalg.solve(a, b), rtol=1e-6)


def spd_quadratic(n, condition, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ np.diag(np.geomspace(1, condition, n)) @ q.T, rng.standard_normal(n)


def scipy_newton_cg(f, grad, hessp, start, *, expect_success=True):
    """scipy's Newton-CG from ``start``: its iterations, Hessian products and final gradient norm.

    ``expect_success=False``: scipy may stop where it is (on a quadratic of condition 1e8 it reports
    precision loss or a non-positive-definite Hessian, from rounding); its gradient norm there is the bar.
    """
    result = scipy.optimize.minimize(f, start, jac=grad, hessp=hessp, method="Newton-CG")
    assert result.success or not expect_success, result.message
    return result.nit, result.nhev, np.linalg.norm(grad(result.x))


def quadratic_loss(x, a, b):
    return 0.5 * x @ a @ x - b @ x


def rosenbrock_loss(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


@functools.cache
def newton_cg_step(loss, **options):
    """A jitted Newton-CG step on ``loss(params, *data)``, cached: one compile per shape."""
    tx = hvpopt.newton_cg(**options)

    @jax.jit
    def step(params, state, data):
        f = lambda p: loss(p, *data)
        value, grad = jax.value_and_grad(f)(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(params, updates), state, optax.tree_utils.tree_norm(grad)

    return tx, step


def newton_cg_steps_to(stop, loss, params, data=(), max_steps=300, **options):
    """Steps taken until ``||grad|| <= stop``, with the parameters and the state then."""
    tx, step = newton_cg_step(loss, **options)
    state = tx.init(params)
    for taken in range(max_steps + 1):
        new_params, new_state, grad_norm = step(params, state, data)  # grad_norm at params
        if float(grad_norm) <= stop:
            return taken, params, state
        params, state = new_params, new_state
    raise AssertionError(f"no convergence in {max_steps} steps: |g| = {float(grad_norm):.2e}")


# (dimension, condition number, newton_cg options). The 200-parameter quadratic of condition
# 1e8 needs about 17,000 CG iterations in all (float64); at the default budget of 1000 a step
# that is 57 steps against scipy's 10 (budget 20 n = 4000), so it runs with scipy's budget.
QUADRATICS = [
    (10, 1e2, {}),
    (10, 1e8, {}),
    (40, 1e6, {}),
    (200, 1e4, {}),
    (200, 1e6, {}),
    (200, 1e8, {"maxiter": 4000}),
]
ROSENBROCK_STARTS = [[-1.2, 1.0], [-1.2, 1.0, -1.2, 1.0, 0.5, 0.3]] + [[-1.2, 1.0] * (n // 2) for n in (20, 60, 100)]


def test_newton_cg_needs_no_more_steps_than_scipy_newton_cg(request):
    """Steps to scipy's final gradient norm (1e-8 at least) against scipy's iterations, same start.

    The quadratics of condition 1e8 are solved to the limit of float64, where the order of XLA's sums
    matters: compiled without LLVM's optimization (the suite's setting), a 200-dimensional one stalled at
    |g| = 1.8e-3 against scipy's 1.3e-4. So this test runs compiled as users run it.
    """
    if rerun_optimized(request):
        return
    rows = []  # (problem, dimension, our steps, our HVPs, scipy's iterations, scipy's HVPs)
    for n, condition, options in QUADRATICS:
        a, b = spd_quadratic(n, condition)
        nit, nhev, scipy_grad = scipy_newton_cg(
            lambda x: quadratic_loss(x, a, b), lambda x: a @ x - b, lambda x, p: a @ p, np.zeros(n),
            expect_success=condition < 1e8,
        )  # fmt: skip
        stop = max(scipy_grad, 1e-8)
        taken, x, state = newton_cg_steps_to(
            stop, quadratic_loss, jnp.zeros(n), (jnp.asarray(a), jnp.asarray(b)), **options
        )
        assert np.linalg.norm(a @ np.asarray(x) - b) <= 1.01 * stop
        rows.append((f"quadratic, condition {condition:.0e}", n, taken, int(state.num_hvps), nit, nhev))
        if not options:
            assert taken <= 5  # at the defaults, whatever the conditioning
    for start in map(np.array, ROSENBROCK_STARTS):
        nit, nhev, _ = scipy_newton_cg(
            scipy.optimize.rosen, scipy.optimize.rosen_der, scipy.optimize.rosen_hess_prod, start
        )
        taken, x, state = newton_cg_steps_to(1e-8, rosenbrock_loss, jnp.asarray(start))
        if start.size <= 6:
            np.testing.assert_allclose(x, 1.0, atol=1e-8)
        else:  # the local minimum near (-1, 1, ..., 1), where scipy reaches the global one: not like for like
            np.testing.assert_allclose(rosenbrock_loss(x), 3.98662385, rtol=1e-8)
        rows.append(("extended Rosenbrock", start.size, taken, int(state.num_hvps), nit, nhev))
        if start.size <= 6:  # fewer products too
            assert int(state.num_hvps) <= nhev
    task = make_task("blobs")  # multinomial logistic regression with an L2 penalty
    start, unravel = ravel_pytree(to_float64(task.params))
    data = (jnp.asarray(task.train.inputs, jnp.float64), jnp.asarray(task.train.targets))
    logistic_loss = lambda w, x, y: task.objective(unravel(w), x, y)
    f, grad = jax.jit(logistic_loss), jax.jit(jax.grad(logistic_loss))
    hvp = jax.jit(lambda w, v: hvpopt.hvp(lambda w: logistic_loss(w, *data), w, v))
    nit, nhev, _ = scipy_newton_cg(
        lambda w: float(f(w, *data)),
        lambda w: np.asarray(grad(w, *data)),
        lambda w, v: np.asarray(hvp(w, v)),
        np.asarray(start),
    )
    taken, _, state = newton_cg_steps_to(1e-8, logistic_loss, start, data)
    rows.append(("logistic regression", start.size, taken, int(state.num_hvps), nit, nhev))
    print(
        "\n".join(
            f"{name:30s} n={n:4d}  ours {taken:3d} steps {hvps:6d} HVPs  scipy {nit:3d} steps {nhev:6d} HVPs"
            for name, n, taken, hvps, nit, nhev in rows
        )
    )
    for name, n, taken, _, nit, _ in rows:
        assert taken <= nit, (name, n, taken, nit)


def test_newton_cg_reports_a_spent_cg_budget_and_takes_a_jacobi_preconditioner():
    rng = np.random.default_rng(1)
    scales = np.sqrt(np.logspace(-3, 3, 30))  # badly scaled: a Jacobi preconditioner fixes it
    a = scales[:, None] * spd_quadratic(30, 10.0, seed=2)[0] * scales[None, :]
    data = (jnp.asarray(a), jnp.asarray(rng.standard_normal(30)))
    plain_steps, _, plain = newton_cg_steps_to(1e-8, quadratic_loss, jnp.zeros(30), data)
    assert int(plain.cg_budget_exhausted_count) == 0 and CGStatus.NAMES[int(plain.cg_status)] == "converged"
    jacobi = lambda hessian, params: hvpopt.jacobi_preconditioner(hvpopt.exact_diagonal(hessian, params))
    steps, _, preconditioned = newton_cg_steps_to(1e-8, quadratic_loss, jnp.zeros(30), data, precond=jacobi)
    assert steps <= plain_steps and 2 * int(preconditioned.num_hvps) < int(plain.num_hvps)
    tx, step = newton_cg_step(quadratic_loss, maxiter=3)
    params, state = jnp.zeros(30), tx.init(jnp.zeros(30))
    for _ in range(4):
        params, state, _ = step(params, state, data)
    assert int(state.cg_budget_exhausted_count) == 4 and CGStatus.NAMES[int(state.cg_status)] == "max_iterations"
    assert int(state.num_hvps) == 12


def test_newton_cg_warm_start_helps_along_a_curved_valley():
    start = jnp.array([-1.2, 1.0])
    cold_steps, _, cold = newton_cg_steps_to(1e-8, rosenbrock_loss, start)
    warm_steps, _, warm = newton_cg_steps_to(1e-8, rosenbrock_loss, start, warm_start=True)
    assert warm_steps < cold_steps and int(warm.num_hvps) < int(cold.num_hvps)  # 26 steps, 69 HVPs against 61, 113


def test_natural_gradient_with_the_true_fisher_is_newtons_step_on_logistic_regression():
    # Softmax regression without a penalty: the Fisher, the Gauss-Newton matrix and the Hessian coincide.
    task = make_task("blobs", l2=0.0)
    params = to_float64(task.params)
    x, y = task.train.inputs[:64].astype(np.float64), task.train.targets[:64]
    f = lambda p: task.batch_loss(p, x, y)
    tx = hvpopt.natural_gradient(task.model_fn, task.loss, damping=1e-3, maxiter=100, rtol=1e-12)
    grad = jax.grad(f)(params)
    updates, state = jax.jit(lambda p, g: tx.update(g, tx.init(p), p, curvature_batch=(x, y)))(params, grad)
    hessian = hvpopt.dense_matrix(hvpopt.hessian_operator(f, params), params)
    newton = -np.linalg.solve(hessian + 1e-3 * np.eye(len(hessian)), flat(grad))
    assert np.allclose(flat(updates), newton, rtol=1e-8, atol=1e-10)
    assert int(state.num_fisher_products) == int(state.cg_iterations) > 0


@pytest.mark.parametrize("fisher", ["monte_carlo", "empirical"])
def test_natural_gradient_estimates_decrease_the_loss(fisher):
    task = make_task("blobs")
    batch = task.train.take(range(128))
    f = lambda p: task.objective(p, batch.inputs, batch.targets)
    tx = hvpopt.natural_gradient(
        task.model_fn, task.loss, fisher=fisher, damping=1e-2, learning_rate=0.5, key=jax.random.key(0), num_samples=4
    )
    params, state, _ = minimise(tx, f, task.params, 10, extra={"curvature_batch": (batch.inputs, batch.targets)})
    assert f(params) < 0.5 * f(task.params) and int(state.count) == 10


def test_hessian_free_decreases_a_small_transformers_loss():
    task = tiny_task("reverse")
    batch = task.train.take(range(32))
    f = jax.jit(lambda p: task.batch_loss(p, batch.inputs, batch.targets))
    curvature = task.train.take(range(16))  # a subset of the gradient batch
    tx = hvpopt.hessian_free(task.model_fn, task.loss, maxiter=20)
    params, state, _ = minimise(tx, f, task.params, 8, extra={"curvature_batch": (curvature.inputs, curvature.targets)})
    assert f(params) < 0.8 * f(task.params)
    assert int(state.count) == 8 and int(state.num_ggn_products) > 8 and np.isfinite(float(state.reduction_ratio))
    assert float(state.damping) != 1.0  # the Levenberg-Marquardt rule moved it


def test_natural_gradient_line_search_keeps_a_small_damping_from_diverging():
    task = make_task("blobs")  # logistic regression, L2 1e-2
    x, y = task.train.inputs, task.train.targets
    f = lambda p: task.objective(p, x, y)
    tx = hvpopt.natural_gradient(task.model_fn, task.loss, damping=1e-4 + task.l2)

    def losses(with_value_fn):
        @jax.jit
        def step(params, state):
            extra = {"value_fn": f} if with_value_fn else {}
            updates, state = tx.update(jax.grad(f)(params), state, params, curvature_batch=(x, y), **extra)
            return optax.apply_updates(params, updates), state

        params, state, seen = task.params, tx.init(task.params), [float(f(task.params))]
        for _ in range(6):
            params, state = step(params, state)
            seen.append(float(f(params)))
        return seen, state

    fixed, _ = losses(False)
    searched, state = losses(True)
    assert max(fixed) > 10 * fixed[0]  # the full step from the start overshoots
    assert all(b <= a for a, b in zip(searched, searched[1:])) and searched[-1] < 0.5 * searched[0]
    assert 0 < float(state.step_size) <= 1.0


def optimizers(task):
    return {
        "newton_cg": (hvpopt.newton_cg(), {}),
        "hessian_free": (hvpopt.hessian_free(task.model_fn, task.loss, maxiter=5), "batch"),
        "natural_gradient": (hvpopt.natural_gradient(task.model_fn, task.loss), "batch"),
    }


@pytest.mark.parametrize("name", ["newton_cg", "hessian_free", "natural_gradient"])
def test_a_nan_loss_or_gradient_skips_the_step_and_keeps_the_parameters(name):
    task = make_task("blobs", model_options={"hidden_sizes": [4]})  # mixed shapes: two layers
    batch = task.train.take(range(16))
    tx, needs = optimizers(task)[name]
    extra = {"curvature_batch": (batch.inputs, batch.targets)} if needs else {}
    poisoned = lambda p: task.batch_loss(p, batch.inputs, batch.targets) * jnp.nan

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(poisoned)(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=poisoned, **extra)
        return optax.apply_updates(params, updates), state

    params, state = step(task.params, tx.init(task.params))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(task.params)))
    assert int(state.skipped_steps) == 1 and int(state.count) == 1
    if name == "newton_cg":
        assert CGStatus.NAMES[int(state.cg_status)] == "non_finite"


def test_optimizers_compose_with_optax_chain_and_name_missing_arguments():
    task = make_task("blobs")
    f = lambda p: task.objective(p, task.train.inputs, task.train.targets)
    tx = optax.chain(optax.clip_by_global_norm(10.0), hvpopt.newton_cg())
    params, _, _ = minimise(tx, f, task.params, 3)
    assert f(params) < f(task.params)
    with pytest.raises(ValueError, match="needs value_fn=..."):
        hvpopt.newton_cg().update(task.params, hvpopt.newton_cg().init(task.params), task.params)
    with pytest.raises(ValueError, match="needs curvature_batch=..."):
        tx = hvpopt.hessian_free(task.model_fn, task.loss)
        tx.update(task.params, tx.init(task.params), task.params, value_fn=f)
    with pytest.raises(ValueError, match="needs key="):
        hvpopt.natural_gradient(task.model_fn, task.loss, fisher="monte_carlo")
