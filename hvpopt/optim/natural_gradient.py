"""Natural gradient descent (Amari, 1998) with a damped Fisher solved by CG, as an optax transformation.

The update is ``-t (F + lambda I)^{-1} g`` with ``F`` the Fisher information of
the model's predictive distribution on a curvature batch and ``t`` the
``learning_rate``, or, when ``update`` gets ``value_fn``, the first step of a
backtracking (Armijo) line search from ``learning_rate`` that makes the loss
decrease (a fixed step can blow the loss up at small damping):

* ``"true"``: the expectation over the model's own predictions, in closed form
  (for softmax cross-entropy and squared error it equals the Gauss-Newton matrix);
* ``"monte_carlo"``: targets sampled from the model (``num_samples`` per
  example), an unbiased estimate of the true Fisher;
* ``"empirical"``: the observed targets' gradient outer products,
  ``(1/N) sum_i g_i g_i^T``; cheap but not the Fisher (Kunstner et al., 2019).

References:
  Amari, "Natural gradient works efficiently in learning", Neural Computation 1998.
  Martens, "New insights and perspectives on the natural gradient method", JMLR 2020.
  Kunstner, Hennig, Balles, "Limitations of the empirical Fisher approximation
  for natural gradient descent", NeurIPS 2019.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from hvpopt import _checks
from hvpopt.curvature.fisher import empirical_fisher_operator, fisher_operator, mc_fisher_operator
from hvpopt.linalg.conjugate_gradient import cg
from hvpopt.optim._common import backtracking_line_search, require, skip_step, step_or_skip
from hvpopt.tree import all_finite

FISHERS = ("true", "monte_carlo", "empirical")


class NaturalGradientState(NamedTuple):
    """The sampling key and diagnostics (counters are cumulative).

    Attributes:
      count: steps taken, skipped ones included.
      key: the key of the next Monte-Carlo Fisher.
      cg_iterations: CG iterations of the last step.
      num_fisher_products: Fisher-vector products so far.
      num_value_evals: loss evaluations of the line searches so far.
      residual_norm: CG's residual of the last solve.
      step_size: the step taken (``learning_rate``, or the line search's; 0 if none decreased the loss).
      skipped_steps: steps skipped for a non-finite loss or gradient.
    """

    count: jax.Array
    key: jax.Array
    cg_iterations: jax.Array
    num_fisher_products: jax.Array
    num_value_evals: jax.Array
    residual_norm: jax.Array
    step_size: jax.Array
    skipped_steps: jax.Array


def natural_gradient(
    model_fn: Callable,
    loss: Callable,
    *,
    learning_rate: float = 1.0,
    damping: float = 1e-3,
    fisher: str = "true",
    num_samples: int = 1,
    maxiter: int = 20,
    rtol: float = 1e-4,
    key: jax.Array | None = None,
    precond: Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Natural gradient: ``-t (F + damping I)^{-1} g``, solved by CG.

    Called as::

      updates, state = tx.update(grads, state, params, curvature_batch=(inputs, targets),
                                 value=loss, grad=grads, value_fn=f)

    with ``curvature_batch`` the inputs and targets of the Fisher (often the
    gradient batch). ``value``, ``grad`` and ``value_fn`` are optional: with
    ``value_fn`` (the loss on the batch) the step ``t`` is line-searched from
    ``learning_rate``, without it ``t = learning_rate``. A non-finite ``value``
    or gradient skips the step.

    Args:
      model_fn: ``(params, inputs) -> outputs``.
      loss: a :class:`hvpopt.losses.Loss` (its sampling law and output Hessian
        give the Fisher).
      learning_rate: the step along the natural gradient (the first one the
        line search tries).
      damping: ``lambda > 0`` added to the Fisher's diagonal.
      fisher: ``"true"``, ``"monte_carlo"`` or ``"empirical"``.
      num_samples: sampled targets per example for ``"monte_carlo"``.
      maxiter: most CG iterations per step.
      rtol: CG's relative residual tolerance.
      key: the random key of ``"monte_carlo"`` (required there).
      precond: None, or ``(params, curvature_batch, damping) -> (r -> M^{-1} r)``,
        called at every step to precondition CG with ``M``, e.g.
        :func:`hvpopt.kronecker_preconditioner`.
    """
    _checks.check_choice("fisher", fisher, FISHERS)
    if precond is not None and not callable(precond):
        raise TypeError(
            f"precond must be a callable (params, curvature_batch, damping) -> (r -> M^-1 r); got {precond!r}."
        )
    if fisher == "monte_carlo" and key is None:
        raise ValueError("natural_gradient(fisher='monte_carlo') needs key=jax.random.key(seed).")

    def init(params: Any) -> NaturalGradientState:
        zero = jnp.zeros([], jnp.int32)
        start = jax.random.key(0) if key is None else key
        return NaturalGradientState(
            zero, start, zero, zero, zero, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32), zero
        )

    def update(
        updates,
        state: NaturalGradientState,
        params=None,
        *,
        value=None,
        grad=None,
        value_fn=None,
        curvature_batch=None,
        **extra_args,
    ):
        del extra_args
        require("params", params, "natural_gradient", "the current parameters, as the third argument.")
        require(
            "curvature_batch",
            curvature_batch,
            "natural_gradient",
            "(inputs, targets) of the batch whose Fisher is the curvature.",
        )
        grad = updates if grad is None else grad
        if value is None and value_fn is not None:
            value = value_fn(params)
        inputs, targets = curvature_batch
        sample_key, next_key = jax.random.split(state.key)

        def step():
            if fisher == "true":
                matvec = fisher_operator(model_fn, loss, params, inputs, targets)
            elif fisher == "monte_carlo":
                matvec = mc_fisher_operator(
                    model_fn, loss, params, inputs, targets, key=sample_key, num_samples=num_samples
                )
            else:
                example_loss = lambda p, example: loss(
                    model_fn(p, example[0][None]), jax.tree.map(lambda t: t[None], example[1])
                )
                matvec = empirical_fisher_operator(example_loss, params, (inputs, targets))
            preconditioner = None if precond is None else precond(params, curvature_batch, damping)
            solve = cg(matvec, grad, damping=damping, rtol=rtol, maxiter=maxiter, precond=preconditioner)
            direction = otu.tree_scale(-1.0, solve.x)
            if value_fn is None:
                step_size, evaluations = jnp.asarray(learning_rate), 0
            else:
                step_size, evaluations = backtracking_line_search(
                    value_fn,
                    params,
                    direction,
                    value,
                    otu.tree_vdot(grad, direction),
                    learning_rate,
                    shrink=0.5,
                    sufficient_decrease=1e-4,
                    max_steps=20,
                )
            new_state = NaturalGradientState(
                count=state.count + 1,
                key=next_key,
                cg_iterations=solve.iterations,
                num_fisher_products=state.num_fisher_products + solve.num_matvecs,
                num_value_evals=state.num_value_evals + evaluations,
                residual_norm=solve.residual_norm.astype(state.residual_norm.dtype),
                step_size=step_size.astype(state.step_size.dtype),
                skipped_steps=state.skipped_steps,
            )
            return otu.tree_cast_like(otu.tree_scale(step_size, direction), grad), new_state

        skip = lambda: skip_step(grad, state, key=next_key, step_size=jnp.zeros_like(state.step_size))
        finite = all_finite(jnp.zeros([]) if value is None else value, grad)
        return step_or_skip(finite, step, skip)

    return optax.GradientTransformationExtraArgs(init, update)
