"""Gauss-Newton and Fisher products against explicit float64 matrices."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Problem, dense_ggn, flat, make_mlp, random_like, rel_error, to_float64
from jax.flatten_util import ravel_pytree

import hvpopt
from hvpopt import losses


@pytest.fixture(scope="module")
def ggn_products(problem):
    u = random_like(jax.random.key(0), problem.params)
    v = random_like(jax.random.key(1), problem.params)

    @jax.jit
    def compute(params, u, v):
        matvec = hvpopt.ggn_operator(problem.model_fn, problem.loss, params, problem.inputs, problem.targets)
        dense = hvpopt.dense_matrix(matvec, params)
        single = hvpopt.ggn_vp(problem.model_fn, problem.loss, params, v, problem.inputs, problem.targets)
        return matvec(u), matvec(v), single, dense

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the custom_vjp problem warns of its fallback
        return u, v, compute(problem.params, u, v)


def test_ggn_matches_explicit_jt_hl_j(problem, ggn_products):
    expected = dense_ggn(problem)
    u, v, (gu, gv, single, dense) = ggn_products
    assert rel_error(flat(gu), expected @ flat(u)) < 1e-10
    assert rel_error(flat(gv), expected @ flat(v)) < 1e-10
    assert rel_error(flat(single), expected @ flat(v)) < 1e-10
    assert rel_error(dense, expected) < 1e-10


def test_ggn_is_symmetric_positive_semidefinite(ggn_products):
    dense = np.asarray(ggn_products[2][3])
    np.testing.assert_allclose(dense, dense.T, atol=1e-12 * np.abs(dense).max())
    assert np.linalg.eigvalsh(dense).min() >= -1e-10 * np.abs(dense).max()


def test_model_without_forward_mode_warns_and_stays_exact():
    from conftest import make_custom_vjp

    problem = make_custom_vjp()
    v = random_like(jax.random.key(2), problem.params)
    with pytest.warns(UserWarning, match="reverse-over-reverse"):
        gv = hvpopt.ggn_vp(problem.model_fn, problem.loss, problem.params, v, problem.inputs, problem.targets)
    assert rel_error(flat(gv), dense_ggn(problem) @ flat(v)) < 1e-10


def masked_transformer_problem() -> Problem:
    from conftest import make_transformer

    base = make_transformer()
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    labels = jnp.where(mask == 1, base.targets, 999)  # padding holds an out-of-range id
    return base._replace(loss=losses.masked_softmax_cross_entropy, targets=(labels, mask))


def test_masked_cross_entropy_ggn_and_value():
    problem = masked_transformer_problem()
    labels, mask = problem.targets
    logits = problem.model_fn(problem.params, problem.inputs)
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.clip(labels, 0, 4)[..., None], -1)[..., 0]
    expected_value = jnp.sum(ce * mask) / jnp.sum(mask)
    np.testing.assert_allclose(problem.loss(logits, problem.targets), expected_value, rtol=1e-12)
    v = random_like(jax.random.key(3), problem.params)
    gv = jax.jit(lambda p, v: hvpopt.ggn_vp(problem.model_fn, problem.loss, p, v, problem.inputs, problem.targets))(
        problem.params, v
    )
    assert rel_error(flat(gv), dense_ggn(problem) @ flat(v)) < 1e-10


def test_all_padding_batch_has_zero_loss_not_nan():
    logits = jnp.ones((2, 3, 4))
    targets = (jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))
    assert losses.masked_softmax_cross_entropy(logits, targets) == 0.0
    hessian = losses.masked_softmax_cross_entropy.output_hessian(logits, targets)
    assert jnp.all(hessian(jnp.ones_like(logits)) == 0.0)


def regression_problem() -> Problem:
    model_fn, params = hvpopt.testbed.models.mlp((3, 5, 2), seed=7)
    x = jax.random.normal(jax.random.key(8), (7, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(9), (7, 2), jnp.float64)
    return Problem("regression", model_fn, losses.squared_error, to_float64(params), x, y)


@pytest.mark.parametrize("make", [make_mlp, regression_problem, masked_transformer_problem])
def test_closed_form_output_hessian_equals_autodiff(make):
    problem = make()
    outputs = problem.model_fn(problem.params, problem.inputs)
    u = jax.random.normal(jax.random.key(10), outputs.shape, outputs.dtype)
    closed = problem.loss.output_hessian(outputs, problem.targets)(u)
    autodiff = hvpopt.hvp(lambda o: problem.loss(o, problem.targets), outputs, u)
    np.testing.assert_allclose(closed, autodiff, rtol=1e-10, atol=1e-14)


def test_any_callable_loss_falls_back_to_autodiff():
    problem = make_mlp()
    plain = lambda logits, labels: jnp.mean(
        jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
    )
    v = random_like(jax.random.key(11), problem.params)
    closed = hvpopt.ggn_vp(problem.model_fn, problem.loss, problem.params, v, problem.inputs, problem.targets)
    fallback = hvpopt.ggn_vp(problem.model_fn, plain, problem.params, v, problem.inputs, problem.targets)
    assert rel_error(flat(fallback), flat(closed)) < 1e-12


@pytest.mark.parametrize("make", [make_mlp, regression_problem])
def test_true_fisher_equals_ggn_for_exponential_family_losses(make):
    problem = make()
    v = random_like(jax.random.key(12), problem.params)
    args = (problem.model_fn, problem.loss, problem.params, v, problem.inputs, problem.targets)
    assert rel_error(flat(hvpopt.fisher_vp(*args)), flat(hvpopt.ggn_vp(*args))) < 1e-12


@pytest.mark.parametrize("make", [make_mlp, regression_problem])
def test_monte_carlo_fisher_converges_to_true_fisher(make):
    problem = make()
    v = random_like(jax.random.key(13), problem.params)
    args = (problem.model_fn, problem.loss, problem.params, v, problem.inputs, problem.targets)
    exact = flat(hvpopt.fisher_vp(*args))
    mc = jax.jit(lambda key, n: hvpopt.mc_fisher_vp(*args, key=key, num_samples=n), static_argnums=1)
    few = rel_error(flat(mc(jax.random.key(0), 10)), exact)
    many = rel_error(flat(mc(jax.random.key(0), 20000)), exact)
    assert many < 0.05 and many < few / 10  # error ~ 1/sqrt(samples)


def test_monte_carlo_fisher_is_positive_semidefinite():
    problem = make_mlp()
    matvec = hvpopt.mc_fisher_operator(
        problem.model_fn,
        problem.loss,
        problem.params,
        problem.inputs,
        problem.targets,
        key=jax.random.key(1),
        num_samples=3,
    )
    dense = np.asarray(hvpopt.dense_matrix(matvec, problem.params))
    np.testing.assert_allclose(dense, dense.T, atol=1e-14)
    assert np.linalg.eigvalsh(dense).min() >= -1e-12


def per_example_loss(problem):
    def loss_fn(params, example):
        x, y = example
        return problem.loss(problem.model_fn(params, x[None]), y[None])

    return loss_fn


@pytest.mark.parametrize("chunk_size", [None, 3, 8])
def test_empirical_fisher_matches_per_example_gradients(chunk_size):
    problem = make_mlp()
    loss_fn = per_example_loss(problem)
    batch = (problem.inputs, problem.targets)
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(problem.params, batch)
    g = np.stack([flat(jax.tree.map(lambda a: a[i], grads)) for i in range(8)])
    expected = g.T @ g / 8
    v = random_like(jax.random.key(14), problem.params)
    fv = jax.jit(lambda p, v: hvpopt.empirical_fisher_vp(loss_fn, p, v, batch, chunk_size=chunk_size))(
        problem.params, v
    )
    assert rel_error(flat(fv), expected @ flat(v)) < 1e-10


def test_fisher_errors_name_the_argument():
    problem = make_mlp()
    p, x, y = problem.params, problem.inputs, problem.targets
    plain = lambda o, t: jnp.mean(o)
    with pytest.raises(TypeError, match="needs loss to be one of hvpopt.losses"):
        hvpopt.fisher_vp(problem.model_fn, plain, p, p, x, y)
    with pytest.raises(TypeError, match="needs loss to be one of hvpopt.losses"):
        hvpopt.mc_fisher_vp(problem.model_fn, plain, p, p, x, y, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        hvpopt.mc_fisher_vp(problem.model_fn, problem.loss, p, p, x, y, key=jax.random.key(0), num_samples=0)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        hvpopt.empirical_fisher_vp(lambda q, ex: jnp.ones(2), p, p, (x, y))
    with pytest.raises(ValueError, match="same leading"):
        hvpopt.empirical_fisher_vp(per_example_loss(problem), p, p, (x, y[:3]))


def test_loss_errors_name_the_argument():
    logits = jnp.zeros((2, 3, 5))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\)"):
        losses.softmax_cross_entropy(logits, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="integer class ids"):
        losses.softmax_cross_entropy(logits, jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="use masked_softmax_cross_entropy"):
        losses.softmax_cross_entropy(logits, (jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))))
    with pytest.raises(TypeError, match=r"targets=\(labels, mask\)"):
        losses.masked_softmax_cross_entropy(logits, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="mask must have the shape of labels"):
        losses.masked_softmax_cross_entropy(logits, (jnp.zeros((2, 3), jnp.int32), jnp.ones(3)))
    with pytest.raises(ValueError, match="squared_error targets must have the shape"):
        losses.squared_error(jnp.zeros((4, 2)), jnp.zeros(4))


def test_ggn_dtype_follows_inputs():
    model_fn, params = hvpopt.testbed.models.mlp((3, 4, 2))
    x, y = jnp.ones((5, 3), jnp.float32), jnp.zeros(5, jnp.int32)
    gv = hvpopt.ggn_vp(model_fn, losses.softmax_cross_entropy, params, params, x, y)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(gv))
    assert ravel_pytree(gv)[0].dtype == jnp.float32
