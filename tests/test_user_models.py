"""Transformers written the way users write them (tests/user_models.py): layers found, factors right, training runs.

For every style (Flax NNX with dropout and ``rngs``, NNX under ``nnx.scan``,
Linen with ``nn.scan`` of ``nn.remat``, Equinox, plain JAX with a fused QKV
einsum, a tied head and ``lax.scan``): at least 90% of the parameters are
Kronecker-factored; the factors of a scanned stack equal those of the same model
unrolled; five ``hvpopt.kfac`` steps run in the framework's own training loop.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from user_models import LAYERS, MAKERS, NAMES, NNXGPT, language_data

import hvpopt

CE = hvpopt.losses.softmax_cross_entropy
SCANNED = [name for name in NAMES if name in ("nnx_scan", "linen", "pure")]


@pytest.fixture(scope="module", params=NAMES)
def user_model(request):
    return MAKERS[request.param](dtype=jnp.float64)


def coverage(model_fn, params, inputs, **options) -> float:
    rows = hvpopt.layer_coverage(model_fn, params, inputs, **options)
    size = lambda keep: sum(int(np.prod(row.shape)) for row in rows if keep(row))
    return size(lambda row: row.treatment != "diagonal") / size(lambda row: True)


def test_at_least_90_percent_is_kronecker_factored_and_each_diagonal_leaf_says_why(user_model):
    inputs, _ = language_data(2)
    assert coverage(user_model.model_fn, user_model.params, inputs) >= 0.9
    assert coverage(user_model.model_fn, user_model.params, inputs, embeddings=True) >= 0.94
    rows = hvpopt.layer_coverage(user_model.model_fn, user_model.params, inputs)
    assert all(row.detail for row in rows if row.treatment == "diagonal"), rows
    if user_model.unrolled is not None:  # a scanned stack is a stack of layers, one per iteration
        stacked = [layer for layer in hvpopt.find_dense_layers(user_model.model_fn, user_model.params, inputs)]
        assert sum(layer.stack == (LAYERS,) for layer in stacked) >= 4, stacked


@pytest.mark.parametrize("name", SCANNED)
def test_the_factors_of_a_scanned_stack_equal_those_of_the_model_unrolled(name):
    model = MAKERS[name](dtype=jnp.float64)
    params = model.params
    data = language_data(12)  # G of the 48 fused QKV outputs full rank: EK-FAC then has one eigenbasis
    stats = {
        which: hvpopt.kronecker_statistics(fn, CE, params, data, chunk_size=6)
        for which, fn in (("scanned", model.model_fn), ("unrolled", model.unrolled))
    }
    scanned, unrolled = stats["scanned"], stats["unrolled"]
    by_name = {layer.name: k for k, layer in enumerate(unrolled.layers)}
    for k, layer in enumerate(scanned.layers):
        for moments in ("input_moments", "output_moments"):
            mine = getattr(scanned, moments)[k]
            if not layer.stack:
                np.testing.assert_allclose(mine, getattr(unrolled, moments)[by_name[layer.name]], atol=1e-10)
                continue
            for level in range(LAYERS):  # the unrolled layer of slice `level` of the stacked weight
                twin = by_name[f"{layer.name}[{level}]"] if f"{layer.name}[{level}]" in by_name else None
                if twin is None:  # NNX's twin names its layers by list index, not by slice
                    twin = _listed_twin(unrolled.layers, layer.name, level)
                np.testing.assert_allclose(mine[level], getattr(unrolled, moments)[twin], atol=1e-10, rtol=1e-9)
    if name != "pure":
        return  # the factors of the other two are checked; EK-FAC's inverse on one model (compiles are costly)
    # EK-FAC's inverse, through the scan and through the loop, on a random vector
    vector = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
    apply = lambda fn: hvpopt.kronecker_inverse(hvpopt.fit_kronecker_factors(fn, CE, params, data, chunk_size=6),
                                                damping=1e-3)(vector)  # fmt: skip
    np.testing.assert_allclose(ravel_pytree(apply(model.model_fn))[0], ravel_pytree(apply(model.unrolled))[0],
                               rtol=1e-8, atol=1e-10)  # fmt: skip


def _listed_twin(layers, stacked_name: str, level: int) -> int:
    """The unrolled NNX twin's layer for slice ``level`` of ``['blocks'][...]``: ``['blocks'][level][...]``."""
    wanted = stacked_name.replace("['blocks']", f"['blocks'][{level}]", 1)
    return next(k for k, layer in enumerate(layers) if layer.name == wanted)


# ---------------------------------------------------------------- training in each framework's own loop


def test_five_kfac_steps_in_flax_nnx_with_nnx_optimizer():
    model = NNXGPT(nnx.Rngs(0, dropout=1))
    model.train()  # the gradient with dropout, the curvature (from_nnx) without
    model_fn, _ = hvpopt.from_nnx(model)
    x, y = language_data(16)
    f = lambda p: CE(model_fn(p, x), y)
    # A fixed damping (adapt_damping_every=None) compiles a third faster; test_frameworks adapts it in nnx.Optimizer.
    # Its two nnx.Embed tables as Kronecker-factored layers too (embeddings=True).
    tx = hvpopt.kfac(model_fn, CE, example_batch=(x, y), damping=0.1, adapt_damping_every=None, embeddings=True)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: CE(m(x), y))(model)
        optimizer.update(model, grads, curvature_batch=(x, y))

    before = float(f(hvpopt.from_nnx(model)[1]))
    for _ in range(5):
        step(model, optimizer)
    assert float(f(hvpopt.from_nnx(model)[1])) < 0.9 * before
    assert int(optimizer.opt_state.skipped_steps[...]) == 0
    assert sum(layer.lookup for layer in optimizer.opt_state.statistics.layers) == 2


@pytest.mark.parametrize("name", ["linen", "equinox", "pure"])
def test_five_kfac_steps_in_the_frameworks_own_jitted_loop(name):
    model = MAKERS[name]()
    x, y = language_data(16)
    f = lambda p: CE(model.model_fn(p, x), y)
    tx = hvpopt.kfac(model.model_fn, CE, example_batch=(x, y), damping=0.1, adapt_damping_every=None)
    extra = {"curvature_batch": (x, y)}
    params, state = model.params, tx.init(model.params)
    # Equinox's module is its parameters: eqx.filter_jit and eqx.apply_updates, as its users write the loop.
    jit, apply = (eqx.filter_jit, eqx.apply_updates) if name == "equinox" else (jax.jit, optax.apply_updates)

    @jit
    def step(params, state):
        grads = jax.grad(f)(params)
        updates, state = tx.update(grads, state, params, **extra)
        return apply(params, updates), state

    before = float(f(params))
    for _ in range(5):
        params, state = step(params, state)
    assert float(f(params)) < 0.9 * before and int(state.skipped_steps) == 0
