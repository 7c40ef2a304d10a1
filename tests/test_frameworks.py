"""Framework entrances: NNX, Linen and Equinox models as (model_fn, params), and the optimizers in nnx.Optimizer."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import hvpopt

CE = hvpopt.losses.softmax_cross_entropy
X = jax.random.normal(jax.random.key(0), (24, 3))
Y = (X[:, 0] + X[:, 1] > 0).astype(jnp.int32)


class DropoutMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(3, 8, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(jnp.tanh(self.hidden(x))))


def test_from_nnx_holds_rng_state_fixed_runs_deterministically_and_leaves_the_module_alone():
    module = DropoutMLP(nnx.Rngs(0, dropout=1))
    module.train()
    model_fn, params = hvpopt.from_nnx(module)
    assert not any(isinstance(leaf, nnx.Variable) for leaf in jax.tree.leaves(params, is_leaf=lambda x: True))
    first, again, jitted = model_fn(params, X), model_fn(params, X), jax.jit(model_fn)(params, X)
    np.testing.assert_allclose(first, again)
    np.testing.assert_allclose(first, jitted, rtol=1e-6)
    module.eval()
    np.testing.assert_allclose(first, module(X), rtol=1e-6)  # evaluation mode: dropout off
    assert module.dropout.deterministic and isinstance(module.dropout.rngs.count, nnx.Variable)
    train_fn, _ = hvpopt.from_nnx(DropoutMLP(nnx.Rngs(0, dropout=1)), deterministic=False)
    dropped = train_fn(params, X)  # the module's own mode: one fixed mask, the same at every call
    np.testing.assert_allclose(dropped, train_fn(params, X))
    assert not np.allclose(dropped, first)
    with pytest.raises(TypeError, match="module must be a flax.nnx.Module"):
        hvpopt.from_nnx(lambda x: x)


def test_from_linen_and_from_equinox_give_the_frameworks_own_outputs():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic: bool = True):
            return nn.Dense(2)(nn.Dropout(0.5, deterministic=deterministic)(nn.tanh(nn.Dense(8)(x))))

    module = Model()
    variables = module.init(jax.random.key(0), X)
    model_fn, params = hvpopt.from_linen(module, variables)
    np.testing.assert_allclose(model_fn(params, X), module.apply(variables, X, deterministic=True))
    with pytest.raises(TypeError, match="variables must be what module.init returned"):
        hvpopt.from_linen(module, variables["params"])

    mlp = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(1))
    model_fn, params = hvpopt.from_equinox(mlp)
    np.testing.assert_allclose(model_fn(params, X), jax.vmap(mlp)(X), rtol=1e-6)
    rows = hvpopt.layer_coverage(model_fn, params, X)  # eqx.nn.Linear under vmap: its bias is a Kronecker bias
    assert {row.treatment for row in rows} == {"kfac weight", "kfac bias"}, rows


def optimizer(name: str, model_fn):
    """The transformation and the ``update`` keywords it needs."""
    f = lambda p: CE(model_fn(p, X), Y)
    batch = {"curvature_batch": (X, Y)}
    return {
        "kfac": (hvpopt.kfac(model_fn, CE, example_batch=(X, Y), damping=0.1), {"value_fn": f, **batch}),
        "newton_cg": (hvpopt.newton_cg(), {"value_fn": f}),
        "hessian_free": (hvpopt.hessian_free(model_fn, CE), {"value_fn": f, **batch}),
        "natural_gradient": (hvpopt.natural_gradient(model_fn, CE), {"value_fn": f, **batch}),
        "sophia_g": (
            optax.contrib.sophia(0.05, hessian_diagonal_fn=hvpopt.gauss_newton_bartlett(model_fn, CE)),
            {"obj_fn": f, **batch},
        ),  # fmt: skip
        "sophia_h": (optax.contrib.sophia(0.05, hessian_diagonal_fn=hvpopt.hutchinson_hessian()), {"obj_fn": f}),
    }[name]


OPTIMIZERS = ("kfac", "newton_cg", "hessian_free", "natural_gradient", "sophia_g", "sophia_h")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_inside_nnx_optimizer_eagerly_and_under_nnx_jit_equals_the_functional_loop(name):
    def nnx_run(compiled: bool, train: bool = False, steps: int = 3):
        module = DropoutMLP(nnx.Rngs(0, dropout=1))
        module.train() if train else module.eval()
        model_fn, _ = hvpopt.from_nnx(module)
        tx, extra = optimizer(name, model_fn)
        opt = nnx.Optimizer(module, tx, wrt=nnx.Param)

        def step(module, opt):
            value, grads = nnx.value_and_grad(lambda m: CE(m(X), Y))(module)
            grad = {"grad": nnx.state(grads, nnx.Param)} if name in ("newton_cg", "hessian_free") else {}
            opt.update(module, grads, **extra, **grad)

        step = nnx.jit(step) if compiled else step
        for _ in range(steps):
            step(module, opt)
        return hvpopt.from_nnx(module)[1], model_fn

    eager, model_fn = nnx_run(compiled=False, steps=1)  # eagerly op by op: slow, one step
    compiled, _ = nnx_run(compiled=True)

    module = DropoutMLP(nnx.Rngs(0, dropout=1))
    reference_fn, params = hvpopt.from_nnx(module)
    tx, extra = optimizer(name, reference_fn)
    f = lambda p: CE(reference_fn(p, X), Y)

    @jax.jit
    def step(params, state):
        grads = jax.grad(f)(params)
        grad = {"grad": grads} if name in ("newton_cg", "hessian_free") else {}
        updates, state = tx.update(grads, state, params, **extra, **grad)
        return optax.apply_updates(params, updates), state

    flat = lambda tree: np.asarray(ravel_pytree(tree)[0])
    state = tx.init(params)
    start = float(f(params))
    for count in range(3):
        params, state = step(params, state)
        if count == 0:
            np.testing.assert_allclose(flat(eager), flat(params), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(flat(compiled), flat(params), rtol=2e-4, atol=1e-6)
    assert float(f(params)) < start
    trained, _ = nnx_run(compiled=True, train=True, steps=2)  # dropout on, its RNG stream advancing
    assert np.all(np.isfinite(flat(trained))) and not np.allclose(flat(trained), flat(hvpopt.from_nnx(module)[1]))
