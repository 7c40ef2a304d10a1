"""The built-in tasks and their transformer models, in float64 against ground truth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flat, rel_error, to_float64

import hvpopt
from hvpopt.testbed.models.transformer import rotate_positions
from hvpopt.testbed.tasks import TASKS, make_task

TINY = {"d_model": 8, "num_layers": 1, "num_heads": 2, "mlp_ratio": 2}
SMALL_DATA = {
    "shakespeare": {"context_length": 8},
    "reverse": {"num_examples": 40, "length": 3},
    "modular": {"modulus": 7},
    "dyck": {"num_examples": 40, "max_length": 6},
    "blobs": {"num_examples": 40},
}


def tiny_task(name, **model):
    model_options = {"hidden_sizes": [4]} if name == "blobs" else {**TINY, **model}
    return make_task(name, data_options=SMALL_DATA[name], model_options=model_options)


@pytest.mark.parametrize(
    "name, model",
    [
        ("shakespeare", {}),
        ("reverse", {"positions": "rotary", "tie_embeddings": True}),
        ("dyck", {"positions": "rotary"}),
    ],
)
def test_forward_over_reverse_hvp_matches_reverse_over_reverse(name, model):
    task = tiny_task(name, **model)
    params = to_float64(task.params)
    batch = task.train.take(range(4))
    v = jax.tree.map(lambda x: np.cos(np.arange(x.size)).reshape(x.shape), params)

    @jax.jit
    def both(params, v):
        loss = lambda p: task.batch_loss(p, batch.inputs, batch.targets)
        return hvpopt.hvp(loss, params, v, mode="fwd_rev"), hvpopt.hvp(loss, params, v, mode="rev_rev")

    forward, reverse = both(params, v)
    assert rel_error(flat(forward), flat(reverse)) < 1e-10


def test_transformer_hessian_is_symmetric_and_matches_forward_over_reverse():
    task = tiny_task("reverse", positions="rotary", tie_embeddings=True)
    params = to_float64(task.params)
    batch = task.train.take(range(3))
    loss = lambda p: task.batch_loss(p, batch.inputs, batch.targets)
    dense = jax.jit(lambda p: hvpopt.dense_matrix(hvpopt.hessian_operator(loss, p), p))(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    reference = jax.jit(jax.hessian(lambda x: loss(unravel(x))))(flat)
    assert np.max(np.abs(dense - dense.T)) < 1e-12 * np.max(np.abs(dense))
    assert np.max(np.abs(dense - reference)) < 1e-10 * np.max(np.abs(reference))


def test_rotary_attention_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 8), jnp.float64)
    queries = rotate_positions(jnp.broadcast_to(q, (6, 1, 8)))
    keys = rotate_positions(jnp.broadcast_to(k, (6, 1, 8)))
    scores = jnp.einsum("qhd,khd->qk", queries, keys)
    assert jnp.allclose(scores[1, 3], scores[2, 4]) and jnp.allclose(scores[3, 1], scores[5, 3])
    assert jnp.allclose(jnp.diag(scores), jnp.vdot(q, k))
    assert not jnp.allclose(scores[1, 3], scores[1, 4])


def test_classifier_ignores_trailing_padding():
    task = tiny_task("dyck")
    tokens = task.train.inputs[:8]
    lengths = (tokens != task.tokenizer.pad_id).sum(axis=1)
    short = int(lengths.max())
    model_fn = jax.jit(task.model_fn)
    assert jnp.allclose(model_fn(task.params, tokens), model_fn(task.params, tokens[:, :short]), atol=1e-6)


@pytest.mark.parametrize("name", TASKS)
def test_batch_loss_is_the_mean_of_example_losses(name):
    task = tiny_task(name)
    params = to_float64(task.params)
    batch = task.train.take(range(6))

    @jax.jit
    def gap(params, inputs, targets):
        per_example = jax.vmap(lambda x, y: task.example_loss(params, (x, y)))(inputs, targets)
        return task.batch_loss(params, inputs, targets) - jnp.mean(per_example)

    assert abs(gap(params, batch.inputs, batch.targets)) < 1e-12


def test_config_rebuilds_the_same_task():
    task = make_task("blobs", seed=4, flip_fraction=0.1, model_options={"hidden_sizes": [3]})
    again = make_task(**task.config)
    assert np.array_equal(task.train.inputs, again.train.inputs)
    assert np.array_equal(task.train.flipped, again.train.flipped)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(task.params), jax.tree.leaves(again.params)))


def test_l2_penalty_enters_the_objective():
    task = make_task("blobs", l2=0.5)
    batch = task.train.take(range(5))
    norm2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(task.params))
    gap = task.objective(task.params, batch.inputs, batch.targets) - task.batch_loss(
        task.params, batch.inputs, batch.targets
    )
    assert jnp.allclose(gap, 0.25 * norm2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "imagenet"}, "task must be one of"),
        ({"name": "modular", "data_options": {"modulos": 7}}, "no data option 'modulos'"),
        ({"name": "dyck", "model_options": {"width": 7}}, "no model option 'width'"),
        ({"name": "dyck", "model_options": {"num_heads": 3}}, "divisible by num_heads"),
        ({"name": "blobs", "l2": -1.0}, "l2 must be >= 0"),
    ],
)
def test_bad_task_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_task(**kwargs)
