"""Validating influence against what it predicts: retraining, the proximal Bregman response, mislabels.

An influence score predicts ``L_q(theta_without_j) - L_q(theta)``, the change
of query ``q``'s loss if training example ``j`` were removed and the model
retrained (see :mod:`hvpopt.influence.scores`). Where the training objective
is strictly convex (a linear model, a convex loss, an L2 penalty) that change
can be computed exactly: :func:`leave_one_out_changes` retrains without each
example from the optimum (:func:`retrain`) by Newton-CG to rounding. Elsewhere
(a network) retraining is not what influence estimates, and
:func:`proximal_bregman_changes` computes what it does estimate, the change
under the proximal Bregman response. Either array goes to
:func:`agreement` beside the scores of the same pairs. For
self-influence, :func:`flipped_label_recall` measures how many deliberately
flipped labels rank among the most self-influential examples.

References:
  Koh, Liang, "Understanding black-box predictions via influence functions", ICML 2017.
  Bae, Ng, Lo, Ghassemi, Grosse, "If influence functions are the answer, then
  what is the question?", NeurIPS 2022.
  Pruthi, Liu, Kale, Sundararajan, "Estimating training data influence by
  tracing gradient descent", NeurIPS 2020.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from hvpopt import _checks
from hvpopt.influence.agreement import pearson, spearman
from hvpopt.influence.proximal_bregman import proximal_bregman_response
from hvpopt.optim import Minimum, minimize_newton_cg
from hvpopt.types import PyTree

__all__ = ["agreement", "flipped_label_recall", "leave_one_out_changes", "proximal_bregman_changes", "retrain"]


def retrain(
    example_loss: Callable,
    params: PyTree,
    data: Any,
    *,
    weights: Any = None,
    l2: float = 0.0,
    steps: int = 40,
) -> Minimum:
    """The minimum of ``(1/n) sum_i w_i l_i(theta) + (l2/2) ||theta||^2``, by Newton-CG from ``params``.

    ``steps`` Newton-CG steps (:func:`hvpopt.minimize_newton_cg`, CG to the
    forcing term 1e-8), enough to reach rounding on a strictly convex
    objective from a nearby start. ``n`` is the number of examples whatever
    the weights: a weight 0 leaves an example out without changing the
    others' scale, as leave-one-out retraining needs (Koh & Liang, 2017).
    Jittable; compiled once per ``example_loss`` and ``steps``.

    Args:
      example_loss: ``example_loss(params, example) -> scalar``, the loss of ONE example.
      params: the starting point, any pytree of floating arrays.
      data: the examples, a pytree of arrays with a leading axis ``n``.
      weights: ``[n]`` weights ``w_i`` (default all 1).
      l2: the L2 penalty, ``>= 0``.
      steps: Newton-CG steps, a positive int.

    Returns:
      A :class:`~hvpopt.optim.minimize.Minimum`: the parameters, the value and the gradient norm.

    Example:
      >>> import jax.numpy as jnp, numpy as np, hvpopt
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); y = jnp.array([1.0, 2.0, 4.0])
      >>> loss = lambda w, ex: 0.5 * (ex[0] @ w - ex[1]) ** 2           # ridge regression
      >>> result = hvpopt.influence.retrain(loss, jnp.zeros(2), (x, y), l2=0.1)
      >>> closed_form = np.linalg.solve(x.T @ x / 3 + 0.1 * np.eye(2), x.T @ y / 3)
      >>> bool(np.allclose(result.params, closed_form, atol=1e-5)), bool(result.grad_norm < 1e-5)
      (True, True)
    """
    _checks.check_positive_int("steps", steps)
    _checks.check_nonnegative("l2", l2, finite=True)
    weights = _weights(params, data, weights)
    return _retrain(example_loss, params, data, weights, l2, steps)


def leave_one_out_changes(
    example_loss: Callable,
    params: PyTree,
    train: Any,
    queries: Any,
    removed: Any,
    *,
    l2: float,
    steps: int = 40,
) -> jax.Array:
    """``changes[q, k] = L_q(theta_without_j) - L_q(theta)`` for ``j = removed[k]``, by exact retraining.

    ``theta`` is ``params``, which should be the optimum of the full objective
    ``(1/n) sum_i l_i + (l2/2) ||theta||^2`` (:func:`retrain` it first); each
    ``theta_without_j`` is retrained from there with ``w_j = 0`` (the ground
    truth influence scores predict, Koh & Liang 2017). Exact where the
    objective is strictly convex. One :func:`retrain` per removed example, in
    a ``lax.map``; to stop between retrainings, call it with one index at a time.

    Args:
      example_loss: ``example_loss(params, example) -> scalar``, the loss of ONE example.
      params: the optimum of the full objective.
      train: the training examples, a pytree of arrays with a leading axis ``n``.
      queries: the query examples, the same structure with their own leading axis.
      removed: indices into ``train`` of the examples left out, one at a time.
      l2: the L2 penalty of the objective, ``>= 0`` (the scores' ``damping``).
      steps: Newton-CG steps per retraining.

    Returns:
      ``[num_queries, len(removed)]``, the dtype of the query losses.

    Example:
      >>> import jax.numpy as jnp, numpy as np, hvpopt
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); y = jnp.array([1.0, 2.0, 4.0])
      >>> loss = lambda w, ex: 0.5 * (ex[0] @ w - ex[1]) ** 2
      >>> theta = hvpopt.influence.retrain(loss, jnp.zeros(2), (x, y), l2=0.1).params
      >>> changes = hvpopt.influence.leave_one_out_changes(loss, theta, (x, y), (x[2:], y[2:]), [0, 2], l2=0.1)
      >>> changes.shape, bool(changes[0, 1] > 0)    # without example 2, its own loss rises
      ((1, 2), True)
    """
    _checks.check_positive_int("steps", steps)
    _checks.check_nonnegative("l2", l2, finite=True)
    removed = _removed(train, removed)
    return _leave_one_out_changes(example_loss, params, train, queries, removed, l2, steps)


def proximal_bregman_changes(
    example_loss: Callable,
    model: tuple[Callable, Callable],
    params: PyTree,
    curvature_data: Any,
    train: Any,
    queries: Any,
    removed: Any,
    *,
    damping: float,
    steps: int = 4,
    maxiter: int = 50,
) -> jax.Array:
    """``changes[q, k] = L_q(theta*_j) - L_q(theta_s)``, ``j = removed[k]``, under the proximal Bregman response.

    ``theta*_j`` minimises the Bregman divergence of the outputs on the
    curvature examples, minus ``(1/n) l_j``, plus ``(damping/2) ||theta -
    theta_s||^2`` (:func:`~hvpopt.influence.proximal_bregman_response`, Bae
    et al. 2022): what Gauss-Newton influence with that damping and those
    curvature examples estimates on a non-convex model, where leave-one-out
    retraining is not. ``n`` is the size of ``train``. One response per
    removed example, in a ``lax.map``; to stop between them, call it with one
    index at a time.

    Args:
      example_loss: ``example_loss(params, example) -> scalar``, the loss of ONE example.
      model: ``(model_fn, output_loss)``, as for the Gauss-Newton curvature.
      params: the trained parameters ``theta_s``.
      curvature_data: ``(inputs, targets)`` of the examples of the Bregman term
        (the curvature examples of the scores being checked).
      train: the training examples, ``(inputs, targets)`` with a leading axis ``n``.
      queries: the query examples, the same structure with their own leading axis.
      removed: indices into ``train`` of the examples removed, one at a time.
      damping: ``> 0``, the proximity weight (the scores' damping).
      steps, maxiter: Newton-CG steps and CG iterations per step.

    Returns:
      ``[num_queries, len(removed)]``, the dtype of the query losses.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> model_fn = lambda w, x: x @ w                              # outputs [batch, 1]
      >>> squared = hvpopt.losses.squared_error
      >>> loss = lambda w, ex: squared(model_fn(w, ex[0][None]), ex[1][None])
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); y = jnp.array([[1.0], [2.0], [4.0]])
      >>> w = jnp.linalg.lstsq(x, y)[0]
      >>> changes = hvpopt.influence.proximal_bregman_changes(
      ...     loss, (model_fn, squared), w, (x, y), (x, y), (x[2:], y[2:]), [0, 2], damping=0.1)
      >>> changes.shape, bool(changes[0, 1] > 0)
      ((1, 2), True)
    """
    _checks.check_positive_int("steps", steps)
    _checks.check_positive_int("maxiter", maxiter)
    if isinstance(damping, (int, float)) and not damping > 0:
        raise ValueError(f"damping must be > 0 (the proximity weight); got {damping!r}.")
    removed = _removed(train, removed)
    return _proximal_bregman_changes(
        example_loss, tuple(model), params, curvature_data, train, queries, removed, damping, steps, maxiter
    )


def agreement(predicted: Any, actual: Any) -> dict[str, float]:
    """``{"pearson": ..., "spearman": ...}`` of predicted against actual changes, entry by entry.

    What a validation reports: the linear (Pearson) and rank (Spearman)
    correlation between the scores of some (query, removed example) pairs and
    the changes a reference measured for the same pairs (:func:`leave_one_out_changes`,
    :func:`proximal_bregman_changes`), computed in float64.

    Args:
      predicted: scores, any shape.
      actual: the reference's changes, the same shape.

    Returns:
      A dict of the two correlations, floats in ``[-1, 1]``.

    Example:
      >>> import hvpopt
      >>> report = hvpopt.influence.agreement([[1.0, 2.0, 3.0]], [[1.1, 1.9, 4.0]])
      >>> sorted(report), round(report["pearson"], 3), report["spearman"]
      (['pearson', 'spearman'], 0.968, 1.0)
    """
    if np.shape(predicted) != np.shape(actual):
        raise ValueError(
            f"predicted and actual must have the same shape; got {np.shape(predicted)} and {np.shape(actual)}."
        )
    return {"pearson": pearson(predicted, actual), "spearman": spearman(predicted, actual)}


def flipped_label_recall(self_scores: Any, flipped: Any, *, fraction: float = 0.1) -> float:
    """The fraction of the flipped labels found among the top ``fraction`` of examples by self-influence.

    ``recall = |flipped ∩ top_k| / |flipped|`` with ``top_k`` the
    ``max(1, round(fraction * n))`` examples of largest self-influence: a
    mislabelled example is one the model cannot fit without bending to it,
    so its removal changes its own loss most (Koh & Liang 2017, sec. 5.4;
    Pruthi et al. 2020). Ties rank in order of appearance.

    Args:
      self_scores: ``[n]`` self-influence scores.
      flipped: ``[n]`` booleans, True where the label was flipped; at least one.
      fraction: the share of examples inspected, in ``(0, 1]``.

    Returns:
      The recall, a float in ``[0, 1]``.

    Example:
      >>> import hvpopt
      >>> scores = [0.1, 5.0, 0.3, 0.2, 4.0, 0.0, 0.1, 0.2, 0.3, 0.1]
      >>> flipped = [False, True, False, False, False, False, True, False, False, False]
      >>> hvpopt.influence.flipped_label_recall(scores, flipped, fraction=0.2)   # top 2: examples 1 and 4
      0.5
    """
    scores, flipped = np.asarray(self_scores), np.asarray(flipped)
    if scores.ndim != 1 or flipped.shape != scores.shape:
        raise ValueError(
            f"self_scores and flipped must be 1-D arrays of the same length; got shapes {scores.shape} "
            f"and {flipped.shape}."
        )
    if flipped.dtype != bool:
        raise TypeError(f"flipped must be booleans; got dtype {flipped.dtype}.")
    if not flipped.any():
        raise ValueError("flipped marks no example: the recall of no flipped labels is undefined.")
    fraction = _checks.check_number("fraction", fraction, "a number in (0, 1]", lambda x: 0 < x <= 1)
    top = np.argsort(-scores, kind="stable")[: max(1, round(fraction * flipped.size))]
    return float(flipped[top].sum() / flipped.sum())


# ---------------------------------------------------------------- compiled once per loss


def _weighted_objective(example_loss: Callable, data: Any, weights: jax.Array, l2) -> Callable:
    def objective(params):
        losses = jax.vmap(example_loss, in_axes=(None, 0))(params, data)
        return jnp.sum(weights * losses) / weights.size + 0.5 * l2 * otu.tree_norm(params, squared=True)

    return objective


def _query_losses(example_loss: Callable, params: PyTree, queries: Any) -> jax.Array:
    return jax.vmap(example_loss, in_axes=(None, 0))(params, queries)


@jax.jit(static_argnames=("example_loss", "steps"))
def _retrain(example_loss, params, data, weights, l2, steps) -> Minimum:
    objective = _weighted_objective(example_loss, data, weights, l2)
    return minimize_newton_cg(objective, params, steps=steps, forcing=1e-8)


@jax.jit(static_argnames=("example_loss", "steps"))
def _leave_one_out_changes(example_loss, params, train, queries, removed, l2, steps) -> jax.Array:
    base = _query_losses(example_loss, params, queries)
    ones = _weights(params, train, None)

    def change(j):
        theta = _retrain(example_loss, params, train, ones.at[j].set(0.0), l2, steps).params
        return _query_losses(example_loss, theta, queries) - base

    return jax.lax.map(change, removed).T


@jax.jit(static_argnames=("example_loss", "model", "steps", "maxiter"))
def _proximal_bregman_changes(
    example_loss, model, params, curvature_data, train, queries, removed, damping, steps, maxiter
) -> jax.Array:
    base = _query_losses(example_loss, params, queries)
    num_train = _checks.leading_size("train", train)

    def change(j):
        example = jax.tree.map(lambda a: a[j], train)
        theta = proximal_bregman_response(
            example_loss,
            model,
            params,
            curvature_data,
            example,
            num_train=num_train,
            damping=damping,
            steps=steps,
            maxiter=maxiter,
        )
        return _query_losses(example_loss, theta, queries) - base

    return jax.lax.map(change, removed).T


def _weights(params: PyTree, data: Any, weights: Any) -> jax.Array:
    """``weights`` (default all 1) as an ``[n]`` array of the parameters' dtype."""
    n = _checks.leading_size("data", data)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    weights = jnp.ones(n, dtype) if weights is None else jnp.asarray(weights, dtype)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), one per example; got {weights.shape}.")
    return weights


def _removed(train: Any, removed: Any) -> jax.Array:
    """``removed`` as a 1-D int array of indices into ``train``, checked where it is concrete."""
    n = _checks.leading_size("train", train)
    if isinstance(removed, jax.core.Tracer):
        return removed
    array = np.asarray(removed)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"removed must be a non-empty 1-D array of example indices; got {removed!r}.")
    if array.min() < 0 or array.max() >= n:
        raise ValueError(f"removed must index the {n} training examples (0 to {n - 1}); got {array.tolist()}.")
    return jnp.asarray(array)
