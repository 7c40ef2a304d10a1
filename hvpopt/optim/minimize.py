"""Minimising a function inside a jitted computation: Newton-CG steps in one ``lax.scan``.

A validation protocol retrains a model (leave-one-out retraining, the proximal
Bregman response); a bilevel method solves an inner problem. Both need an
inner minimisation that jits, vmaps and runs as one XLA computation, and say
how far it got: :func:`minimize_newton_cg` runs a fixed number of
:func:`~hvpopt.newton_cg` steps (exact Hessian-vector products, CG to the
Eisenstat-Walker forcing term, backtracking line search) and returns the
parameters with the final value and gradient norm.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
import optax.tree_utils as otu

from hvpopt import _checks
from hvpopt.optim.newton_cg import newton_cg
from hvpopt.types import PyTree

__all__ = ["Minimum", "minimize_newton_cg"]


class Minimum(NamedTuple):
    """The result of :func:`minimize_newton_cg`.

    Attributes:
      params: the parameters after the last step.
      value: ``objective(params)``.
      grad_norm: ``||grad objective(params)||``: how far from stationary the
        result is (a fixed step count, not a tolerance, ends the run).
    """

    params: PyTree
    value: jax.Array
    grad_norm: jax.Array


def minimize_newton_cg(
    objective: Callable[[PyTree], jax.Array], params: PyTree, *, steps: int, **options: Any
) -> Minimum:
    """``steps`` Newton-CG steps on ``objective`` from ``params``, in one ``lax.scan``.

    Each step solves ``(H + damping I) d = -g`` by CG, ``H`` the Hessian of
    ``objective`` at the iterate (forward-over-reverse products), and moves
    along ``d`` by backtracking line search; a quadratic is minimised in one
    step. ``steps`` is static: the loop has a fixed length so that it jits
    and vmaps (over examples left out, for instance).

    Args:
      objective: ``params -> scalar``, twice differentiable.
      params: the starting point, any pytree of floating arrays.
      steps: Newton steps, a positive int.
      **options: keywords of :func:`~hvpopt.newton_cg` (``damping``,
        ``maxiter``, ``forcing``, ``precond``, ...).

    Returns:
      A :class:`Minimum`: the parameters, the final value and gradient norm.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> a, b = jnp.array([[3.0, 1.0], [1.0, 2.0]]), jnp.array([1.0, -1.0])
      >>> f = lambda x: 0.5 * x @ a @ x - b @ x
      >>> result = hvpopt.minimize_newton_cg(f, jnp.zeros(2), steps=2)
      >>> bool(jnp.allclose(result.params, jnp.linalg.solve(a, b))), bool(result.grad_norm < 1e-5)
      (True, True)
    """
    _checks.check_positive_int("steps", steps)
    tx = newton_cg(**options)

    def step(carry, _):
        params, state = carry
        value, grad = jax.value_and_grad(objective)(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(params, updates), state), None

    params = jax.lax.scan(step, (params, tx.init(params)), length=steps)[0][0]
    value, grad = jax.value_and_grad(objective)(params)
    return Minimum(params, value, otu.tree_norm(grad))
