"""An influence run's memory, stage by stage, said before the run: what it will hold beyond what it holds now.

With K-FAC or EK-FAC (:func:`kronecker_memory`) the stages are

* ``fit``: the fit's compiled program, one chunk of curvature examples' activations and
  gradients in its temporaries, the factors its outputs (:func:`hvpopt.kronecker_fit_memory`);
* ``query directions``: the factors, the queries' preconditioned gradients kept per layer
  (:func:`hvpopt.influence.factored_directions_like`), and one query's whole gradient
  three times over (the gradient, its preconditioned copy, its blocks);
* ``scoring``: the factors, the directions and one chunk of training examples scored per
  layer (:func:`hvpopt.influence.factored_scoring_memory`).

The programs are compiled, not run (XLA's buffer assignment gives their bytes), and the
runs that follow reuse the compilations. The parameters, which the process already
holds, are not counted again. The peak is the largest stage.
"""

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from hvpopt.curvature.kronecker import kronecker_fit_memory
from hvpopt.influence.factored import factored_directions_like, factored_scoring_memory
from hvpopt.influence.inverse_curvature import placed
from hvpopt.types import PyTree

__all__ = ["kronecker_memory"]


def kronecker_memory(
    model: tuple[Callable, Callable],
    params: PyTree,
    curvature_data: tuple[Any, Any],
    train: tuple[Any, Any],
    num_queries: int,
    *,
    factors_bytes: int | None = None,
    kind: str = "ekfac",
    fisher: str = "sampled",
    mc_samples: int = 1,
    chunk_size: int = 64,
    mesh: Mesh | None = None,
    embeddings: bool = False,
    query_rank: int | None = None,
    score_dtype: str | None = None,
) -> dict[str, int]:
    """Bytes per stage of K-FAC / EK-FAC influence (``fit``, ``query directions``, ``scoring``), beyond the
    parameters; with ``factors_bytes``, the size of factors fitted already, there is no ``fit`` stage.

    Arguments as for :func:`hvpopt.influence.fit_inverse_curvature` and
    :func:`hvpopt.influence.pairwise_scores`.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> params = {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}
      >>> model = (lambda p, x: x @ p["w"] + p["b"], hvpopt.losses.softmax_cross_entropy)
      >>> x = jax.random.normal(jax.random.key(0), (16, 3)); y = jnp.arange(16) % 2
      >>> sorted(hvpopt.influence.kronecker_memory(model, params, (x, y), (x, y), 4))
      ['fit', 'query directions', 'scoring']
    """
    leaves = jax.tree.leaves(params)
    params_bytes = sum(leaf.nbytes for leaf in leaves)
    one = jax.tree.map(lambda x: x[:1], train[0])
    directions = factored_directions_like(model, params, one, num_queries, query_rank=query_rank,
                                          score_dtype=score_dtype, embeddings=embeddings)  # fmt: skip
    directions_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(directions))
    stages = {}
    if factors_bytes is None:  # placed as the fit will be, so that it reuses this compilation
        fit = kronecker_fit_memory(*model, *placed(params, curvature_data, mesh), kind=kind, fisher=fisher,
                                   mc_samples=mc_samples, chunk_size=chunk_size, mesh=mesh,
                                   embeddings=embeddings)  # fmt: skip
        if fit is None:
            return {}  # the backend does not say
        stages["fit"], factors_bytes = fit.total - params_bytes, fit.outputs
    stages["query directions"] = factors_bytes + directions_bytes + 3 * params_bytes
    scoring = factored_scoring_memory(params, train, directions, chunk_size=chunk_size, mesh=mesh)
    if scoring is None:
        return {}
    stages["scoring"] = factors_bytes + scoring.total - params_bytes
    return stages
