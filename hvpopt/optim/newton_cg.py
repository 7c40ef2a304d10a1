"""Truncated Newton (Newton-CG) with a line search, as an optax transformation.

Each step solves the Newton system ``(H + lambda I) p = -g`` only
approximately, by conjugate gradient on Hessian-vector products, to the
forcing tolerance ``||r|| <= eta ||g||`` with ``eta = min(0.5, sqrt(||g||))``
(Nocedal & Wright, 2006, algorithm 7.1): loose far from a minimum, tight near
it, which gives superlinear local convergence. ``eta`` stays above
``sqrt(eps)`` of the dtype, where rounding rather than CG limits the residual. CG stops early at a direction of
non-positive curvature and keeps its last iterate (a descent direction); if
that happens at the first iteration the step falls back to steepest descent
``-g``. A backtracking (Armijo) line search from ``learning_rate`` then makes
every accepted step decrease the loss.

References:
  Nocedal, Wright, "Numerical optimization", 2nd ed., Springer 2006, ch. 7.1.
  Dembo, Eisenstat, Steihaug, "Inexact Newton methods", SIAM J. Numer. Anal. 1982.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from hvpopt.curvature.hvp import hessian_operator
from hvpopt.linalg._tree import cast_like
from hvpopt.linalg.conjugate_gradient import cg
from hvpopt.optim._common import all_finite, backtracking_line_search, require, skip_step, step_or_skip


class NewtonCGState(NamedTuple):
    """Diagnostics a user logs; counters are cumulative, the rest describe the last step.

    Attributes:
      count: steps taken, skipped ones included.
      cg_iterations: CG iterations of the last step.
      num_hvps: Hessian-vector products so far.
      num_value_evals: loss evaluations of the line searches so far.
      step_size: the line-search step of the last step (0 if none was accepted).
      negative_curvature_count: steps whose CG met non-positive curvature.
      skipped_steps: steps skipped for a non-finite loss or gradient.
    """

    count: jax.Array
    cg_iterations: jax.Array
    num_hvps: jax.Array
    num_value_evals: jax.Array
    step_size: jax.Array
    negative_curvature_count: jax.Array
    skipped_steps: jax.Array


def newton_cg(learning_rate: float = 1.0, *, damping: float = 0.0, maxiter: int = 50,
              forcing: float | None = None,
              shrink: float = 0.5, sufficient_decrease: float = 1e-4,
              max_linesearch_steps: int = 30, hvp_mode: str = "auto") -> optax.GradientTransformationExtraArgs:
    """Newton-CG with the Nocedal-Wright forcing sequence and a backtracking line search.

    Called the way ``optax.lbfgs`` is::

      updates, state = tx.update(grads, state, params, value=loss, grad=grads, value_fn=f)

    with ``f(params) -> scalar`` the loss on the current batch. The update is
    ``t p`` with ``p`` the truncated-CG solution of ``(H + damping I) p = -g``
    and ``t`` the line-search step (``params`` unchanged where the loss or
    gradient is not finite, or no step decreases the loss).

    Args:
      learning_rate: the first step the line search tries (1 is Newton's step).
      damping: ``lambda >= 0`` added to the Hessian's diagonal.
      maxiter: most CG iterations (Hessian-vector products) per step.
      forcing: a fixed CG tolerance ``eta`` (``||r|| <= eta ||g||``); None for
        Nocedal and Wright's ``min(0.5, sqrt(||g||))``. A small value gives
        (nearly) exact Newton steps.
      shrink: the line search multiplies the step by this until it is accepted.
      sufficient_decrease: Armijo's constant ``c1``.
      max_linesearch_steps: most loss evaluations per line search.
      hvp_mode: mode of :func:`hvpopt.hessian_operator`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, hvpopt
      >>> f = lambda x: jnp.sum((x - 3.0) ** 2) + 0.1 * jnp.sum(x ** 4)
      >>> tx, x = hvpopt.newton_cg(), jnp.zeros(2)
      >>> state = tx.init(x)
      >>> for _ in range(8):
      ...     value, grad = jax.value_and_grad(f)(x)
      ...     updates, state = tx.update(grad, state, x, value=value, grad=grad, value_fn=f)
      ...     x = optax.apply_updates(x, updates)
      >>> float(jnp.linalg.norm(jax.grad(f)(x))) < 1e-5
      True
    """
    def init(params: Any) -> NewtonCGState:
        zero = jnp.zeros([], jnp.int32)
        return NewtonCGState(zero, zero, zero, zero, jnp.zeros([]), zero, zero)

    def update(updates, state: NewtonCGState, params=None, *, value=None, grad=None,
               value_fn=None, **extra_args):
        del extra_args
        require("params", params, "newton_cg", "the current parameters, as the third argument.")
        require("value_fn", value_fn, "newton_cg", "the loss on the current batch, params -> scalar.")
        grad = updates if grad is None else grad
        value = value_fn(params) if value is None else value

        def step():
            grad_norm = otu.tree_norm(grad)
            # Below sqrt(eps) the rounding of the products, not CG, limits the residual.
            floor = jnp.sqrt(jnp.finfo(grad_norm.dtype).eps)
            eta = jnp.clip(jnp.sqrt(grad_norm), floor, 0.5) if forcing is None else forcing
            hessian = hessian_operator(value_fn, params, mode=hvp_mode)
            solve = cg(hessian, grad, damping=damping, rtol=eta, maxiter=maxiter)
            newton = otu.tree_scale(-1.0, solve.x)
            slope = otu.tree_vdot(grad, newton)
            descent = slope < 0
            direction = jax.tree.map(lambda n, g: jnp.where(descent, n, -g), newton, grad)
            slope = jnp.where(descent, slope, -grad_norm ** 2)
            step_size, evaluations = backtracking_line_search(
                value_fn, params, direction, value, slope, learning_rate, shrink=shrink,
                sufficient_decrease=sufficient_decrease, max_steps=max_linesearch_steps,
            )
            new_state = NewtonCGState(
                count=state.count + 1,
                cg_iterations=solve.iterations,
                num_hvps=state.num_hvps + solve.num_matvecs,
                num_value_evals=state.num_value_evals + evaluations,
                step_size=step_size.astype(state.step_size.dtype),
                negative_curvature_count=state.negative_curvature_count + solve.negative_curvature,
                skipped_steps=state.skipped_steps,
            )
            return cast_like(otu.tree_scale(step_size, direction), grad), new_state

        skip = lambda: skip_step(grad, state, step_size=jnp.zeros_like(state.step_size))
        return step_or_skip(all_finite(value, grad), step, skip)

    return optax.GradientTransformationExtraArgs(init, update)


def minimize_newton_cg(objective, params: Any, *, steps: int, **options) -> Any:
    """``steps`` :func:`newton_cg` steps on ``objective(params) -> scalar`` from ``params``, in one ``lax.scan``.

    For an inner minimisation inside a jitted computation (a retraining, a
    response function); ``options`` go to :func:`newton_cg`.
    """
    tx = newton_cg(**options)

    def step(carry, _):
        params, state = carry
        value, grad = jax.value_and_grad(objective)(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, tx.init(params)), length=steps)[0][0]
