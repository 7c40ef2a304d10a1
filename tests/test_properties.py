"""Property tests: random pytree structures and shapes against dense Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import flat, rel_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import hvpopt

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
structures = st.recursive(
    shapes,
    lambda children: (
        st.lists(children, min_size=1, max_size=3)
        | st.dictionaries(st.sampled_from("abc"), children, min_size=1, max_size=3)
    ),
    max_leaves=4,
)
SETTINGS = settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def is_shape(node):
    return isinstance(node, tuple) and all(isinstance(d, int) for d in node)


def build(structure, rng):
    """Arrays of the drawn shapes in the drawn nesting."""
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s)), structure, is_leaf=is_shape)


def coupled_loss(params):
    """Touches every leaf and couples them, so the Hessian has off-diagonal blocks."""
    leaves = jax.tree.leaves(params)
    local = sum(jnp.sum(jnp.sin(x) * x**2) for x in leaves)
    total = sum(jnp.sum(x) for x in leaves)
    return local + 0.3 * total**2 + 0.1 * jnp.tanh(total) ** 3


@SETTINGS
@given(structure=structures, seed=st.integers(0, 2**16))
def test_hvp_every_mode_on_random_pytrees(structure, seed):
    rng = np.random.default_rng(seed)
    params, v = build(structure, rng), build(structure, rng)
    x, unravel = ravel_pytree(params)
    hessian = np.asarray(jax.hessian(lambda z: coupled_loss(unravel(z)))(x))
    for mode in hvpopt.HVP_MODES:
        hv = hvpopt.hvp(coupled_loss, params, v, mode=mode)
        assert jax.tree.structure(hv) == jax.tree.structure(params)
        assert rel_error(flat(hv), hessian @ flat(v)) < 1e-10, mode


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_ggn_on_random_mlps(sizes, batch, seed):
    model_fn, params = hvpopt.testbed.models.mlp(sizes, seed=seed)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    rng = np.random.default_rng(seed)
    inputs = jnp.asarray(rng.normal(size=(batch, sizes[0])))
    targets = jnp.asarray(rng.normal(size=(batch, sizes[-1])))
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    x, unravel = ravel_pytree(params)
    jac = jax.jacfwd(lambda z: model_fn(unravel(z), inputs).ravel())(x)
    expected = np.asarray(jac.T @ jac) / batch  # squared error: H_L = I / batch
    loss = hvpopt.losses.squared_error
    gv = hvpopt.ggn_vp(model_fn, loss, params, v, inputs, targets)
    assert rel_error(flat(gv), expected @ flat(v)) < 1e-10
