"""hvpopt.kfac: the damped Newton step where K-FAC is exact, faster than AdamW per step, skipped bad steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_mlp, to_float64
from jax.flatten_util import ravel_pytree

import hvpopt
from hvpopt.testbed.models import TransformerConfig, transformer_lm

CE, SE = hvpopt.losses.softmax_cross_entropy, hvpopt.losses.squared_error


def linear_regression():
    """One dense layer with squared error: its Gauss-Newton matrix is its Hessian, and K-FAC is exact."""
    x = jax.random.normal(jax.random.key(0), (12, 3), jnp.float64) * jnp.array([10.0, 1.0, 0.1])
    y = jax.random.normal(jax.random.key(1), (12, 2), jnp.float64)
    params = {"w": jax.random.normal(jax.random.key(2), (3, 2), jnp.float64), "b": jnp.zeros(2, jnp.float64)}
    return (lambda p, x: x @ p["w"] + p["b"]), params, x, y


def make_step(tx, model_fn, loss, x, y):
    """One jitted training step; ``poison`` is added to the loss value the optimizer sees."""
    f = lambda p: loss(model_fn(p, x), y)

    @jax.jit
    def step(params, state, poison):
        value, grads = jax.value_and_grad(f)(params)
        updates, state = tx.update(grads, state, params, value=value + poison, value_fn=f, curvature_batch=(x, y))
        return optax.apply_updates(params, updates), state, value

    return f, step


def train(step, params, state, steps):
    for _ in range(steps):
        params, state, _ = step(params, state, 0.0)  # poison passed always: one compile with the NaN step below
    return params, state


def best_adamw(model_fn, params, x, y, steps, learning_rates=(3e-2, 1e-1)):
    """The lowest loss of AdamW over ``learning_rates``, all through one compiled step."""
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rates[0], weight_decay=0.0)
    f, step = make_step(tx, model_fn, CE, x, y)
    finals = []
    for lr in learning_rates:
        state = tx.init(params)
        state.hyperparams["learning_rate"] = jnp.asarray(lr, state.hyperparams["learning_rate"].dtype)
        finals.append(float(f(train(step, params, state, steps)[0])))
    return min(finals)


@pytest.mark.parametrize("step_rule", hvpopt.KFAC_STEP_RULES)
def test_where_kfac_is_exact_its_step_is_the_damped_newton_step(step_rule):
    model_fn, params, x, y = linear_regression()
    damping = 0.1
    tx = hvpopt.kfac(model_fn, SE, example_batch=(x, y), damping=damping, step_rule=step_rule, momentum=0.0,
                     kl_clip=1e-4, adapt_damping_every=None, fisher="closed_form")  # fmt: skip
    f = lambda p: SE(model_fn(p, x), y)
    flat, unravel = ravel_pytree(params)
    hessian = np.asarray(jax.hessian(lambda v: f(unravel(v)))(flat))
    gradient = np.asarray(ravel_pytree(jax.grad(f)(params))[0])
    newton = -np.linalg.solve(hessian + damping * np.eye(len(flat)), gradient)
    updates, state = jax.jit(tx.update)(jax.grad(f)(params), tx.init(params), params, curvature_batch=(x, y))
    step = np.asarray(ravel_pytree(updates)[0])
    if step_rule == "quadratic":
        # The damped model's optimum along the Newton direction is the Newton step itself: alpha = 1.
        np.testing.assert_allclose(step, newton, rtol=1e-9)
        assert abs(float(state.step_size) - 1.0) < 1e-9
    else:
        nu = min(1.0, np.sqrt(1e-4 / -(newton @ gradient)))  # the KL clip at learning rate 1
        assert nu < 1
        np.testing.assert_allclose(step, nu * newton, rtol=1e-9)
        np.testing.assert_allclose(float(state.kl_scale), nu, rtol=1e-9)


@pytest.mark.parametrize("momentum", [0.9, 0.05, 0.0])
def test_the_quadratic_rules_second_step_is_its_models_optimum_with_mu_in_0_momentum(momentum):
    model_fn, params, x, y = classification_mlp()  # K-FAC is not exact here, so mu is not 0
    damping, few = 0.1, (x[:16], y[:16])
    tx = hvpopt.kfac(model_fn, CE, example_batch=few, damping=damping, momentum=momentum, adapt_damping_every=None,
                     fisher="closed_form")  # fmt: skip
    f = lambda p: CE(model_fn(p, x), y)
    step = jax.jit(lambda p, s: tx.update(jax.grad(f)(p), s, p, curvature_batch=few))
    first, state = step(params, tx.init(params))
    at = optax.apply_updates(params, first)
    second, state = step(at, state)
    flat, unravel = ravel_pytree(at)
    outputs, linear = jax.linearize(lambda p: model_fn(p, few[0]), at)
    gauss_newton = jax.hessian(lambda v: CE(outputs + linear(jax.tree.map(jnp.subtract, unravel(v), at)), few[1]))
    curvature = np.array(gauss_newton(flat)) + damping * np.eye(len(flat))  # the damped model's, at the second step
    grads = jax.grad(f)(at)
    d = -np.asarray(ravel_pytree(hvpopt.kronecker_inverse(state.factors, damping=damping)(grads))[0])
    basis = np.stack([d, np.asarray(ravel_pytree(first)[0])], 1)  # (d, u_prev)
    model, slope = basis.T @ curvature @ basis, basis.T @ np.asarray(ravel_pytree(grads)[0])  # in (alpha, mu)
    free_mu = -np.linalg.solve(model, slope)[1]
    mu = np.clip(free_mu, 0.0, momentum)
    alpha = -(slope[0] + model[0, 1] * mu) / model[0, 0]
    np.testing.assert_allclose(ravel_pytree(second)[0], basis @ [alpha, mu], rtol=1e-7)
    np.testing.assert_allclose(float(state.momentum), mu, atol=1e-9)
    assert 0.05 < free_mu < 0.9  # so the cap binds at 0.05 and 0, not at 0.9


def classification_mlp():
    problem = make_mlp()
    x = jax.random.normal(jax.random.key(7), (64, 4), jnp.float64)
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(8), (4, 3), jnp.float64), -1)
    return problem.model_fn, problem.params, x, y


def tiny_lm():
    config = TransformerConfig(vocab_size=5, d_model=8, num_layers=1, num_heads=2, context_length=6, mlp_ratio=2)
    model_fn, params = transformer_lm(config, seed=2)
    start = jax.random.randint(jax.random.key(3), (32, 1), 0, 5)
    stride = jax.random.randint(jax.random.key(4), (32, 1), 1, 3)
    tokens = (start + jnp.arange(7)[None] * stride) % 5  # progressions mod 5: learnable from the first two tokens
    return model_fn, to_float64(params), tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("make", [classification_mlp, tiny_lm], ids=["mlp", "transformer"])
def test_the_loss_falls_faster_per_step_than_adamws_best_and_a_nan_step_is_skipped(make):
    model_fn, params, x, y = make()
    steps = 20
    adamw = best_adamw(model_fn, params, x, y, steps)
    tx = hvpopt.kfac(model_fn, CE, example_batch=(x, y), damping=0.1)
    f, step = make_step(tx, model_fn, CE, x, y)
    trained, state = train(step, params, tx.init(params), steps)
    final = float(f(trained))
    assert final < 0.7 * adamw, (final, adamw)
    assert int(state.num_inversions) == 2 and int(state.num_curvature_updates) == steps  # every 10, every step
    assert int(state.skipped_steps) == 0 and float(state.damping) > 0
    # A non-finite loss: the parameters and the moving averages are left bit for bit, the step counted.
    after, skipped, _ = step(trained, state, jnp.nan)
    for a, b in zip(jax.tree.leaves((after, skipped.statistics, skipped.buffer)),
                    jax.tree.leaves((trained, state.statistics, state.buffer))):  # fmt: skip
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert int(skipped.skipped_steps) == 1 and int(skipped.count) == steps + 1


def test_without_l2_the_adapted_damping_falls_to_the_default_floor_and_stays():
    # The MLP's cross-entropy has no L2: the quadratic step predicts well, rho > 3/4, and lambda shrinks
    # by 19/20 at each adaptation until min_damping (1e-4 by default) holds it.
    model_fn, params, x, y = classification_mlp()
    tx = hvpopt.kfac(model_fn, CE, example_batch=(x, y), damping=3e-4, adapt_damping_every=1)
    _, step = make_step(tx, model_fn, CE, x, y)
    dampings = []
    state = tx.init(params)
    for _ in range(30):
        params, state, _ = step(params, state, 0.0)
        dampings.append(float(state.damping))
    assert dampings[0] == pytest.approx(3e-4 * 0.95)
    assert min(dampings) == pytest.approx(1e-4) and dampings[-1] == pytest.approx(1e-4)


def test_bad_arguments_are_named():
    model_fn, params, x, y = linear_regression()
    make = lambda **kw: hvpopt.kfac(model_fn, SE, example_batch=(x, y), **kw)
    for kw, name in [
        ({"damping": -1.0}, "damping"),
        ({"damping": float("nan")}, "damping"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"curvature_every": 0}, "curvature_every"),
        ({"inverse_every": 0}, "inverse_every"),
        ({"adapt_damping_every": 0}, "adapt_damping_every"),
        ({"momentum": 1.0}, "momentum"),
        ({"step_rule": "newton"}, "step_rule"),
    ]:
        with pytest.raises(ValueError, match=name):
            make(**kw)
    with pytest.raises(TypeError, match="example_batch"):
        hvpopt.kfac(model_fn, SE, example_batch=x)
    tx = make()
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="curvature_batch"):
        tx.update(grads, state, params, value_fn=lambda p: 0.0)
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(grads, state, params, curvature_batch=(x, y))
    with pytest.raises(ValueError, match="no dense layer"):
        hvpopt.kfac(lambda p, x: x * p, SE, example_batch=(x, x)).init(jnp.ones(3))
