"""Truncated Newton (Newton-CG) with a line search, as an optax transformation.

Each step solves the Newton system ``(H + lambda I) p = -g`` only
approximately, by conjugate gradient on Hessian-vector products, to the
forcing tolerance ``||r|| <= eta_k ||g_k||``. By default ``eta_k`` is
Eisenstat and Walker's (1996) choice 1,

.. math:: \\eta_k = \\frac{\\big|\\, \\|g_k\\| - \\|g_{k-1} + t_{k-1} H_{k-1} p_{k-1}\\| \\,\\big|}{\\|g_{k-1}\\|},

how badly the last step's linear model predicted the new gradient: loose where
the model is poor (far from a minimum), tight where it is good (near one, or on
a quadratic, where it is exact), so the steps converge superlinearly. It is a
ratio of gradient norms and does not change when the loss is rescaled, unlike
Nocedal and Wright's ``min(0.5, sqrt(||g||))``. ``eta_0 = 0.1``, and ``eta_k``
stays in ``[sqrt(eps), 0.1]``: below ``sqrt(eps)`` of the dtype rounding, not
CG, limits the residual. Measured in float64: on a 40-parameter quadratic of
condition 1e6 the Nocedal-Wright rule (with 50 CG iterations a step) leaves
``||g|| = 4e-6`` after 60 steps, scipy's Newton-CG (its rule in L1 norms) takes
9 steps, this rule 2. An upper bound of 0.5 rather than 0.1 takes more steps
on extended Rosenbrock (n = 6: 31 against 22), and Eisenstat and Walker's
safeguard ``eta_k >= eta_{k-1}^{(1+sqrt 5)/2}`` doubles the steps on
quadratics (4 against 2), so neither is used.

CG stops early at a direction of non-positive curvature and keeps its last
iterate (a descent direction); if that happens at the first iteration the step
falls back to steepest descent ``-g``. A backtracking (Armijo) line search from
``learning_rate`` then makes every accepted step decrease the loss.

References:
  Nocedal, Wright, "Numerical optimization", 2nd ed., Springer 2006, ch. 7.1.
  Dembo, Eisenstat, Steihaug, "Inexact Newton methods", SIAM J. Numer. Anal. 1982.
  Eisenstat, Walker, "Choosing the forcing terms in an inexact Newton method",
  SIAM J. Sci. Comput. 1996.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from hvpopt import _checks
from hvpopt.curvature.hvp import hessian_operator
from hvpopt.linalg.conjugate_gradient import CGStatus, cg
from hvpopt.optim._common import backtracking_line_search, require, skip_step, step_or_skip
from hvpopt.tree import all_finite

#: The most CG iterations per step when ``maxiter=None``, whatever the size.
MAX_CG_BUDGET = 1000

#: The loosest forcing term ``eta`` of the default rule (and the first one).
MAX_FORCING = 0.1

Preconditioner = Callable[[Any, Any], Callable[[Any], Any]]


class NewtonCGState(NamedTuple):
    """Diagnostics a user logs; counters are cumulative, the rest describe the last step.

    Attributes:
      count: steps taken, skipped ones included.
      cg_iterations: CG iterations of the last step.
      cg_status: the :class:`hvpopt.CGStatus` of the last step's CG
        (``NON_FINITE`` for a step skipped for a non-finite loss or gradient).
      cg_budget_exhausted_count: steps whose CG used its whole ``maxiter``
        without reaching the forcing tolerance.
      forcing: the CG tolerance ``eta`` of the last step.
      num_hvps: Hessian-vector products of CG so far (a preconditioner's own
        products are not counted).
      num_value_evals: loss evaluations of the line searches so far.
      step_size: the line-search step of the last step (0 if none was accepted).
      negative_curvature_count: steps whose CG met non-positive curvature.
      skipped_steps: steps skipped for a non-finite loss or gradient.
      grad_norm: ``||g||`` at the last step (for the forcing rule).
      predicted_grad_norm: ``||g + t H p||`` the last step's linear model
        predicts at the new point (for the forcing rule).
      previous_solution: the last step's CG solution, the next one's start
        (``None`` without ``warm_start``).
    """

    count: jax.Array
    cg_iterations: jax.Array
    cg_status: jax.Array
    cg_budget_exhausted_count: jax.Array
    forcing: jax.Array
    num_hvps: jax.Array
    num_value_evals: jax.Array
    step_size: jax.Array
    negative_curvature_count: jax.Array
    skipped_steps: jax.Array
    grad_norm: jax.Array
    predicted_grad_norm: jax.Array
    previous_solution: Any


def cg_budget(num_params: int) -> int:
    """The default CG iterations per step: ``min(20 P, MAX_CG_BUDGET)`` for ``P`` parameters.

    ``20 P`` is scipy's budget. In exact arithmetic ``P`` iterations solve the
    system, but in floating point CG loses orthogonality on a badly conditioned
    one and needs more: measured in float64 on 200-parameter quadratics,
    ``||r|| <= 0.5 ||b||`` takes 411 iterations at condition 1e6 and 2032 at
    condition 1e8 (``sqrt(eps) ||b||``: 3166 and 16930). The cap bounds a step of
    a large model at ``MAX_CG_BUDGET`` Hessian-vector products (two to three
    gradients' cost each), spent only where CG misses its tolerance, which
    ``NewtonCGState.cg_budget_exhausted_count`` reports; from 50 parameters up the
    cap binds, so a small but very badly conditioned problem may need more
    steps than scipy's (see ``maxiter``).
    """
    return max(1, min(20 * num_params, MAX_CG_BUDGET))


def newton_cg(
    learning_rate: float = 1.0,
    *,
    damping: float = 0.0,
    maxiter: int | None = None,
    forcing: float | None = None,
    precond: Preconditioner | None = None,
    warm_start: bool = False,
    shrink: float = 0.5,
    sufficient_decrease: float = 1e-4,
    max_linesearch_steps: int = 30,
    hvp_mode: str = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Newton-CG with Eisenstat-Walker forcing terms and a backtracking line search.

    Called the way ``optax.lbfgs`` is::

      updates, state = tx.update(grads, state, params, value=loss, grad=grads, value_fn=f)

    with ``f(params) -> scalar`` the loss on the current batch. The update is
    ``t p`` with ``p`` the truncated-CG solution of ``(H + damping I) p = -g``
    and ``t`` the line-search step (``params`` unchanged where the loss or
    gradient is not finite, or no step decreases the loss).

    Args:
      learning_rate: the first step the line search tries (1 is Newton's step).
      damping: ``lambda >= 0`` added to the Hessian's diagonal.
      maxiter: most CG iterations (Hessian-vector products) per step; None for
        :func:`cg_budget` of the number of parameters, ``min(20 P, 1000)``.
        ``state.cg_budget_exhausted_count`` counts the steps that ran out.
      forcing: a fixed CG tolerance ``eta`` (``||r|| <= eta ||g||``); None for
        Eisenstat and Walker's choice 1 in ``[sqrt(eps), 0.1]`` (see the
        module). A small value gives (nearly) exact Newton steps.
      precond: None, or ``(hessian, params) -> (r -> M^{-1} r)``, called at
        every step with the Hessian operator, to precondition CG with ``M``
        (symmetric positive definite), e.g. a Jacobi diagonal::

          precond=lambda hessian, params: hvpopt.jacobi_preconditioner(
              hvpopt.hutchinson_diagonal(hessian, params, key=key, num_samples=8))

      warm_start: start CG from the last step's solution (one more product
        per step). Measured, it helps along curved valleys (extended
        Rosenbrock, n = 2: 26 steps and 69 products against 61 and 113;
        n = 100: 1138 products against 1707) but not on convex problems (a
        200-parameter quadratic of condition 1e6: 7 steps against 4; logistic
        regression: 79 products against 57), so it is off by default.
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
    if maxiter is not None:
        maxiter = _checks.check_positive_int("maxiter", maxiter)
    _checks.check_nonnegative("damping", damping, finite=True)
    if forcing is not None:
        _checks.check_nonnegative("forcing", forcing)
    if precond is not None and not callable(precond):
        raise TypeError(f"precond must be a callable (hessian, params) -> (r -> M^-1 r); got {precond!r}.")

    def init(params: Any) -> NewtonCGState:
        zero = jnp.zeros([], jnp.int32)
        real = jnp.zeros([], ravel_pytree(params)[0].dtype)
        return NewtonCGState(
            count=zero,
            cg_iterations=zero,
            cg_status=jnp.asarray(CGStatus.CONVERGED, jnp.int32),
            cg_budget_exhausted_count=zero,
            forcing=real,
            num_hvps=zero,
            num_value_evals=zero,
            step_size=jnp.zeros([]),
            negative_curvature_count=zero,
            skipped_steps=zero,
            grad_norm=real,
            predicted_grad_norm=real,
            previous_solution=otu.tree_zeros_like(params) if warm_start else None,
        )

    def update(updates, state: NewtonCGState, params=None, *, value=None, grad=None, value_fn=None, **extra_args):
        del extra_args
        require("params", params, "newton_cg", "the current parameters, as the third argument.")
        require("value_fn", value_fn, "newton_cg", "the loss on the current batch, params -> scalar.")
        grad = updates if grad is None else grad
        value = value_fn(params) if value is None else value
        budget = cg_budget(ravel_pytree(params)[0].size) if maxiter is None else maxiter

        def step():
            grad_norm = otu.tree_norm(grad).astype(state.grad_norm.dtype)
            eta = _forcing_term(state, grad_norm) if forcing is None else jnp.asarray(forcing, grad_norm.dtype)
            hessian = hessian_operator(value_fn, params, mode=hvp_mode)
            preconditioner = None if precond is None else precond(hessian, params)
            x0 = state.previous_solution if warm_start else None
            solve = cg(hessian, grad, x0=x0, damping=damping, rtol=eta, maxiter=budget, precond=preconditioner)
            newton = otu.tree_scale(-1.0, solve.x)
            slope = otu.tree_vdot(grad, newton)
            descent = slope < 0
            direction = jax.tree.map(lambda n, g: jnp.where(descent, n, -g), newton, grad)
            slope = jnp.where(descent, slope, -(grad_norm**2))
            step_size, evaluations = backtracking_line_search(
                value_fn,
                params,
                direction,
                value,
                slope,
                learning_rate,
                shrink=shrink,
                sufficient_decrease=sufficient_decrease,
                max_steps=max_linesearch_steps,
            )
            # The linear model's gradient at params + t p is (1 - t) g - t r, r the
            # CG residual, orthogonal to g; steepest descent predicts (1 - t) g.
            t = step_size.astype(grad_norm.dtype)
            residual = jnp.where(descent, solve.residual_norm.astype(grad_norm.dtype), 0.0)
            predicted = jnp.hypot((1 - t) * grad_norm, t * residual)
            new_state = NewtonCGState(
                count=state.count + 1,
                cg_iterations=solve.iterations,
                cg_status=solve.status,
                cg_budget_exhausted_count=state.cg_budget_exhausted_count + (solve.status == CGStatus.MAX_ITERATIONS),
                forcing=eta,
                num_hvps=state.num_hvps + solve.num_matvecs,
                num_value_evals=state.num_value_evals + evaluations,
                step_size=step_size.astype(state.step_size.dtype),
                negative_curvature_count=state.negative_curvature_count + solve.negative_curvature,
                skipped_steps=state.skipped_steps,
                grad_norm=grad_norm,
                predicted_grad_norm=predicted,
                previous_solution=solve.x if warm_start else None,
            )
            return otu.tree_cast_like(otu.tree_scale(step_size, direction), grad), new_state

        skip = lambda: skip_step(
            grad,
            state,
            step_size=jnp.zeros_like(state.step_size),
            cg_status=jnp.asarray(CGStatus.NON_FINITE, jnp.int32),
        )
        return step_or_skip(all_finite(value, grad), step, skip)

    return optax.GradientTransformationExtraArgs(init, update)


def _forcing_term(state: NewtonCGState, grad_norm: jax.Array) -> jax.Array:
    """Eisenstat and Walker's choice 1, in ``[sqrt(eps), MAX_FORCING]``; ``MAX_FORCING`` at the first step."""
    floor = jnp.sqrt(jnp.finfo(grad_norm.dtype).eps)
    first = state.grad_norm == 0  # no step taken yet
    previous = jnp.where(first, 1.0, state.grad_norm)
    eta = jnp.where(first, MAX_FORCING, jnp.abs(grad_norm - state.predicted_grad_norm) / previous)
    return jnp.clip(eta, floor, MAX_FORCING)
