"""Dataset-averaged operators equal the full-batch product."""

import jax
import jax.numpy as jnp
import pytest
from conftest import flat, make_mlp, random_like, rel_error

import hvpopt


@pytest.fixture(scope="module")
def setup():
    problem = make_mlp()
    x = jax.random.normal(jax.random.key(20), (10, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(21), (10,), 0, 3)
    v = random_like(jax.random.key(22), problem.params)

    def batch_ggn(v, batch):
        inputs, targets = batch
        return hvpopt.ggn_vp(problem.model_fn, problem.loss, problem.params, v, inputs, targets)

    return batch_ggn, (x, y), v, flat(batch_ggn(v, (x, y)))


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 10, 16])
def test_chunks_weighted_by_size_equal_full_batch(setup, chunk_size):
    batch_ggn, data, v, full = setup
    matvec = hvpopt.average_over_chunks(batch_ggn, data, chunk_size=chunk_size)
    assert rel_error(flat(jax.jit(matvec)(v)), full) < 1e-12


def test_unequal_batches_weighted_by_size_equal_full_batch(setup):
    batch_ggn, (x, y), v, full = setup
    batches = [(x[:4], y[:4]), (x[4:7], y[4:7]), (x[7:], y[7:])]
    assert rel_error(flat(hvpopt.average_over_batches(batch_ggn, batches)(v)), full) < 1e-12
    streamed = hvpopt.average_over_batches(batch_ggn, lambda: iter(batches))
    assert rel_error(flat(streamed(v)), full) < 1e-12
    assert rel_error(flat(streamed(v)), full) < 1e-12  # re-iterable: same answer twice


def test_bad_data_is_refused(setup):
    batch_ggn, (x, y), v, _ = setup
    with pytest.raises(TypeError, match="generator is used up"):
        hvpopt.average_over_batches(batch_ggn, ((x, y) for _ in range(2)))
    with pytest.raises(ValueError, match="yielded no examples"):
        hvpopt.average_over_batches(batch_ggn, [])(v)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        hvpopt.average_over_chunks(batch_ggn, (x, y), chunk_size=0)
    with pytest.raises(ValueError, match="same leading"):
        hvpopt.average_over_chunks(batch_ggn, (x, y[:5]), chunk_size=2)


def test_empty_batches_add_nothing_and_empty_data_is_refused(setup):
    batch_ggn, (x, y), v, full = setup
    batches = [(x[:4], y[:4]), (x[4:4], y[4:4]), (x[4:], y[4:])]
    assert rel_error(flat(hvpopt.average_over_batches(batch_ggn, batches)(v)), full) < 1e-12
    with pytest.raises(ValueError, match="data holds no examples"):
        hvpopt.average_over_chunks(batch_ggn, (x[:0], y[:0]), chunk_size=2)
