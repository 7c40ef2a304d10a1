"""Influence scored per Kronecker-factored layer equals the flat scores, through every structure a model may have."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import user_models
from test_kronecker import structured_model, structured_params

import hvpopt
from hvpopt import influence

CE = hvpopt.losses.softmax_cross_entropy


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def structured_data(n: int):
    """Inputs of :func:`structured_model`: three features and a token id in 0..3; two classes."""
    x = jax.random.normal(jax.random.key(1), (n, 4), jnp.float64)
    return x.at[:, 3].set(jnp.arange(n) % 4), jnp.arange(n) % 2


def scores_both_ways(model, params, data, queries, **fit):
    inverse = influence.fit_inverse_curvature(None, params, data, method="ekfac", curvature="ggn", model=model,
                                              damping=0.1, chunk_size=8, **fit)  # fmt: skip
    directions, _ = influence.query_directions(None, params, queries, inverse, chunk_size=8)
    assert isinstance(directions, influence.FactoredDirections)
    factored = influence.pairwise_scores(None, params, data, queries, inverse=inverse, chunk_size=8)
    flat_inverse = inverse._replace(model=None)  # the same factors, applied to whole gradient rows
    flat = influence.pairwise_scores(influence.example_loss(*model), params, data, queries, inverse=flat_inverse,
                                     chunk_size=8)  # fmt: skip
    own = influence.self_scores(None, params, data, inverse=inverse, chunk_size=8)
    flat_own = influence.self_scores(influence.example_loss(*model), params, data, inverse=flat_inverse, chunk_size=8)
    np.testing.assert_allclose(own, flat_own, rtol=1e-10, atol=1e-14 * np.abs(flat_own).max())
    return inverse, directions, np.asarray(factored), np.asarray(flat)


@pytest.mark.parametrize("embeddings", [False, True])
def test_through_jit_remat_scan_custom_vjp_slices_vmap_and_embeddings(embeddings):
    data = structured_data(20)
    queries = jax.tree.map(lambda x: x[:3], data)
    _, directions, factored, flat = scores_both_ways((structured_model, CE), structured_params(), data, queries,
                                                     embeddings=embeddings)  # fmt: skip
    assert len(directions.layers) == 6 + embeddings and directions.rest.shape[1] == (0 if embeddings else 12)
    np.testing.assert_allclose(factored, flat, rtol=1e-10, atol=1e-14 * np.abs(flat).max())


def test_a_tied_head_and_a_fused_qkv_in_a_scan_and_low_rank_blocks_rebuilt_per_chunk():
    model = user_models.pure_model(0, jnp.float64)
    data = user_models.language_data(12)
    queries = data
    inverse, _, factored, flat = scores_both_ways((model.model_fn, CE), model.params, data, queries)
    assert any(layer.tied for layer in inverse.factors.layers)  # the tied head is scored with the flat leaves
    np.testing.assert_allclose(factored, flat, rtol=1e-10, atol=1e-14 * np.abs(flat).max())
    # 12 queries at rank 4: rebuilding a block for the chunk is cheaper than contracting every position with it
    low, _ = influence.query_directions(None, model.params, queries, inverse, query_rank=4)
    rebuilt = influence.FactoredDirections(
        tuple(left @ jnp.swapaxes(right, -1, -2) for left, right in low.blocks), low.rest, low.layers,
        low.rest_leaves, low.model, low.embeddings,
    )  # fmt: skip
    scored = lambda d: np.concatenate([b for _, b in influence.score_blocks(None, model.params, data, d)], 1)
    np.testing.assert_allclose(scored(low), scored(rebuilt), rtol=1e-10, atol=1e-14 * np.abs(flat).max())


def test_query_rank_is_a_near_optimal_truncation_and_low_precision_stays_close():
    params, data = structured_params(), structured_data(20)
    queries = jax.tree.map(lambda x: x[:3], data)
    inverse, directions, _, flat = scores_both_ways((structured_model, CE), params, data, queries)
    scored = lambda d: np.concatenate([b for _, b in influence.score_blocks(None, params, data, d, chunk_size=8)], 1)
    low, _ = influence.query_directions(None, params, queries, inverse, query_rank=1)
    assert sum(isinstance(kept, tuple) for kept in low.blocks) == 6  # every block: its smaller side is 2 or more
    for full, kept in zip(directions.blocks, low.blocks):
        optimal = np.linalg.svd(np.asarray(full), compute_uv=False)[..., 1:]  # the best rank-1 error, per block
        error = np.linalg.norm(np.asarray(kept[0] @ jnp.swapaxes(kept[1], -1, -2) - full), axis=(-2, -1))
        np.testing.assert_array_less(error, 1.01 * np.sqrt((optimal**2).sum(-1)) + 1e-12)
    rebuilt = influence.FactoredDirections(
        tuple(left @ jnp.swapaxes(right, -1, -2) for left, right in low.blocks), low.rest, low.layers,
        low.rest_leaves, low.model, low.embeddings,
    )  # fmt: skip
    np.testing.assert_allclose(scored(low), scored(rebuilt), rtol=1e-10, atol=1e-14 * np.abs(flat).max())

    half, _ = influence.query_directions(None, params, queries, inverse, score_dtype="bfloat16")
    assert all(block.dtype == jnp.bfloat16 for block in half.blocks) and half.rest.dtype == jnp.bfloat16
    np.testing.assert_allclose(scored(half), flat, rtol=0, atol=2e-2 * np.abs(flat).max())


def test_query_rank_and_score_dtype_need_kronecker_factors():
    params, data = jnp.ones(2), (jnp.ones((3, 2)), jnp.ones(3))
    loss = lambda w, ex: (ex[0] @ w - ex[1]) ** 2
    with pytest.raises(ValueError, match="query_rank and score_dtype keep Kronecker-factored"):
        influence.pairwise_scores(loss, params, data, data, method="identity", query_rank=2)
    model = (lambda p, x: x @ p, hvpopt.losses.squared_error)
    data = (jnp.ones((3, 2)), jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        influence.pairwise_scores(None, jnp.ones((2, 1)), data, data, method="kfac", curvature="ggn", model=model,
                                  damping=1.0, score_dtype="int8")  # fmt: skip


def test_the_memory_said_before_the_run_is_that_of_the_factors_and_directions_it_makes():
    model, params, data = (structured_model, CE), structured_params(), structured_data(20)
    queries = jax.tree.map(lambda x: x[:3], data)
    said = hvpopt.kronecker_fit_memory(*model, params, data, chunk_size=8)
    factors = hvpopt.fit_kronecker_factors(*model, params, data, chunk_size=8)
    pointers = 8 * len(jax.tree.leaves(factors))  # XLA's output size counts the table of the outputs too
    assert said.outputs == factors.nbytes + pointers and said.temporaries > 0
    like = influence.factored_directions_like(model, params, data[0][:1], 3, query_rank=1)
    made = influence.factored_query_directions(model, params, queries, factors, 0.1, query_rank=1)
    shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
    assert shapes(like) == shapes(made) and jax.tree.structure(like) == jax.tree.structure(made)
    stages = influence.kronecker_memory(model, params, data, data, 3, chunk_size=8, query_rank=1)
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert stages["fit"] == said.total - params_bytes
    assert stages["query directions"] == said.outputs + made.nbytes + 3 * params_bytes
    assert stages["scoring"] > said.outputs + made.nbytes


def test_a_bfloat16_model_gets_float32_factors_and_close_scores():
    params, data = structured_params(), structured_data(20)
    queries = jax.tree.map(lambda x: x[:3], data)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    fit = lambda p: influence.fit_inverse_curvature(None, p, data, method="ekfac", curvature="ggn",
                                                    model=(structured_model, CE), damping=0.1)  # fmt: skip
    inverse = fit(half)
    assert {x.dtype for x in jax.tree.leaves(inverse.factors)} == {jnp.dtype(jnp.float32)}
    scores = lambda p, inverse: np.asarray(influence.pairwise_scores(None, p, data, queries, inverse=inverse), float)
    reference = scores(params, fit(params))
    np.testing.assert_allclose(scores(half, inverse), reference, atol=0.05 * np.abs(reference).max())
