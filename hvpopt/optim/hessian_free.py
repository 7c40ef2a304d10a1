"""Hessian-free optimization (Martens, 2010) as an optax transformation.

Each step minimises the damped Gauss-Newton model of the loss,

.. math:: q(p) = g^\\top p + \\tfrac12 p^\\top (G + \\lambda I) p,

by conjugate gradient on Gauss-Newton-vector products over a curvature
mini-batch, with Martens' ingredients:

* CG starts from the previous step's solution times ``warm_start_decay``
  (0.95) and stops by the relative-progress rule (``progress_tol``);
* CG-iterate backtracking: the iterates at iterations ``ceil(1.3^j)`` are kept
  and the one with the lowest loss on the gradient batch is taken (a late CG
  iterate fits the curvature batch, an earlier one often generalises better);
* a backtracking line search on that step (``t <- 0.8 t`` until
  ``f(x + t p) <= f(x) + 0.01 t g^T p``);
* Levenberg-Marquardt damping from the reduction ratio
  ``rho = (f(x + p) - f(x)) / q(p)``: ``lambda`` shrinks by 2/3 when
  ``rho > 3/4`` and grows by 3/2 when ``rho < 1/4``.

Reference:
  Martens, "Deep learning via Hessian-free optimization", ICML 2010.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from hvpopt.curvature.ggn import ggn_operator
from hvpopt.linalg.conjugate_gradient import cg
from hvpopt.optim._common import backtracking_line_search, require, skip_step, step_or_skip
from hvpopt.tree import add_scaled, all_finite


class HessianFreeState(NamedTuple):
    """The warm start, the damping, and diagnostics (counters are cumulative).

    Attributes:
      count: steps taken, skipped ones included.
      previous_solution: the last CG solution (of ``(G + lambda I) x = g``).
      damping: the current ``lambda``.
      cg_iterations: CG iterations of the last step.
      num_ggn_products: Gauss-Newton-vector products so far.
      num_value_evals: loss evaluations (backtracking, line search) so far.
      reduction_ratio: ``rho`` of the last step.
      step_size: the line-search step of the last step (0: rejected).
      negative_curvature_count: steps whose CG met non-positive curvature.
      skipped_steps: steps skipped for a non-finite loss or gradient.
    """

    count: jax.Array
    previous_solution: Any
    damping: jax.Array
    cg_iterations: jax.Array
    num_ggn_products: jax.Array
    num_value_evals: jax.Array
    reduction_ratio: jax.Array
    step_size: jax.Array
    negative_curvature_count: jax.Array
    skipped_steps: jax.Array


def hessian_free(
    model_fn: Callable,
    loss: Callable,
    *,
    learning_rate: float = 1.0,
    initial_damping: float = 1.0,
    maxiter: int = 50,
    progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    damping_decrease: float = 2 / 3,
    damping_increase: float = 3 / 2,
    min_damping: float = 1e-6,
    max_linesearch_steps: int = 20,
    precond: Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Martens' Hessian-free optimizer with Gauss-Newton curvature.

    Called as::

      updates, state = tx.update(grads, state, params, value=loss, grad=grads,
                                 value_fn=f, curvature_batch=(inputs, targets))

    with ``f(params) -> scalar`` the loss on the gradient batch and
    ``curvature_batch`` the inputs and targets whose Gauss-Newton matrix
    ``J^T H_L J`` of ``loss(model_fn(params, inputs), targets)`` is the
    curvature (often a subset of the gradient batch).

    Args:
      model_fn: ``(params, inputs) -> outputs``.
      loss: ``loss(outputs, targets) -> scalar``; a :class:`hvpopt.losses.Loss`
        uses its closed-form output Hessian.
      learning_rate: the first step the line search tries.
      initial_damping: ``lambda`` at the first step.
      maxiter: most CG iterations per step.
      progress_tol: Martens' relative-progress tolerance for stopping CG.
      warm_start_decay: the previous solution, times this, starts CG.
      damping_decrease, damping_increase: factors of the Levenberg-Marquardt rule.
      min_damping: ``lambda`` never goes below this.
      max_linesearch_steps: most loss evaluations of the line search.
      precond: None, or ``(params, curvature_batch, damping) -> (r -> M^{-1} r)``,
        called at every step to precondition CG with ``M``, e.g.
        :func:`hvpopt.kronecker_preconditioner` (K-FAC fitted on the
        curvature batch, damped by the current ``lambda``).
    """
    if precond is not None and not callable(precond):
        raise TypeError(
            f"precond must be a callable (params, curvature_batch, damping) -> (r -> M^-1 r); got {precond!r}."
        )
    save_at = backtracking_iterations(maxiter)

    def init(params: Any) -> HessianFreeState:
        zero = jnp.zeros([], jnp.int32)
        return HessianFreeState(
            zero,
            otu.tree_zeros_like(params),
            jnp.asarray(initial_damping, jnp.float32),
            zero,
            zero,
            zero,
            jnp.zeros([], jnp.float32),
            jnp.zeros([], jnp.float32),
            zero,
            zero,
        )

    def update(
        updates,
        state: HessianFreeState,
        params=None,
        *,
        value=None,
        grad=None,
        value_fn=None,
        curvature_batch=None,
        **extra_args,
    ):
        del extra_args
        require("params", params, "hessian_free", "the current parameters, as the third argument.")
        require("value_fn", value_fn, "hessian_free", "the loss on the gradient batch, params -> scalar.")
        require(
            "curvature_batch",
            curvature_batch,
            "hessian_free",
            "(inputs, targets) of the batch whose Gauss-Newton matrix is the curvature.",
        )
        grad = updates if grad is None else grad
        value = value_fn(params) if value is None else value

        def step():
            inputs, targets = curvature_batch
            ggn = ggn_operator(model_fn, loss, params, inputs, targets)
            x0 = otu.tree_scale(warm_start_decay, state.previous_solution)
            solve = cg(
                ggn,
                grad,
                x0=x0,
                damping=state.damping,
                rtol=1e-10,
                maxiter=maxiter,
                progress_tol=progress_tol,
                save_at=save_at,
                precond=None if precond is None else precond(params, curvature_batch, state.damping),
            )
            # CG-iterate backtracking: the saved iterate (or the last) with the lowest loss. Saves
            # past CG's last iteration are copies of the last iterate and are not evaluated.
            candidates = jax.tree.map(
                lambda saved, last: jnp.concatenate([saved, last[None]]), solve.saved_iterates, solve.x
            )
            reached = jnp.append(jnp.asarray(save_at) < solve.iterations, True)
            loss_of = lambda x: value_fn(add_scaled(params, -1.0, x))
            losses = jax.lax.map(
                lambda c: jax.lax.cond(
                    c[1], lambda: loss_of(c[0]).astype(value.dtype), lambda: jnp.asarray(jnp.inf, value.dtype)
                ),
                (candidates, reached),
            )
            losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
            best = jnp.argmin(losses)
            solution = jax.tree.map(lambda c: c[best], candidates)
            iteration = jnp.concatenate([solve.saved_iterations, solve.iterations[None]])[best]
            model_reduction = solve.model_values[iteration]  # q(p) with p = -solution
            rho = (losses[best] - value) / jnp.minimum(model_reduction, -jnp.finfo(value.dtype).tiny)
            damping = jnp.where(
                rho > 0.75,
                state.damping * damping_decrease,
                jnp.where(rho < 0.25, state.damping * damping_increase, state.damping),
            )
            direction = otu.tree_scale(-1.0, solution)
            step_size, evaluations = backtracking_line_search(
                value_fn,
                params,
                direction,
                value,
                otu.tree_vdot(grad, direction),
                learning_rate,
                shrink=0.8,
                sufficient_decrease=1e-2,
                max_steps=max_linesearch_steps,
                first_trial=losses[best] if learning_rate == 1.0 else None,
            )
            new_state = HessianFreeState(
                count=state.count + 1,
                previous_solution=solve.x,
                damping=jnp.maximum(damping, min_damping).astype(state.damping.dtype),
                cg_iterations=solve.iterations,
                num_ggn_products=state.num_ggn_products + solve.num_matvecs,
                num_value_evals=state.num_value_evals
                + jnp.sum(reached, dtype=state.num_value_evals.dtype)
                + evaluations,
                reduction_ratio=rho.astype(state.reduction_ratio.dtype),
                step_size=step_size.astype(state.step_size.dtype),
                negative_curvature_count=state.negative_curvature_count + solve.negative_curvature,
                skipped_steps=state.skipped_steps,
            )
            return otu.tree_cast_like(otu.tree_scale(step_size, direction), grad), new_state

        skip = lambda: skip_step(grad, state, step_size=jnp.zeros_like(state.step_size))
        return step_or_skip(all_finite(value, grad), step, skip)

    return optax.GradientTransformationExtraArgs(init, update)


def backtracking_iterations(maxiter: int) -> tuple[int, ...]:
    """Martens' CG iterations to keep for backtracking: ``ceil(1.3^j)`` up to ``maxiter``."""
    return tuple(
        sorted({math.ceil(1.3**j) for j in range(int(math.log(maxiter, 1.3)) + 1)} & set(range(1, maxiter + 1)))
    )
