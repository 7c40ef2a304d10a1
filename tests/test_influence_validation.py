"""Validation of influence against ground truth (float64): retraining, leave-one-out, the proximal
Bregman response in closed form, agreement and flipped-label recall."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from hvpopt import influence, losses

L2 = 0.1


@pytest.fixture(autouse=True, scope="module")
def float64():
    with jax.enable_x64(True):
        yield


def squared_loss(w, example):
    x, y = example
    return 0.5 * (x @ w - y) ** 2


@pytest.fixture(scope="module")
def ridge(float64):
    """20 examples of a linear regression with 3 features, and 4 queries."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=24)
    return (jnp.asarray(x[:20]), jnp.asarray(y[:20])), (jnp.asarray(x[20:]), jnp.asarray(y[20:]))


def ridge_solution(x, y, weights, l2):
    """argmin (1/n) sum_i w_i (x_i w - y_i)^2 / 2 + (l2/2) ||w||^2, n = len(y) whatever the weights."""
    n = len(y)
    return np.linalg.solve(x.T @ (weights[:, None] * x) / n + l2 * np.eye(x.shape[1]), x.T @ (weights * y) / n)


def test_retrain_on_ridge_regression_is_the_closed_form(ridge):
    (x, y), _ = ridge
    weights = np.linspace(0.0, 2.0, 20)
    result = influence.retrain(squared_loss, jnp.zeros(3), (x, y), weights=weights, l2=L2)
    np.testing.assert_allclose(result.params, ridge_solution(np.asarray(x), np.asarray(y), weights, L2), rtol=1e-10)
    assert result.grad_norm < 1e-10
    unweighted = influence.retrain(squared_loss, jnp.zeros(3), (x, y), l2=L2).params
    np.testing.assert_allclose(unweighted, ridge_solution(np.asarray(x), np.asarray(y), np.ones(20), L2), rtol=1e-10)


def test_leave_one_out_changes_on_ridge_regression_are_the_closed_form_ones(ridge):
    (x, y), (xq, yq) = ridge
    theta = influence.retrain(squared_loss, jnp.zeros(3), (x, y), l2=L2).params
    removed = [0, 7, 19]  # one at a time, as the command line calls it to stop between retrainings
    changes = np.concatenate(
        [influence.leave_one_out_changes(squared_loss, theta, (x, y), (xq, yq), [j], l2=L2) for j in removed], axis=1
    )
    query_losses = lambda w: 0.5 * (np.asarray(xq) @ w - np.asarray(yq)) ** 2
    full = ridge_solution(np.asarray(x), np.asarray(y), np.ones(20), L2)
    expected = np.stack(
        [
            query_losses(ridge_solution(np.asarray(x), np.asarray(y), np.ones(20) - np.eye(20)[j], L2))
            - query_losses(full)
            for j in removed
        ],
        axis=1,
    )
    assert changes.shape == (4, 3)
    np.testing.assert_allclose(changes, expected, rtol=1e-7, atol=1e-12)


def logistic_loss(params, example):
    x, label = example
    return -jax.nn.log_softmax(x @ params["w"] + params["b"])[label]


@pytest.fixture(scope="module")
def logistic(float64):
    """L2-penalised 3-class logistic regression on 60 examples of 4 features, at its optimum (by scipy)."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 4))
    labels = rng.integers(0, 3, size=66)
    x = jnp.asarray(centres[labels] + rng.normal(size=(66, 4)))
    train, queries = (x[:60], jnp.asarray(labels[:60])), (x[60:], jnp.asarray(labels[60:]))
    return jax.tree.map(jnp.asarray, scipy_minimum(train, np.ones(60))), train, queries


def scipy_minimum(train, weights):
    """The L2-penalised weighted logistic regression optimum by scipy's BFGS to a tight tolerance."""
    x, labels = map(np.asarray, train)

    def objective(v):
        logits = x @ v[:12].reshape(4, 3) + v[12:]
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        losses = -np.log(p[np.arange(len(labels)), labels])
        value = np.sum(weights * losses) / len(labels) + 0.5 * L2 * v @ v
        residual = weights[:, None] * (p - np.eye(3)[labels]) / len(labels)
        return value, np.concatenate([(x.T @ residual).ravel(), residual.sum(0)]) + L2 * v

    v = scipy.optimize.minimize(objective, np.zeros(15), jac=True, method="BFGS", options={"gtol": 1e-12}).x
    return {"w": v[:12].reshape(4, 3), "b": v[12:]}


def test_leave_one_out_changes_on_logistic_regression_match_scipy_and_the_influence_scores(logistic):
    params, train, queries = logistic
    removed = np.arange(0, 60, 6)
    changes = influence.leave_one_out_changes(logistic_loss, params, train, queries, removed, l2=L2)
    query_losses = lambda p: jax.vmap(logistic_loss, in_axes=(None, 0))(p, queries)
    expected = np.stack(
        [query_losses(scipy_minimum(train, np.ones(60) - np.eye(60)[j])) - query_losses(params) for j in removed],
        axis=1,
    )
    assert changes.shape == (6, 10)
    np.testing.assert_allclose(changes, expected, atol=1e-8)
    scores = influence.pairwise_scores(logistic_loss, params, train, queries, method="exact", damping=L2)
    report = influence.agreement(np.asarray(scores)[:, removed], changes)
    assert report["pearson"] > 0.99 and report["spearman"] > 0.95, report


def test_proximal_bregman_changes_of_a_linear_model_are_the_closed_form(ridge):
    """Squared error of a linear model: the proximal Bregman objective is quadratic, its minimiser a solve."""
    (x, y), (xq, yq) = ridge
    model_fn = lambda w, inputs: inputs @ w
    example_loss = lambda w, ex: losses.squared_error(model_fn(w, ex[0][None]), ex[1][None])
    y, yq = y[:, None], yq[:, None]
    w = jnp.asarray(np.linalg.lstsq(np.asarray(x), np.asarray(y), rcond=None)[0])
    subset = (x[:12], y[:12])
    removed, damping = [1, 15], 0.5  # damping large enough for a minimum
    changes = influence.proximal_bregman_changes(
        example_loss, (model_fn, losses.squared_error), w, subset, (x, y), (xq, yq), removed, damping=damping
    )
    xs, x_np, y_np, w_np = np.asarray(subset[0]), np.asarray(x), np.asarray(y), np.asarray(w)
    query_losses = lambda v: 0.5 * np.sum((np.asarray(xq) @ v - np.asarray(yq)) ** 2, axis=1)
    expected = []
    for j in removed:  # (X^T X / m + damping I - x_j x_j^T / n) (theta - w) = x_j (x_j^T w - y_j) / n
        xj = x_np[j][:, None]
        a = xs.T @ xs / 12 + damping * np.eye(3) - xj @ xj.T / 20
        theta = w_np + np.linalg.solve(a, xj @ (xj.T @ w_np - y_np[j]) / 20)
        expected.append(query_losses(theta) - query_losses(w_np))
    np.testing.assert_allclose(changes, np.stack(expected, axis=1), rtol=1e-8, atol=1e-14)


def test_agreement_is_scipys_pearson_and_spearman():
    rng = np.random.default_rng(2)
    predicted = rng.normal(size=(3, 7))
    actual = predicted + 0.5 * rng.normal(size=(3, 7)) ** 3
    report = influence.agreement(predicted, actual)
    assert list(report) == ["pearson", "spearman"]
    assert report["pearson"] == pytest.approx(scipy.stats.pearsonr(predicted.ravel(), actual.ravel())[0], abs=1e-12)
    assert report["spearman"] == pytest.approx(scipy.stats.spearmanr(predicted.ravel(), actual.ravel())[0], abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        influence.agreement(predicted, actual[:, :3])


def test_flipped_label_recall_counts_the_flipped_labels_among_the_most_self_influential():
    scores = np.array([0.1, 9.0, 0.2, 8.0, 0.3, 0.0, 7.0, *np.linspace(0.4, 1.5, 12), 6.0])
    flipped = np.zeros(20, bool)
    flipped[[1, 3, 5, 6]] = True  # the top 10% holds 1 and 3; the top 20% 1, 3, 6 and 19
    assert influence.flipped_label_recall(scores, flipped) == 0.5
    assert influence.flipped_label_recall(scores, flipped, fraction=0.2) == 0.75
    assert influence.flipped_label_recall(scores, flipped, fraction=1.0) == 1.0
    assert influence.flipped_label_recall(scores, flipped, fraction=0.01) == 0.25  # at least one example
    with pytest.raises(ValueError, match="flipped marks no example"):
        influence.flipped_label_recall(scores, np.zeros(20, bool))
    with pytest.raises(ValueError, match="fraction"):
        influence.flipped_label_recall(scores, flipped, fraction=0.0)
    with pytest.raises(ValueError, match="same length"):
        influence.flipped_label_recall(scores[:5], flipped)


def test_bad_arguments_are_named(ridge):
    (x, y), queries = ridge
    with pytest.raises(ValueError, match="weights must have shape"):
        influence.retrain(squared_loss, jnp.zeros(3), (x, y), weights=np.ones(3))
    with pytest.raises(ValueError, match="l2"):
        influence.retrain(squared_loss, jnp.zeros(3), (x, y), l2=-1.0)
    with pytest.raises(ValueError, match="removed must index the 20"):
        influence.leave_one_out_changes(squared_loss, jnp.zeros(3), (x, y), queries, [20], l2=L2)
    with pytest.raises(ValueError, match="removed must be a non-empty"):
        influence.leave_one_out_changes(squared_loss, jnp.zeros(3), (x, y), queries, [], l2=L2)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kronecker_factored_scores_have_the_sign_and_scale_of_leave_one_out(logistic, method):
    params, train, queries = logistic
    removed = np.arange(0, 60, 6)
    changes = np.asarray(influence.leave_one_out_changes(logistic_loss, params, train, queries, removed, l2=L2))
    model = (lambda p, x: x @ p["w"] + p["b"], losses.softmax_cross_entropy)
    scores = influence.pairwise_scores(
        logistic_loss, params, train, queries, method=method, curvature="ggn", model=model, damping=L2,
        fisher="closed_form",
    )  # fmt: skip
    predicted = np.asarray(scores)[:, removed]
    assert np.all(np.isfinite(scores))
    report = influence.agreement(predicted, changes)
    slope = np.sum(predicted * changes) / np.sum(predicted**2)  # least squares through the origin
    assert report["pearson"] > 0.95 and 0.8 < slope < 1.25, (report, slope)
