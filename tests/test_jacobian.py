"""Jacobians in either mode, and the choice between them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hvpopt
from hvpopt.jacobians import jacobian_mode_prefers_forward


def tall(x):  # R^2 -> R^6: forward mode is cheaper
    return jnp.concatenate([jnp.sin(x), x**2, jnp.exp(x)])


def wide(x):  # R^6 -> R^2: reverse mode is cheaper
    return jnp.stack([jnp.sum(jnp.sin(x)), jnp.prod(x)])


@pytest.mark.parametrize("f, n", [(tall, 2), (wide, 6)])
def test_every_mode_matches_jacfwd(f, n):
    x = jnp.linspace(0.1, 1.0, n)
    expected = jax.jacfwd(f)(x)
    for mode in ("auto", "fwd", "rev"):
        np.testing.assert_allclose(hvpopt.jacobian(f, x, mode=mode), expected, rtol=1e-12)


def test_auto_picks_the_smaller_side():
    assert jacobian_mode_prefers_forward(tall, jnp.ones(2))
    assert not jacobian_mode_prefers_forward(wide, jnp.ones(6))


def test_pytree_input_and_extra_args():
    f = lambda p, scale: scale * jnp.tanh(p["w"] @ p["b"])
    p = {"w": jnp.ones((3, 2)), "b": jnp.array([0.1, 0.2])}
    for mode in ("auto", "fwd", "rev"):
        jac = hvpopt.jacobian(f, p, 2.0, mode=mode)
        reference = jax.jacrev(lambda q: f(q, 2.0))(p)
        for key in p:
            np.testing.assert_allclose(jac[key], reference[key], rtol=1e-12)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="mode must be one of"):
        hvpopt.jacobian(tall, jnp.ones(2), mode="forward")
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        hvpopt.jacobian(tall, jnp.arange(2))


def test_spectral_norm_matches_svd_of_the_dense_jacobian():
    model_fn, params = hvpopt.testbed.models.mlp((6, 16, 4), seed=3)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(0), (6,), jnp.float64)
    f = lambda x, p: model_fn(p, x)
    estimate = hvpopt.jacobian_spectral_norm(f, x, params, key=jax.random.key(1), num_iters=200)
    singular_values = np.linalg.svd(jax.jacfwd(f)(x, params), compute_uv=False)
    np.testing.assert_allclose(estimate.value, singular_values[0], rtol=1e-10)
    assert estimate.relative_change < 1e-10
    jv = jax.jvp(lambda x_: f(x_, params), (x,), (estimate.input_vector,))[1]
    np.testing.assert_allclose(jnp.linalg.norm(estimate.input_vector), 1.0, rtol=1e-12)
    np.testing.assert_allclose(jv / estimate.value, estimate.output_vector, rtol=1e-10)


def test_spectral_norm_of_a_pytree_input_in_few_iterations_is_a_lower_bound():
    w = {"a": jnp.diag(jnp.array([5.0, 1.0])), "b": jnp.array([[0.0, 2.0]])}
    f = lambda x: {"y": w["a"] @ x["u"], "z": w["b"] @ x["u"] + x["s"]}
    x = {"u": jnp.ones(2), "s": jnp.ones(1)}
    estimate = hvpopt.jacobian_spectral_norm(f, x, key=jax.random.key(2), num_iters=2)
    assert estimate.value <= 5.0 + 1e-12
    exact = hvpopt.jacobian_spectral_norm(f, x, key=jax.random.key(2), num_iters=100)
    np.testing.assert_allclose(exact.value, 5.0, rtol=1e-10)
    with pytest.raises(ValueError, match="num_iters must be a positive integer"):
        hvpopt.jacobian_spectral_norm(f, x, key=jax.random.key(2), num_iters=0)


def test_spectral_norm_gradient_is_the_top_singular_pair_and_finite_at_zero():
    w = jax.random.normal(jax.random.key(4), (3, 4), jnp.float64)
    grad = jax.grad(
        lambda w: (
            hvpopt.jacobian_spectral_norm(lambda x: w @ x, jnp.ones(4), key=jax.random.key(5), num_iters=300).value
        )
    )(w)
    u, _, vt = np.linalg.svd(np.asarray(w))
    np.testing.assert_allclose(np.abs(grad), np.abs(np.outer(u[:, 0], vt[0])), atol=1e-8)
    at_zero = jax.grad(
        lambda w: hvpopt.jacobian_spectral_norm(lambda x: w @ x, jnp.ones(4), key=jax.random.key(5)).value
    )(jnp.zeros((3, 4)))
    assert np.all(np.isfinite(at_zero))
