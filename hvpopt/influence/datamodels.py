"""The linear datamodeling score (LDS): how well scores predict the losses of models retrained on subsets.

An attribution ``scores[q, j] ~ L_q(theta_without_j) - L_q(theta)`` (see
:mod:`hvpopt.influence.scores`) read as an additive datamodel predicts, for a
model retrained on a subset ``S`` of the training set, the rise of query
``q``'s loss when the examples outside ``S`` are removed:

.. math:: \\hat L_q(S) = \\sum_{j \\notin S} \\mathrm{scores}[q, j].

The LDS of query ``q`` is the Spearman correlation, across ``M`` random subsets
``S_m`` of equal size, between :math:`\\hat L_q(S_m)` and the query loss actually
measured after retraining on ``S_m`` (averaged over a few training seeds); a
constant offset does not change it. The score reported is the mean over the
queries, with its standard error. Draw the subsets with
:func:`datamodel_subsets`, retrain on each (:func:`datamodel_losses`, or a loop
of your own that keeps the models), then call :func:`linear_datamodeling_score`.

Reference:
  Park, Georgiev, Ilyas, Leclerc, Madry, "TRAK: Attributing model behavior at
  scale", ICML 2023.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from hvpopt import _checks
from hvpopt.influence.agreement import spearman

__all__ = [
    "LinearDatamodelingScore",
    "datamodel_losses",
    "datamodel_subsets",
    "linear_datamodeling_score",
    "subset_predictions",
]


class LinearDatamodelingScore(NamedTuple):
    """What :func:`linear_datamodeling_score` returns.

    Attributes:
      mean: the mean LDS over the queries that count (a float in ``[-1, 1]``).
      standard_error: ``std(per_query) / sqrt(number of queries that count)``, the
        sample standard deviation (``ddof=1``); NaN when only one query counts.
      per_query: ``[num_queries]``, each query's Spearman correlation; NaN for a
        query left out (its measured loss is the same on every subset).
      num_subsets: ``M``, the subsets correlated over.
      num_excluded: the queries left out of ``mean`` because their measured loss
        is the same on every subset, so that no ranking of the subsets exists.
    """

    mean: float
    standard_error: float
    per_query: np.ndarray
    num_subsets: int
    num_excluded: int


def datamodel_subsets(num_train: int, num_subsets: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``M`` random subsets of the training set, each of ``round(fraction * num_train)`` examples.

    Each row is drawn without replacement, independently of the others, by a
    NumPy generator seeded with ``seed``: the same arguments give the same
    subsets.

    Args:
      num_train: ``n``, the number of training examples, a positive int.
      num_subsets: ``M >= 2`` (a Spearman correlation across subsets needs two;
        the LDS papers use 50 to 100s).
      fraction: the share of the training set each subset keeps, in ``(0, 1)``;
        ``round(fraction * n)`` must leave at least one example in and one out.
      seed: the seed of the draw, an int in ``[0, 2**32)``.

    Returns:
      ``[M, n]`` booleans, True where an example is in the subset.

    Example:
      >>> import hvpopt
      >>> subsets = hvpopt.influence.datamodel_subsets(10, 3, fraction=0.3)
      >>> subsets.shape, subsets.sum(axis=1).tolist()
      ((3, 10), [3, 3, 3])
    """
    num_train = _checks.check_positive_int("num_train", num_train)
    num_subsets = _checks.check_positive_int("num_subsets", num_subsets)
    if num_subsets < 2:
        raise ValueError(
            f"num_subsets must be at least 2 (a Spearman correlation across subsets needs two); got {num_subsets}."
        )
    fraction = _checks.check_number("fraction", fraction, "a number in (0, 1)", lambda x: 0 < x < 1)
    size = round(fraction * num_train)
    if not 0 < size < num_train:
        raise ValueError(
            f"fraction must leave at least one of the {num_train} training examples in each subset and one "
            f"out; {fraction:g} of them rounds to {size}."
        )
    if _checks.as_int(seed) is None or not 0 <= seed < _checks.SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32); got {seed!r}.")
    rng = np.random.default_rng(seed)
    subsets = np.zeros((num_subsets, num_train), bool)
    for row in subsets:
        row[rng.choice(num_train, size, replace=False)] = True
    return subsets


def subset_predictions(scores: Any, subsets: Any) -> np.ndarray:
    """``predictions[m, q] = sum_{j not in S_m} scores[q, j]``: the additive datamodel's rise of each query loss.

    Args:
      scores: ``[num_queries, n]`` influence scores.
      subsets: ``[M, n]`` booleans, True where an example is in the subset
        (:func:`datamodel_subsets`).

    Returns:
      ``[M, num_queries]``, the dtype of ``scores``.

    Example:
      >>> import hvpopt
      >>> scores = [[1.0, 2.0, 4.0]]                      # one query, three training examples
      >>> hvpopt.influence.subset_predictions(scores, [[True, False, False], [False, True, True]]).tolist()
      [[6.0], [1.0]]
    """
    scores, subsets = _scores(scores), _subsets(subsets)
    if subsets.shape[1] != scores.shape[1]:
        raise ValueError(
            f"subsets must have one column per training example of scores ({scores.shape[1]}); got {subsets.shape[1]}."
        )
    return (~subsets).astype(scores.dtype) @ scores.T


def linear_datamodeling_score(scores: Any, subsets: Any, subset_losses: Any) -> LinearDatamodelingScore:
    """The LDS: per query, Spearman's correlation across subsets of predicted against measured losses.

    ``LDS_q = spearman_m(sum_{j not in S_m} scores[q, j], subset_losses[m, q])``
    (Park et al. 2023), averaged over the queries. A query whose measured loss
    is the same on every subset has no ranking to predict: it is left out of
    the mean (NaN in ``per_query``) and counted in ``num_excluded``. A query
    whose *predictions* are all equal (its scores rank nothing) counts 0. Ties
    are ranked in order of appearance (:func:`~hvpopt.influence.spearman`).

    Args:
      scores: ``[num_queries, n]`` influence scores.
      subsets: ``[M, n]`` booleans of the subsets retrained on (:func:`datamodel_subsets`).
      subset_losses: ``[M, num_queries]``, the query losses of the models retrained
        on each subset (averaged over their seeds, :func:`datamodel_losses`).

    Returns:
      A :class:`LinearDatamodelingScore`.

    Raises:
      ValueError: if the shapes disagree, or no query's loss varies across the subsets.

    Example:
      >>> import hvpopt
      >>> subsets = [[True, False, False], [False, True, False], [False, False, True]]
      >>> scores = [[1.0, 2.0, 3.0]]                      # removing more of example 3 raises the loss most
      >>> result = hvpopt.influence.linear_datamodeling_score(scores, subsets, [[5.0], [4.0], [3.5]])
      >>> result.mean, result.num_subsets
      (1.0, 3)
    """
    predictions = subset_predictions(scores, subsets)
    losses = np.asarray(subset_losses)
    if losses.shape != predictions.shape:
        raise ValueError(f"subset_losses must have shape {predictions.shape} (subsets x queries); got {losses.shape}.")
    per_query = np.full(losses.shape[1], np.nan)
    for q in range(losses.shape[1]):
        if np.ptp(losses[:, q]) > 0:
            per_query[q] = spearman(predictions[:, q], losses[:, q]) if np.ptp(predictions[:, q]) > 0 else 0.0
    counted = per_query[~np.isnan(per_query)]
    if counted.size == 0:
        raise ValueError(
            "subset_losses must vary across the subsets for at least one query; every query's loss is the "
            "same on every subset, so there is no ranking to predict."
        )
    standard_error = float(np.std(counted, ddof=1) / np.sqrt(counted.size)) if counted.size > 1 else float("nan")
    return LinearDatamodelingScore(
        float(counted.mean()), standard_error, per_query, losses.shape[0], losses.shape[1] - counted.size
    )


def datamodel_losses(
    retrain_fn: Callable[[np.ndarray, int], Any],
    query_losses_fn: Callable[[Any], Any],
    subsets: Any,
    *,
    seeds: int = 1,
) -> np.ndarray:
    """``losses[m] = mean_s query_losses_fn(retrain_fn(indices of S_m, s))``: retrain on each subset, measure.

    The models are trained one after another, in order of subset then seed,
    and not kept; to keep them (or to resume an interrupted run), let
    ``retrain_fn`` save what it trains and load it when asked again.

    Args:
      retrain_fn: ``retrain_fn(indices, seed) -> params``: a model trained on the
        training examples ``indices`` (sorted ``int`` indices) with training seed
        ``seed`` in ``range(seeds)`` (vary the initialisation and batch order with it).
      query_losses_fn: ``query_losses_fn(params) -> [num_queries]``, the query losses.
      subsets: ``[M, n]`` booleans (:func:`datamodel_subsets`).
      seeds: trainings per subset, whose query losses are averaged, a positive int.

    Returns:
      ``[M, num_queries]``, float64.

    Example:
      >>> import numpy as np, hvpopt
      >>> rng = np.random.default_rng(0); x = rng.normal(size=(12, 2)); y = x @ [1.0, -1.0] + rng.normal(size=12)
      >>> def retrain(indices, seed):                   # ridge regression, in closed form
      ...     xs, ys = x[indices], y[indices]
      ...     return np.linalg.solve(xs.T @ xs / len(ys) + 0.1 * np.eye(2), xs.T @ ys / len(ys))
      >>> query_losses = lambda w: 0.5 * (x[:2] @ w - y[:2]) ** 2
      >>> subsets = hvpopt.influence.datamodel_subsets(12, 5)
      >>> hvpopt.influence.datamodel_losses(retrain, query_losses, subsets).shape
      (5, 2)
    """
    subsets = _subsets(subsets)
    seeds = _checks.check_positive_int("seeds", seeds)
    runs = []
    for subset in subsets:
        indices = np.flatnonzero(subset)
        for seed in range(seeds):
            run = np.asarray(query_losses_fn(retrain_fn(indices, seed)), np.float64)
            if run.ndim != 1 or (runs and run.shape != runs[0].shape):
                first = f" (the first gave {runs[0].shape})" if runs else ""
                raise ValueError(
                    f"query_losses_fn must return one loss per query, as many every time{first}; got shape {run.shape}."
                )
            runs.append(run)
    return np.stack(runs).reshape(len(subsets), seeds, -1).mean(axis=1)


def _scores(scores: Any) -> np.ndarray:
    array = np.asarray(scores)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"scores must be a 2-D floating array [num_queries, n]; got shape {array.shape}.")
    return array


def _subsets(subsets: Any) -> np.ndarray:
    array = np.asarray(subsets)
    if array.ndim != 2 or array.dtype != bool:
        raise ValueError(
            f"subsets must be a 2-D boolean array [M, n] (True: in the subset); got shape {array.shape} "
            f"and dtype {array.dtype}."
        )
    return array
