"""Newton-CG, Hessian-free and natural gradient against ground truth: scipy, exact Newton steps, NaNs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from conftest import flat, to_float64
from test_tasks import tiny_task

import hvpopt
from hvpopt.tasks import make_task


def minimise(tx, f, params, steps, stop=0.0, extra=None):
    """Runs ``steps`` jitted updates (fewer once ||grad|| <= stop); returns params, state, steps taken."""
    extra = extra or {}

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(f)(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f, **extra)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for taken in range(steps):
        if stop and float(optax.tree_utils.tree_norm(jax.grad(f)(params))) <= stop:
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
    x, state, taken = minimise(hvpopt.newton_cg(maxiter=100), f, jnp.zeros(20), 30, stop=1e-6)
    assert taken < 30  # the default forcing min(0.5, sqrt|g|) is loose while |g| > 0.25


def test_newton_cg_reaches_gradient_norm_1e8_on_logistic_regression_in_a_few_steps():
    task = make_task("blobs")
    params = to_float64(task.params)
    f = lambda p: task.objective(p, task.train.inputs, task.train.targets)
    params, state, taken = minimise(hvpopt.newton_cg(), f, params, 20, stop=1e-8)
    assert taken <= 10 and int(state.skipped_steps) == 0


@pytest.mark.parametrize("start", [[-1.2, 1.0], [-1.2, 1.0, -1.2, 1.0, 0.5, 0.3]])
def test_newton_cg_needs_no_more_steps_or_hvps_than_scipy_on_rosenbrock(start):
    rosen = lambda x: jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
    start = np.array(start)
    hvp = jax.jit(lambda x, p: hvpopt.hvp(rosen, x, p))
    reference = scipy.optimize.minimize(
        lambda x: float(rosen(x)), start, jac=lambda x: np.asarray(jax.grad(rosen)(x)),
        hessp=lambda x, p: np.asarray(hvp(jnp.asarray(x), jnp.asarray(p))), method="Newton-CG",
    )
    assert reference.success
    x, state, taken = minimise(hvpopt.newton_cg(), rosen, jnp.asarray(start), 200, stop=1e-8)
    assert np.allclose(x, 1.0, atol=1e-6) and np.allclose(reference.x, 1.0, atol=1e-4)
    assert taken <= reference.nit and int(state.num_hvps) <= reference.nhev, (taken, reference.nit,
                                                                               int(state.num_hvps), reference.nhev)


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
    tx = hvpopt.natural_gradient(task.model_fn, task.loss, fisher=fisher, damping=1e-2,
                                 learning_rate=0.5, key=jax.random.key(0), num_samples=4)
    params, state, _ = minimise(tx, f, task.params, 10, extra={"curvature_batch": (batch.inputs, batch.targets)})
    assert f(params) < 0.5 * f(task.params) and int(state.count) == 10


def test_hessian_free_decreases_a_small_transformers_loss():
    task = tiny_task("reverse")
    batch = task.train.take(range(32))
    f = lambda p: task.batch_loss(p, batch.inputs, batch.targets)
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
