"""K-FAC and EK-FAC: layer detection on every kind of model, factors against the dense Gauss-Newton matrix."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_ggn, make_mlp, make_transformer, random_like, to_float64
from flax import nnx
from jax.flatten_util import ravel_pytree

import hvpopt
from hvpopt.testbed.models import TransformerConfig, transformer_classifier, transformer_lm

SE, CE = hvpopt.losses.squared_error, hvpopt.losses.softmax_cross_entropy


def treatments(model_fn, params, inputs) -> dict[str, str]:
    return {row.path: row.treatment for row in hvpopt.layer_coverage(model_fn, params, inputs)}


def dense(operator, params) -> np.ndarray:
    """The dense matrix of a pytree operator."""
    x, unravel = ravel_pytree(params)
    return np.asarray(hvpopt.dense_matrix(jax.jit(lambda v: ravel_pytree(operator(unravel(v)))[0]), x))


@jax.jit
def _kronecker_matrix(factors, params):
    x, unravel = ravel_pytree(params)
    return jax.vmap(lambda e: ravel_pytree(hvpopt.kronecker_operator(factors)(unravel(e)))[0])(jnp.eye(x.size))


def kronecker_matrix(factors, params) -> np.ndarray:
    """The dense matrix of the fitted curvature (compiled once per structure, not per fit)."""
    return np.asarray(_kronecker_matrix(factors, params))


def layer_indices(factors, params) -> list[np.ndarray]:
    """Per layer and per layer of a stack, the flat parameter indices of its ``[in (+1), out]`` matrix, row-major."""
    offsets = np.cumsum([0] + [np.size(x) for x in jax.tree.leaves(params)])
    sizes = [np.size(x) for x in jax.tree.leaves(params)]
    out = []
    for layer in factors.layers:
        whole = lambda index, leaf, shape: np.arange(sizes[leaf]).reshape(shape) if index is None else index.indices
        weight = offsets[layer.weight] + whole(
            layer.weight_index, layer.weight, (*layer.stack, layer.in_features, layer.out_features)
        ).reshape(-1, layer.in_features, layer.out_features)
        if layer.bias is not None:
            bias = offsets[layer.bias] + whole(layer.bias_index, layer.bias, (*layer.stack, layer.out_features))
            weight = np.concatenate([weight, bias.reshape(-1, 1, layer.out_features)], axis=1)
        out.extend(rows.reshape(-1) for rows in weight)
    return out


def per_layer(factors, name: str) -> list[np.ndarray]:
    """A field of the factors as one array per layer and per layer of a stack (``input_bases``: identity if None)."""
    out = []
    for layer, array, values in zip(factors.layers, getattr(factors, name), factors.eigenvalues):
        if array is None:  # an embedding's input basis
            array = np.broadcast_to(np.eye(values.shape[-2]), (*layer.stack, *values.shape[-2:][:1] * 2))
        out.extend(np.asarray(array).reshape(-1, *np.shape(array)[len(layer.stack) :]))
    return out


def single_layer_regression():
    x = jax.random.normal(jax.random.key(0), (12, 3), jnp.float64) * jnp.array([10.0, 1.0, 0.1])
    y = jax.random.normal(jax.random.key(1), (12, 1), jnp.float64)
    params = {"w": jax.random.normal(jax.random.key(2), (3, 1), jnp.float64), "b": jnp.zeros(1, jnp.float64)}
    return (lambda p, x: x @ p["w"] + p["b"]), params, (x, y)


@pytest.fixture(scope="module")
def mlp():
    """One MLP problem for the module: its model_fn is the jit key, so fits at the same options compile once."""
    return make_mlp()


@pytest.fixture(scope="module")
def mlp_closed_form(mlp):
    """K-FAC and EK-FAC with the closed-form Fisher on the MLP."""
    data = (mlp.inputs, mlp.targets)
    fit = lambda kind: hvpopt.fit_kronecker_factors(mlp.model_fn, CE, mlp.params, data, kind=kind, fisher="closed_form")
    return {kind: fit(kind) for kind in ("kfac", "ekfac")}


def tiny_classifier():
    config = TransformerConfig(vocab_size=6, d_model=4, num_layers=1, num_heads=2, context_length=5, mlp_ratio=1)
    model_fn, params = transformer_classifier(config, 3, pad_id=0, seed=3)
    tokens = jax.random.randint(jax.random.key(4), (10, 5), 0, 6)
    return model_fn, to_float64(params), tokens, jax.random.randint(jax.random.key(5), (10,), 0, 3)


# ---------------------------------------------------------------- finding the layers


def test_the_built_in_transformer_has_every_projection_mlp_matrix_and_the_head_as_layers():
    problem = make_transformer()
    found = treatments(problem.model_fn, problem.params, problem.inputs)
    kfac = {path for path, treatment in found.items() if treatment.startswith("kfac weight")}
    for part in ("['qkv']['kernel']", "['attention']['out']['kernel']", "['up']['kernel']", "['down']['kernel']"):
        assert any(part in path for path in kfac), (part, found)
    assert any("['head']['kernel']" in path for path in kfac)
    diagonal = {path for path, treatment in found.items() if treatment == "diagonal"}
    assert any("token_embedding" in path for path in diagonal)  # a lookup only: not a dense layer
    assert all("norm" in path or "embedding" in path for path in diagonal), diagonal
    assert all(found[path.replace("kernel", "bias")] == "kfac bias" for path in kfac)


def test_tied_embeddings_used_as_the_head_are_a_dense_layer():
    config = TransformerConfig(
        vocab_size=5, d_model=4, num_layers=1, num_heads=2, context_length=4, tie_embeddings=True
    )
    model_fn, params = transformer_lm(config, seed=0)
    found = treatments(model_fn, params, jnp.zeros((2, 4), jnp.int32))
    (tied,) = [path for path in found if "token_embedding" in path]
    assert found[tied] == "kfac weight (tied: also an embedding lookup)"
    (layer,) = [x for x in hvpopt.find_dense_layers(model_fn, params, jnp.zeros((2, 4), jnp.int32)) if x.tied]
    assert (layer.in_features, layer.out_features) == (4, 5) and layer.weight_index is not None  # E^T: a transpose


def test_the_mlp_and_the_classifier_are_dense_layers_but_their_norms():
    problem = make_mlp()
    assert set(treatments(problem.model_fn, problem.params, problem.inputs).values()) == {"kfac weight", "kfac bias"}
    model_fn, params, tokens, _ = tiny_classifier()
    found = treatments(model_fn, params, tokens)
    assert found["['head']['kernel'].value"] == "kfac weight" and found["['head']['bias'].value"] == "kfac bias"


def test_flax_nnx_linear_and_einsum_and_plain_jax_einsum_attention():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.project = nnx.Einsum("btd,dhk->bthk", (4, 2, 3), (2, 3), rngs=rngs)
            self.out = nnx.Linear(6, 5, rngs=rngs)

        def __call__(self, x):
            y = self.project(x)
            return self.out(y.reshape(*y.shape[:2], 6))

    graph, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
    found = treatments(lambda p, x: nnx.merge(graph, p)(x), params, jnp.zeros((2, 3, 4)))
    assert found == {
        "['out']['bias'].value": "kfac bias",
        "['out']['kernel'].value": "kfac weight",
        "['project']['bias'].value": "kfac bias",
        "['project']['kernel'].value": "kfac weight",
    }

    def attention(p, x):  # einsum projections; q k^T and the weighted values are products of activations
        q, k, v = (jnp.einsum("btd,dhe->bthe", x, p[name]) for name in ("wq", "wk", "wv"))
        weights = jax.nn.softmax(jnp.einsum("bqhe,bkhe->bhqk", q, k), axis=-1)
        heads = jnp.einsum("bhqk,bkhe->bqhe", weights, v)
        return jnp.einsum("bqhe,hed->bqd", heads, p["wo"]) * p["gain"]

    keys = jax.random.split(jax.random.key(0), 4)
    params = {name: jax.random.normal(k, (3, 2, 2)) for name, k in zip(("wq", "wk", "wv"), keys)}
    params |= {"wo": jax.random.normal(keys[3], (2, 2, 3)), "gain": jnp.ones(3)}
    found = treatments(attention, params, jnp.zeros((2, 4, 3)))
    assert found == {**{f"['{n}']": "kfac weight" for n in ("wq", "wk", "wv", "wo")}, "['gain']": "diagonal"}


def test_plain_jax_dict_params_and_leaves_that_do_not_factor_with_the_reason():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "twice": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    params |= {"heads": jnp.ones((2, 2, 2)), "pair": jnp.ones((2, 2)), "state": jnp.ones(2), "unused": jnp.ones(1)}

    def model_fn(p, x):
        h = ((x @ p["w"] + p["b"]) @ p["twice"]) @ p["twice"] * p["scale"]
        h = jnp.einsum("bh,hbk->bk", h[:2], p["heads"]).sum() + h  # a batch axis: per-example weights
        h = h @ (p["pair"] @ p["pair"].T)  # a product of two parameters
        carried, _ = jax.lax.scan(lambda c, _: (c * 2, None), p["state"], None, length=2)  # a loop's state
        return h + carried

    rows = {row.path: row for row in hvpopt.layer_coverage(model_fn, params, jnp.zeros((4, 3)))}
    assert {path: row.treatment for path, row in rows.items()} == {
        "['b']": "kfac bias", "['w']": "kfac weight",
        **{f"['{name}']": "diagonal" for name in ("heads", "pair", "scale", "state", "twice", "unused")},
    }  # fmt: skip
    assert rows["['twice']"].detail.startswith("used in 2 products")
    assert rows["['scale']"].detail == "multiplied elementwise (a scale or a gate)"
    assert rows["['heads']"].detail == "a batch axis in its product (per-head weights)"
    assert rows["['pair']"].detail == "a product of two parameters (does not factor)"
    assert rows["['state']"].detail == "carried through a scan (a loop's state)"
    assert rows["['unused']"].detail == "not used by the model"


@jax.custom_vjp
def custom_linear(x, w):
    return x @ w


custom_linear.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


def structured_model(p, x):
    """Layers inside a nested jit, a remat in a scan over stacked weights, a custom_vjp, static slices, a vmapped
    linear with its bias (Equinox's ``Linear``), and an embedding lookup."""
    h = jax.jit(lambda h: jnp.tanh(h @ p["first"]))(x[:, :3]) + p["table"][x[:, 3].astype(jnp.int32)]
    body = lambda h, w: (jax.checkpoint(lambda h: jnp.tanh(h @ w["w"] + w["b"]))(h), None)
    h, _ = jax.lax.scan(body, h, p["stack"])
    h = jnp.tanh(custom_linear(h, p["custom"]))
    for layer in range(2):
        h = jnp.tanh(h @ p["sliced"][layer])
    return jax.vmap(lambda v: p["head"]["w"] @ v + p["head"]["b"])(h)


def structured_params():
    keys = iter(jax.random.split(jax.random.key(7), 8))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float64) / 2
    return {"first": normal(3, 3), "table": normal(4, 3), "stack": {"w": normal(2, 3, 3), "b": normal(2, 3)},
            "custom": normal(3, 3), "sliced": normal(2, 3, 3), "head": {"w": normal(2, 3), "b": normal(2)}}  # fmt: skip


@pytest.mark.filterwarnings("ignore:hvpopt. forward-mode autodiff is not defined")  # the dense GGN, through custom_vjp
def test_kfac_through_jit_remat_scan_custom_vjp_slices_vmap_and_embeddings_is_the_exact_ggn_on_one_example():
    params = structured_params()
    x = jnp.array([[0.3, -1.2, 0.8, 2.0]])  # one example at one position: K-FAC's blocks are the GGN's exactly
    y = jnp.array([1])
    rows = {row.path: row for row in hvpopt.layer_coverage(structured_model, params, x, embeddings=True)}
    assert all(row.treatment != "diagonal" for row in rows.values()), rows
    assert rows["['stack']['w']"].detail == "a stack of 2 layers (scanned over)"
    assert rows["['sliced']"].detail == "2 layers, one per slice" and rows["['table']"].treatment == "kfac embedding"
    factors = hvpopt.fit_kronecker_factors(structured_model, CE, params, (x, y), kind="kfac", fisher="closed_form",
                                           embeddings=True)  # fmt: skip
    assert [layer.stack for layer in factors.layers].count((2,)) == 1 and len(factors.layers) == 7
    ggn = dense(lambda v: hvpopt.ggn_vp(structured_model, CE, params, v, x, y), params)
    fitted = kronecker_matrix(factors, params)
    for rows_ in layer_indices(factors, params):  # 8 blocks: the stack holds two
        block = np.ix_(rows_, rows_)
        np.testing.assert_allclose(fitted[block], ggn[block], atol=1e-12)
    covered = np.concatenate(layer_indices(factors, params))
    assert np.unique(covered).size == covered.size == ggn.shape[0]  # every parameter, once


def test_a_model_without_dense_layers_is_refused_and_poor_coverage_warns():
    x, y = jnp.ones((4, 3)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match="model_fn has no dense layer"):
        hvpopt.fit_kronecker_factors(lambda p, x: x * p, SE, jnp.ones(3), (x, y))
    params = {"w": jnp.ones((3, 3)), "table": jnp.ones((2, 3, 3))}
    with pytest.warns(UserWarning, match=r"less than half.*\['table'\]"):
        hvpopt.fit_kronecker_factors(lambda p, x: x @ p["w"] * p["table"].sum(0), SE, params, (x, y), kind="kfac")


# ---------------------------------------------------------------- the factors against the dense GGN


def test_kfac_is_exact_for_one_dense_layer_with_squared_error_and_one_output():
    model_fn, params, (x, y) = single_layer_regression()
    factors = hvpopt.fit_kronecker_factors(model_fn, SE, params, (x, y), kind="kfac", fisher="closed_form")
    ggn = dense(lambda v: hvpopt.ggn_vp(model_fn, SE, params, v, x, y), params)
    np.testing.assert_allclose(kronecker_matrix(factors, params), ggn, atol=1e-10)


@pytest.mark.parametrize("model", ["mlp", "transformer classifier"])
def test_ekfac_is_at_least_as_close_to_the_ggn_as_kfac_and_its_eigenvalues_are_the_blocks_diagonal(
    model, mlp, mlp_closed_form
):
    if model == "mlp":
        params, ggn, fitted = mlp.params, dense_ggn(mlp), mlp_closed_form
    else:
        model_fn, params, x, y = tiny_classifier()
        ggn = dense(lambda v: hvpopt.ggn_vp(model_fn, CE, params, v, x, y), params)
        fit = lambda kind: hvpopt.fit_kronecker_factors(model_fn, CE, params, (x, y), kind=kind, fisher="closed_form")
        fitted = {kind: fit(kind) for kind in ("kfac", "ekfac")}
    error = {kind: np.linalg.norm(kronecker_matrix(f, params) - ggn) for kind, f in fitted.items()}
    assert error["ekfac"] <= error["kfac"] * (1 + 1e-12), error
    ekfac = fitted["ekfac"]
    for rows, q_a, q_g, values in zip(layer_indices(ekfac, params), *(per_layer(ekfac, name) for name in
                                      ("input_bases", "output_bases", "eigenvalues"))):  # fmt: skip
        basis = np.kron(np.asarray(q_a), np.asarray(q_g))  # vec(Q_A^T V Q_G) = basis^T vec(V), row-major
        block = ggn[np.ix_(rows, rows)]
        np.testing.assert_allclose(np.diag(basis.T @ block @ basis), np.ravel(values), atol=1e-12)


def test_the_ekfac_inverse_solves_the_dense_ekfac_matrix(mlp, mlp_closed_form):
    factors = mlp_closed_form["ekfac"]
    matrix = kronecker_matrix(factors, mlp.params)
    b = random_like(jax.random.key(4), mlp.params)
    solved = hvpopt.kronecker_inverse(factors, damping=0.05)(b)
    expected = np.linalg.solve(matrix + 0.05 * np.eye(len(matrix)), ravel_pytree(b)[0])
    np.testing.assert_allclose(ravel_pytree(solved)[0], expected, rtol=1e-9, atol=1e-12)


def test_sampled_factors_converge_to_the_closed_form(mlp, mlp_closed_form):
    copies = jax.tree.map(lambda a: jnp.concatenate([a] * 500), (mlp.inputs, mlp.targets))  # error ~ 1/sqrt(500)
    sampled = hvpopt.fit_kronecker_factors(mlp.model_fn, CE, mlp.params, copies, kind="kfac", chunk_size=500)
    truth = kronecker_matrix(mlp_closed_form["kfac"], mlp.params)
    error = lambda factors: np.linalg.norm(kronecker_matrix(factors, mlp.params) - truth) / np.linalg.norm(truth)
    assert error(sampled) < 0.1
    data = (mlp.inputs, mlp.targets)  # as many labels drawn per example instead of copies of it
    fit = lambda samples: hvpopt.fit_kronecker_factors(mlp.model_fn, CE, mlp.params, data, kind="kfac",
                                                       mc_samples=samples)  # fmt: skip
    assert error(fit(500)) < 0.1 and error(fit(500)) < error(fit(1)) / 4
    with pytest.raises(ValueError, match="mc_samples draws labels: it is for fisher='sampled', not 'empirical'"):
        hvpopt.fit_kronecker_factors(mlp.model_fn, CE, mlp.params, data, fisher="empirical", mc_samples=2)


def test_chunked_equals_unchunked_and_padding_changes_nothing():
    config = TransformerConfig(vocab_size=5, d_model=4, num_layers=1, num_heads=2, context_length=4, mlp_ratio=2)
    model_fn, params = transformer_lm(config, seed=2)
    params = to_float64(params)
    tokens = jax.random.randint(jax.random.key(3), (6, 5), 0, 5)
    mask = jnp.ones((6, 4)).at[:3, 2:].set(0)  # three sequences end after two tokens
    data = (tokens[:, :-1], (tokens[:, 1:], mask))
    loss = hvpopt.losses.masked_softmax_cross_entropy
    fit = lambda data, chunk_size: hvpopt.fit_kronecker_factors(
        model_fn, loss, params, data, kind="kfac", chunk_size=chunk_size
    )
    operator = lambda factors: kronecker_matrix(factors, params)
    whole = operator(fit(data, 6))
    # In chunks of 4 (a full chunk and a remainder), and other tokens where the mask is 0: causal, so nothing sees them.
    repadded = (data[0].at[:3, 2:].set(4), data[1])
    np.testing.assert_allclose(operator(fit(repadded, 4)), whole, atol=1e-12)


# ---------------------------------------------------------------- the operators in the solvers


def test_the_inverse_preconditions_cg_and_the_operator_runs_in_eigsh():
    model_fn, params, data = single_layer_regression()  # K-FAC is exact here: CG needs one iteration
    factors = hvpopt.fit_kronecker_factors(model_fn, SE, params, data, kind="kfac", fisher="closed_form")
    ggn = lambda v: hvpopt.ggn_vp(model_fn, SE, params, v, *data)
    b = random_like(jax.random.key(5), params)
    solve = lambda precond: jax.jit(lambda: hvpopt.cg(ggn, b, damping=1e-4, rtol=1e-10, maxiter=50, precond=precond))()
    plain, preconditioned = solve(None), solve(hvpopt.kronecker_inverse(factors, damping=1e-4))
    assert bool(plain.converged) and bool(preconditioned.converged)
    assert int(preconditioned.iterations) == 1 < int(plain.iterations), (preconditioned.iterations, plain.iterations)
    np.testing.assert_allclose(flat_of(preconditioned.x), flat_of(plain.x), rtol=1e-8)
    top = hvpopt.eigsh(hvpopt.kronecker_operator(factors), params, 2, key=jax.random.key(6))
    expected = np.linalg.eigvalsh(kronecker_matrix(factors, params))[-2:]
    np.testing.assert_allclose(np.sort(top.eigenvalues), expected, rtol=1e-8)


def flat_of(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_argument(mlp, mlp_closed_form):
    problem, data = mlp, (mlp.inputs, mlp.targets)
    fit = lambda **options: hvpopt.fit_kronecker_factors(problem.model_fn, CE, problem.params, data, **options)
    with pytest.raises(ValueError, match="kind must be one of"):
        fit(kind="shampoo")
    with pytest.raises(ValueError, match="fisher must be one of"):
        fit(fisher="true")
    with pytest.raises(TypeError, match="loss must be one of hvpopt.losses"):
        hvpopt.fit_kronecker_factors(problem.model_fn, lambda o, t: jnp.mean(o), problem.params, data)
    bad = jax.tree.map(lambda a: a * jnp.nan, problem.params)
    with pytest.raises(ValueError, match="not finite"):
        hvpopt.fit_kronecker_factors(problem.model_fn, CE, bad, data, kind="kfac", fisher="closed_form")
    with pytest.raises(ValueError, match="damping must be > 0"):
        hvpopt.kronecker_inverse(mlp_closed_form["kfac"], damping=0.0)
    lm = make_transformer()
    with pytest.raises(ValueError, match="fisher='closed_form'.*more than one position"):
        hvpopt.fit_kronecker_factors(lm.model_fn, CE, lm.params, (lm.inputs, lm.targets), fisher="closed_form")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(kind="kfac", fisher="closed_form")  # full coverage: no warning (and compiled already)


def test_natural_gradient_and_hessian_free_take_kfac_as_their_preconditioner():
    model_fn, params, (x, y) = single_layer_regression()  # K-FAC is the Fisher here: CG needs one iteration
    value_fn = lambda p: SE(model_fn(p, x), y)
    value, grad = jax.value_and_grad(value_fn)(params)
    precond = hvpopt.kronecker_preconditioner(model_fn, SE, fisher="closed_form")

    def step(tx):
        run = lambda p, s: tx.update(grad, s, p, value=value, grad=grad, value_fn=value_fn, curvature_batch=(x, y))
        return jax.jit(run)(params, tx.init(params))

    plain, plain_state = step(hvpopt.natural_gradient(model_fn, SE, damping=1e-4, rtol=1e-10, maxiter=50))
    fast, fast_state = step(
        hvpopt.natural_gradient(model_fn, SE, damping=1e-4, rtol=1e-10, maxiter=50, precond=precond)
    )
    assert int(fast_state.cg_iterations) == 1 < int(plain_state.cg_iterations)
    np.testing.assert_allclose(flat_of(fast), flat_of(plain), rtol=1e-7)
    updates, state = step(hvpopt.hessian_free(model_fn, SE, precond=precond))
    assert value_fn(jax.tree.map(jnp.add, params, updates)) < value and int(state.cg_iterations) >= 1
    with pytest.raises(TypeError, match="precond must be a callable"):
        hvpopt.hessian_free(model_fn, SE, precond="kfac")
