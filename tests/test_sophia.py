"""The Sophia estimators: unbiased for the Gauss-Newton / Hessian diagonal, and usable in optax.contrib.sophia."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_custom_vjp, make_mlp
from jax.flatten_util import ravel_pytree

import hvpopt


def assert_unbiased(samples, truth, *, sigmas=5.0):
    """Each coordinate's sample mean within ``sigmas`` standard errors (plus rounding) of ``truth``."""
    samples, truth = np.asarray(samples), np.asarray(truth)
    mean = samples.mean(axis=0)
    error = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    assert np.all(np.abs(mean - truth) <= sigmas * error + 1e-12), np.max(np.abs(mean - truth) / (error + 1e-30))
    assert np.max(error) < 0.2 * np.max(np.abs(truth))  # the test has the power to see a bias


def estimates(estimator, params, num_samples, **keywords):
    """``num_samples`` draws of ``estimator``'s update, one key each, flattened."""

    def one(key):
        diagonal, _ = estimator.update(None, estimator.init(params)._replace(key=key), params, **keywords)
        return ravel_pytree(diagonal)[0]

    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), num_samples))


def test_gauss_newton_bartlett_is_unbiased_for_the_gauss_newton_diagonal():
    problem = make_mlp()
    batch = (problem.inputs, problem.targets)
    ggn = hvpopt.ggn_operator(problem.model_fn, problem.loss, problem.params, *batch)
    truth = ravel_pytree(hvpopt.exact_diagonal(ggn, problem.params))[0]
    samples = estimates(hvpopt.gauss_newton_bartlett(problem.model_fn, problem.loss), problem.params, 4000,
                        curvature_batch=batch)  # fmt: skip
    assert_unbiased(samples, truth)


def test_hutchinson_is_unbiased_for_the_hessian_diagonal_through_a_custom_vjp():
    problem = make_custom_vjp()
    truth = ravel_pytree(
        hvpopt.exact_diagonal(hvpopt.hessian_operator(problem.reference_objective, problem.params), problem.params)
    )[0]
    with pytest.warns(UserWarning, match="reverse"):  # forward mode is undefined in the custom_vjp: the fallback
        samples = estimates(hvpopt.hutchinson_hessian(), problem.params, 4000, obj_fn=problem.objective)
    assert_unbiased(samples, truth)


def test_both_run_inside_optax_sophia_under_jit_where_optaxs_own_estimator_fails():
    problem = make_custom_vjp()
    batch = (problem.inputs, problem.targets)
    with pytest.raises(Exception):  # noqa: B017  (JAX's error for forward mode through this custom_vjp)
        own = optax.contrib.sophia(1e-2)
        jax.jit(lambda p, s: own.update(jax.grad(problem.objective)(p), s, p, obj_fn=problem.objective))(
            problem.params, own.init(problem.params)
        )
    for estimator, keywords in [
        (hvpopt.hutchinson_hessian(), {"obj_fn": problem.objective}),
        (hvpopt.gauss_newton_bartlett(problem.model_fn, problem.loss), {"curvature_batch": batch}),
    ]:
        tx = optax.contrib.sophia(3e-2, gamma=0.05, update_interval=2, hessian_diagonal_fn=estimator)

        @jax.jit
        def step(params, state):
            value, grads = jax.value_and_grad(problem.objective)(params)
            updates, state = tx.update(grads, state, params, **keywords)
            return optax.apply_updates(params, updates), state, value

        params, state = problem.params, tx.init(problem.params)
        with pytest.warns(UserWarning) if "obj_fn" in keywords else contextlib.nullcontext():
            losses = [float(step(params, state)[2])]
            for _ in range(30):
                params, state, value = step(params, state)
                losses.append(float(value))
        assert losses[-1] < 0.8 * losses[0], losses
        win_rate = float(hvpopt.sophia_win_rate(state, gamma=0.05))
        assert 0.0 <= win_rate <= 1.0
        assert int(state[0].hessian_fn_state.num_estimates) == 15  # every second step of 30


def test_a_missing_keyword_is_named():
    problem = make_mlp()
    for estimator, name in [
        (hvpopt.gauss_newton_bartlett(problem.model_fn, problem.loss), "curvature_batch"),
        (hvpopt.hutchinson_hessian(), "obj_fn"),
    ]:
        with pytest.raises(ValueError, match=name):
            estimator.update(None, estimator.init(problem.params), problem.params)
    with pytest.raises(TypeError, match="loss"):
        hvpopt.gauss_newton_bartlett(problem.model_fn, lambda o, t: jnp.sum(o))
    with pytest.raises(ValueError, match="SophiaState"):
        hvpopt.sophia_win_rate(optax.adam(1e-3).init(problem.params))
