"""Jacobians in either mode, and the choice between them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hvpopt
from hvpopt.jacobian_modes import jacobian_mode_prefers_forward


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
