"""Influence scores: how removing a training example would change a query's loss.

With ``n`` training examples, ``l_j`` their losses, ``H`` the curvature of the
mean training loss and ``L_q`` a query's loss (Koh & Liang, 2017),

.. math:: \\mathrm{score}[q, j] = \\tfrac{1}{n}\\, \\nabla L_q^\\top (H + \\lambda I)^{-1} \\nabla l_j
   \\approx L_q(\\theta_{-j}) - L_q(\\theta),

the change in the query's loss if example ``j`` were left out and the model
retrained. Positive: ``j`` helped the query (its loss would rise without it);
negative: ``j`` hurt it. Self-influence is ``score[j, j]`` with the query the
example itself. A model trained with the L2 penalty ``(lam/2) ||theta||^2`` is
matched exactly by ``damping=lam``.

Each query's gradient is solved against the curvature once
(:func:`query_directions`); training gradients then stream past in chunks
(:func:`score_blocks`), never more than one chunk in memory. With K-FAC or
EK-FAC the dense layers are scored from their inputs and output gradients
(:mod:`hvpopt.influence.factored`): a chunk then holds one layer's gradients at
a time, not the ``[chunk, P]`` rows of the whole model.

Reference:
  Koh, Liang, "Understanding black-box predictions via influence functions", ICML 2017.
"""

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hvpopt import _checks, sharding
from hvpopt.influence.example_loss import example_loss
from hvpopt.influence.factored import (
    FactoredDirections,
    _gathered,
    factored_query_directions,
    factored_score_blocks,
    factored_self_score_blocks,
)
from hvpopt.influence.gradients import padded_gradient_chunks
from hvpopt.influence.inverse_curvature import InverseCurvature, fit_inverse_curvature
from hvpopt.types import PyTree


def pairwise_scores(
    loss_fn: Callable | None,
    params: PyTree,
    train: PyTree,
    queries: PyTree,
    *,
    method: str = "cg",
    damping: float = 0.0,
    curvature: str = "hessian",
    curvature_data: PyTree | None = None,
    inverse: InverseCurvature | None = None,
    chunk_size: int = 64,
    mesh: Mesh | None = None,
    query_rank: int | None = None,
    score_dtype: str | None = None,
    **fit_options,
) -> jax.Array:
    """``scores[q, j] = (1/n) grad L_q^T (H + damping I)^{-1} grad l_j``, shape ``[n_queries, n_train]``.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example
        (vectorized here with ``jax.vmap``); None: derived from ``model``
        (:func:`hvpopt.influence.example_loss`).
      params: the trained parameters, any pytree.
      train: the training examples, a pytree of arrays with a leading axis ``n``.
      queries: the query examples, the same structure with their own leading axis.
      method: ``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"`` or ``"identity"``
        (see :mod:`hvpopt.influence.inverse_curvature`).
      damping: ``lambda >= 0``.
      curvature: ``"hessian"`` or ``"ggn"`` (needs ``model=(model_fn, output_loss)``).
      curvature_data: examples whose mean loss gives ``H`` (default ``train``;
        a random subset is cheaper).
      inverse: an already fitted :class:`InverseCurvature` (fit once, score many);
        then ``method``, ``damping``, ``curvature`` and ``fit_options`` are not used.
      chunk_size: examples per gradient chunk and per curvature product.
      mesh: a :class:`jax.sharding.Mesh` (:func:`hvpopt.data_mesh`) to spread
        the work over: each chunk of training examples and the curvature data
        are split over its ``"data"`` axis, and the scores are gathered onto
        every device. None: one device.
      query_rank, score_dtype: ``kfac`` and ``ekfac``: each layer's query direction
        kept at this rank, and the dtype the directions are stored and the scores
        contracted in (:func:`hvpopt.influence.factored_query_directions`).
      **fit_options: ``model``, ``rtol``, ``maxiter``, ``rank``, ``num_iters``,
        ``depth``, ``fisher``, ``key``, ``embeddings`` of :func:`fit_inverse_curvature`.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> loss = lambda w, ex: 0.5 * (ex[0] @ w - ex[1]) ** 2        # least squares
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); y = jnp.array([1.0, 2.0, 3.0])
      >>> w = jnp.linalg.lstsq(x, y)[0]
      >>> scores = hvpopt.influence.pairwise_scores(loss, w, (x, y), (x[:1], y[:1] + 1), method="exact")
      >>> scores.shape
      (1, 3)
    """
    params = params if mesh is None else sharding.replicate(params, mesh)
    inverse = inverse or fit_inverse_curvature(
        loss_fn,
        params,
        train if curvature_data is None else curvature_data,
        method=method,
        damping=damping,
        curvature=curvature,
        chunk_size=chunk_size,
        mesh=mesh,
        **fit_options,
    )
    loss_fn = _given_or_derived(loss_fn, fit_options.get("model") or inverse.model)
    directions, _ = query_directions(
        loss_fn, params, queries, inverse, chunk_size=chunk_size, query_rank=query_rank, score_dtype=score_dtype
    )
    blocks = score_blocks(loss_fn, params, train, directions, chunk_size=chunk_size, mesh=mesh)
    return jnp.concatenate([block for _, block in blocks], axis=1)


def self_scores(
    loss_fn: Callable | None,
    params: PyTree,
    train: PyTree,
    *,
    method: str = "cg",
    damping: float = 0.0,
    curvature: str = "hessian",
    curvature_data: PyTree | None = None,
    inverse: InverseCurvature | None = None,
    chunk_size: int = 64,
    mesh: Mesh | None = None,
    **fit_options,
) -> jax.Array:
    """``(1/n) grad l_j^T (H + damping I)^{-1} grad l_j`` for every training example, shape ``[n]``.

    How much example ``j``'s own loss would rise without it: large for
    examples the model had to memorise (mislabelled ones, outliers). Costs one
    solve per training example with ``cg`` and ``lissa``; ``exact`` and
    ``arnoldi`` reuse their factorisation. Arguments as in :func:`pairwise_scores`.
    """
    params = params if mesh is None else sharding.replicate(params, mesh)
    inverse = inverse or fit_inverse_curvature(
        loss_fn,
        params,
        train if curvature_data is None else curvature_data,
        method=method,
        damping=damping,
        curvature=curvature,
        chunk_size=chunk_size,
        mesh=mesh,
        **fit_options,
    )
    loss_fn = _given_or_derived(loss_fn, fit_options.get("model") or inverse.model)
    blocks = self_score_blocks(loss_fn, params, train, inverse, chunk_size=chunk_size, mesh=mesh)
    return jnp.concatenate([block for _, block in blocks])


def query_directions(
    loss_fn: Callable,
    params: PyTree,
    queries: PyTree,
    inverse: InverseCurvature,
    *,
    chunk_size: int = 64,
    query_rank: int | None = None,
    score_dtype: str | None = None,
) -> tuple[jax.Array | FactoredDirections, dict]:
    """The queries' preconditioned gradients ``(H + damping I)^{-1} grad L_q``, and the solver's per-query diagnostics.

    ``[n_queries, P]`` rows; with a ``kfac`` or ``ekfac`` inverse (its ``model`` known),
    :class:`~hvpopt.influence.factored.FactoredDirections`, kept per layer, at rank
    ``query_rank`` and in ``score_dtype`` where given (no diagnostics: nothing is iterated).
    """
    if inverse.factors is not None and inverse.model is not None:
        directions = factored_query_directions(
            inverse.model, params, queries, inverse.factors, inverse.damping,
            query_rank=query_rank, score_dtype=score_dtype, chunk_size=chunk_size,
        )  # fmt: skip
        return directions, {}
    if query_rank is not None or score_dtype is not None:
        raise ValueError(
            f"query_rank and score_dtype keep Kronecker-factored layers' directions; method={inverse.method!r} has "
            "none: use method='kfac' or 'ekfac' (with model=...), or leave them None."
        )
    rows, diagnostics = [], []
    for _, count, gradients in padded_gradient_chunks(loss_fn, params, queries, chunk_size=chunk_size):
        solved, info = inverse.apply(gradients)  # every chunk has the same rows: the solver compiles once
        rows.append(solved[:count])
        diagnostics.append({name: value[:count] for name, value in info.items()})
    merged = {name: np.concatenate([np.asarray(info[name]) for info in diagnostics]) for name in diagnostics[0]}
    return jnp.concatenate(rows), merged


def score_blocks(
    loss_fn: Callable,
    params: PyTree,
    train: PyTree,
    directions: jax.Array | FactoredDirections,
    *,
    chunk_size: int = 64,
    start: int = 0,
    mesh: Mesh | None = None,
) -> Iterator[tuple[int, jax.Array]]:
    """Yields ``(first_index, scores [n_queries, c])`` for consecutive chunks of ``train``.

    ``directions`` are :func:`query_directions`' rows, or its factored directions
    (then each layer is scored from its inputs and output gradients, and
    ``loss_fn`` is the one derived from their model). ``start`` (a multiple of
    ``chunk_size``) resumes after the chunks already done. With a ``mesh`` each
    chunk's gradients are computed and scored where its rows live, and only the
    ``[n_queries, c]`` scores are gathered.
    """
    if isinstance(directions, FactoredDirections):
        yield from factored_score_blocks(params, train, directions, chunk_size=chunk_size, start=start, mesh=mesh)
        return
    num_train = _checks.leading_size("train", train)
    gathered = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    chunks = padded_gradient_chunks(loss_fn, params, train, chunk_size=chunk_size, start=start, mesh=mesh)
    for first, count, gradients in chunks:
        yield first, _block(directions, gradients, num_train, gathered)[:, :count]


def self_score_blocks(
    loss_fn: Callable,
    params: PyTree,
    train: PyTree,
    inverse: InverseCurvature,
    *,
    chunk_size: int = 64,
    start: int = 0,
    mesh: Mesh | None = None,
) -> Iterator[tuple[int, jax.Array]]:
    """Yields ``(first_index, self-influence [c])`` for consecutive chunks of ``train`` (resumable at ``start``).

    With a ``kfac`` or ``ekfac`` inverse (its ``model`` known) each layer's share is computed from its
    inputs and output gradients (:func:`hvpopt.influence.factored_self_score_blocks`).
    """
    if inverse.factors is not None and inverse.model is not None:  # scored per layer
        yield from factored_self_score_blocks(inverse.model, params, train, inverse.factors, inverse.damping,
                                              chunk_size=chunk_size, start=start, mesh=mesh)  # fmt: skip
        return
    num_train = _checks.leading_size("train", train)
    chunks = padded_gradient_chunks(loss_fn, params, train, chunk_size=chunk_size, start=start, mesh=mesh)
    for first, count, gradients in chunks:  # padding rows repeat a solved row: no extra CG iterations
        solved, _ = inverse.apply(gradients)
        yield first, (jnp.sum(solved * gradients, axis=1) / num_train)[:count]


def _given_or_derived(loss_fn: Callable | None, model: tuple[Callable, Callable] | None) -> Callable:
    """``loss_fn``, or where None the loss of one example derived from ``model``."""
    if loss_fn is not None:
        return loss_fn
    if model is None:
        raise ValueError("loss_fn is None: pass the loss of one example, or model=(model_fn, output_loss).")
    return example_loss(*model)


@jax.jit(static_argnums=3)
def _block(directions, gradients, num_train, sharding_of_scores):
    return _gathered(directions @ gradients.T / num_train, sharding_of_scores)
