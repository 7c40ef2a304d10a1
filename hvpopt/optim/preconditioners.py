"""Preconditioners for the optimizers' conjugate-gradient solves, fitted at every step.

A preconditioner factory is called by :func:`hvpopt.hessian_free` and
:func:`hvpopt.natural_gradient` at every step as ``precond(params,
curvature_batch, damping)`` and returns ``r -> M^{-1} r``: CG then converges in
a number of iterations set by the spectrum of ``M^{-1} (C + damping I)``
rather than of ``C + damping I``.
"""

from collections.abc import Callable
from typing import Any

import jax

from hvpopt.curvature.kronecker import fit_kronecker_factors, kronecker_inverse
from hvpopt.losses import Loss
from hvpopt.types import MatVec, PyTree

__all__ = ["kronecker_preconditioner"]


def kronecker_preconditioner(
    model_fn: Callable,
    loss: Loss,
    *,
    kind: str = "kfac",
    fisher: str = "sampled",
    key: jax.Array | None = None,
    chunk_size: int = 64,
) -> Callable[[PyTree, Any, Any], MatVec]:
    """``(params, curvature_batch, damping) -> (C_KFAC + damping I)^{-1}``, K-FAC fitted on the batch.

    The factors are fitted inside the optimizer's step
    (:func:`hvpopt.fit_kronecker_factors` on ``curvature_batch``), so the
    preconditioner follows the parameters; its cost is about two
    backpropagations of the batch, against one Gauss-Newton product per CG
    iteration saved. With ``fisher="sampled"`` every step draws from the same
    ``key`` (the batches differ, so the draws do).

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``.
      loss: one of :mod:`hvpopt.losses`.
      kind: ``"kfac"`` or ``"ekfac"`` (one more pass over the batch).
      fisher: one of :data:`hvpopt.curvature.FISHER_TARGETS`.
      key: the sampled labels' key (default ``jax.random.key(0)``).
      chunk_size: examples per chunk of the fit.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> model_fn = lambda p, x: x @ p["w"] + p["b"]
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> x = jax.random.normal(jax.random.key(0), (32, 3)); y = (x[:, 0] > 0).astype(jnp.int32)
      >>> loss = hvpopt.losses.softmax_cross_entropy
      >>> precond = hvpopt.kronecker_preconditioner(model_fn, loss, fisher="closed_form")
      >>> tx = hvpopt.hessian_free(model_fn, loss, precond=precond)  # or natural_gradient(..., precond=precond)
      >>> jax.tree.map(jnp.shape, precond(params, (x, y), 1e-3)(params))  # (C + 1e-3 I)^-1 applied
      {'b': (2,), 'w': (3, 2)}
    """

    def precond(params: PyTree, curvature_batch: Any, damping: Any) -> MatVec:
        factors = fit_kronecker_factors(
            model_fn, loss, params, tuple(curvature_batch), kind=kind, fisher=fisher, key=key, chunk_size=chunk_size
        )
        return kronecker_inverse(factors, damping=damping)

    return precond
