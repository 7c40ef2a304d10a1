"""The linear datamodeling score (float64): ridge regression retrained in closed form on random subsets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvpopt import influence, losses

L2 = 0.1


@pytest.fixture(autouse=True, scope="module")
def float64():
    with jax.enable_x64(True):
        yield


def squared_loss(w, example):
    x, y = example
    return 0.5 * (x @ w - y) ** 2


def ridge(x, y):
    """argmin (1/n) sum_i (x_i w - y_i)^2 / 2 + (L2/2) ||w||^2 over the n examples given."""
    return np.linalg.solve(x.T @ x / len(y) + L2 * np.eye(x.shape[1]), x.T @ y / len(y))


@pytest.fixture(scope="module")
def lds_problem(float64):
    """30 training examples of a noisy linear regression with 3 features, 6 queries, 20 half subsets retrained."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(36, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.5 * rng.normal(size=36)
    (xt, yt), (xq, yq) = (x[:30], y[:30]), (x[30:], y[30:])
    scores = np.asarray(
        influence.pairwise_scores(
            squared_loss, jnp.asarray(ridge(xt, yt)), (xt, yt), (xq, yq), method="exact", damping=L2
        )
    )
    subsets = influence.datamodel_subsets(30, 20, seed=1)
    losses = influence.datamodel_losses(
        lambda indices, seed: ridge(xt[indices], yt[indices]), lambda w: 0.5 * (xq @ w - yq) ** 2, subsets
    )
    return scores, subsets, losses


def test_exact_scores_of_ridge_regression_predict_the_retrained_losses(lds_problem):
    scores, subsets, losses = lds_problem
    result = influence.linear_datamodeling_score(scores, subsets, losses)
    assert result.num_subsets == 20 and result.num_excluded == 0 and result.per_query.shape == (6,)
    assert result.mean > 0.6 and result.mean - 3 * result.standard_error > 0
    shuffled = np.random.default_rng(2).permuted(scores, axis=1)  # each query's scores on other examples
    assert abs(influence.linear_datamodeling_score(shuffled, subsets, losses).mean) < result.mean - 0.4
    np.testing.assert_allclose(result.standard_error, np.std(result.per_query, ddof=1) / np.sqrt(6), rtol=1e-12)
    np.testing.assert_allclose(result.mean, result.per_query.mean(), rtol=1e-12)


def test_subset_predictions_sum_the_scores_of_the_examples_left_out():
    rng = np.random.default_rng(3)
    scores, subsets = rng.normal(size=(4, 9)), influence.datamodel_subsets(9, 5, fraction=0.4, seed=3)
    expected = [[sum(scores[q, j] for j in range(9) if not subsets[m, j]) for q in range(4)] for m in range(5)]
    np.testing.assert_allclose(influence.subset_predictions(scores, subsets), expected, rtol=1e-12)
    assert subsets.sum(axis=1).tolist() == [4] * 5  # round(0.4 * 9)
    np.testing.assert_array_equal(subsets, influence.datamodel_subsets(9, 5, fraction=0.4, seed=3))


def test_the_losses_of_several_seeds_are_averaged():
    subsets = influence.datamodel_subsets(6, 3, seed=0)
    retrain = lambda indices, seed: float(indices.sum() + 10 * seed)
    losses = influence.datamodel_losses(retrain, lambda value: [value, -value], subsets, seeds=3)
    sums = np.array([np.flatnonzero(s).sum() for s in subsets]) + 10.0  # the mean over seeds 0, 1, 2
    np.testing.assert_allclose(losses, np.stack([sums, -sums], axis=1))


def test_a_query_whose_loss_does_not_vary_is_left_out_and_counted(lds_problem):
    scores, subsets, losses = lds_problem
    flat = losses.copy()
    flat[:, 2] = 1.0
    result = influence.linear_datamodeling_score(scores, subsets, flat)
    assert result.num_excluded == 1 and np.isnan(result.per_query[2])
    np.testing.assert_allclose(result.mean, np.delete(result.per_query, 2).mean())
    constant_predictions = influence.linear_datamodeling_score(np.zeros_like(scores), subsets, losses)
    assert constant_predictions.mean == 0.0 and constant_predictions.num_excluded == 0
    with pytest.raises(ValueError, match="subset_losses must vary across the subsets for at least one query"):
        influence.linear_datamodeling_score(scores, subsets, np.ones_like(losses))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: influence.datamodel_subsets(30, 1), "num_subsets must be at least 2"),
        (lambda: influence.datamodel_subsets(30, 0), "num_subsets must be a positive integer"),
        (lambda: influence.datamodel_subsets(30, 5, fraction=1.0), r"fraction must be a number in \(0, 1\)"),
        (lambda: influence.datamodel_subsets(30, 5, fraction=0.01), "fraction must leave at least one of the 30"),
        (lambda: influence.datamodel_subsets(30, 5, fraction=0.99), "rounds to 30"),
        (lambda: influence.datamodel_subsets(30, 5, seed=-1), "seed must be an integer"),
        (lambda: influence.subset_predictions(np.ones((2, 5)), np.ones((3, 4), bool)), "one column per training"),
        (lambda: influence.subset_predictions(np.ones((2, 5)), np.ones((3, 5))), "subsets must be a 2-D boolean"),
        (lambda: influence.subset_predictions(np.ones(5), np.ones((3, 5), bool)), "scores must be a 2-D floating"),
        (
            lambda: influence.linear_datamodeling_score(np.ones((2, 5)), np.ones((3, 5), bool), np.ones((2, 3))),
            r"subset_losses must have shape \(3, 2\)",
        ),
        (lambda: influence.datamodel_losses(None, None, np.ones((2, 3), bool), seeds=0), "seeds must be a positive"),
        (
            lambda: influence.datamodel_losses(lambda i, s: i, lambda i: i, np.tri(2, 3, dtype=bool)),
            r"query_losses_fn must return one loss per query, as many every time \(the first gave \(1,\)\)",
        ),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_ekfac_has_a_clearly_higher_lds_than_identity_on_a_small_mlp(float64):
    """A tanh MLP on blobs whose features differ in scale (so that curvature matters), retrained by
    Newton-CG on each of 12 half subsets from the full optimum (L2 1e-2): identity 0.42, EK-FAC 0.75 here
    (with 16 subsets, data seeds 0, 1, 2: identity 0.35, 0.25, 0.42 against EK-FAC 0.71, 0.74, 0.60)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 4)) * 1.5
    labels = rng.integers(0, 3, size=90)
    x = jnp.asarray((centres[labels] + rng.normal(size=(90, 4))) * np.array([4, 1, 0.3, 0.1]))
    train, queries = (x[:60], jnp.asarray(labels[:60])), (x[60:], jnp.asarray(labels[60:]))
    model_fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    ce = losses.softmax_cross_entropy
    loss = lambda p, example: ce(model_fn(p, example[0][None]), example[1][None])
    keys = jax.random.split(jax.random.key(0), 2)
    start = {"w1": jax.random.normal(keys[0], (4, 8)) / 2, "b1": jnp.zeros(8)}
    start |= {"w2": jax.random.normal(keys[1], (8, 3)) / 2, "b2": jnp.zeros(3)}
    theta = influence.retrain(loss, start, train, l2=1e-2, steps=60).params

    def retrain(indices, seed):
        weights = np.zeros(60)
        weights[indices] = 60 / len(indices)  # the mean loss over the subset
        return influence.retrain(loss, theta, train, weights=jnp.asarray(weights), l2=1e-2, steps=20).params

    subsets = influence.datamodel_subsets(60, 12, seed=0)
    query_losses = jax.jit(jax.vmap(loss, in_axes=(None, 0)))
    actual = influence.datamodel_losses(retrain, lambda p: query_losses(p, queries), subsets)
    lds = {
        method: influence.linear_datamodeling_score(
            np.asarray(
                influence.pairwise_scores(
                    loss, theta, train, queries, method=method, damping=1e-2, curvature="ggn", model=(model_fn, ce),
                    **({"fisher": "closed_form"} if method == "ekfac" else {}),
                )
            ),
            subsets,
            actual,
        )
        for method in ("identity", "ekfac")
    }  # fmt: skip
    ekfac, identity = lds["ekfac"], lds["identity"]
    assert ekfac.mean > 0.6 and ekfac.mean - identity.mean > 3 * max(ekfac.standard_error, identity.standard_error), lds
