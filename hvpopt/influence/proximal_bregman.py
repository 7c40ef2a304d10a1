"""The proximal Bregman response (Bae et al., 2022): what influence scores estimate on a non-convex model.

Leave-one-out retraining of a network is not what an influence function
predicts: training is non-convex, does not reach a minimum, and depends on the
run. What Gauss-Newton influence with damping ``lambda`` does approximate to
first order is the minimiser of the proximal Bregman objective

.. math:: \\theta^\\star_j = \\arg\\min_\\theta \\frac{1}{m}\\sum_{i=1}^m
   D_L\\big(f(\\theta, x_i), f(\\theta_s, x_i); y_i\\big)
   - \\frac{1}{n}\\, l_j(\\theta) + \\frac{\\lambda}{2}\\|\\theta - \\theta_s\\|^2,

with ``D_L(z, z_s) = L(z) - L(z_s) - \\nabla L(z_s)^\\top (z - z_s)`` the
Bregman divergence of the output loss, ``theta_s`` the trained parameters and
``m`` curvature examples. Its gradient at ``theta_s`` is ``-(1/n) grad l_j``
and its Hessian there ``G + lambda I`` (minus ``(1/n) grad^2 l_j``), so
``L_q(theta*_j) - L_q(theta_s) ~ score[q, j]``, and the remaining difference is
the nonlinearity the linear estimate leaves out plus each method's own error.

Reference:
  Bae, Ng, Lo, Ghassemi, Grosse, "If influence functions are the answer, then
  what is the question?", NeurIPS 2022.
"""

from collections.abc import Callable
from typing import Any

import jax
import optax.tree_utils as otu

from hvpopt.optim import minimize_newton_cg
from hvpopt.types import PyTree


def proximal_bregman_response(
    loss_fn: Callable,
    model: tuple[Callable, Callable],
    params: PyTree,
    data: Any,
    example: Any,
    *,
    num_train: int,
    damping: float,
    steps: int = 4,
    maxiter: int = 50,
) -> PyTree:
    """``theta*_j``: the parameters minimising the proximal Bregman objective for removing ``example``.

    Minimised from ``params`` by ``steps`` Newton-CG steps (each up to
    ``maxiter`` Hessian-vector products, forcing tolerance 1e-6, with a line
    search). Jittable; vmap over ``example`` to treat several at once.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of one example.
      model: ``(model_fn, output_loss)``: ``model_fn(params, inputs) -> outputs``
        and ``output_loss(outputs, targets) -> scalar``, the mean over a batch.
      params: the trained parameters ``theta_s``.
      data: ``(inputs, targets)`` of the ``m`` examples of the Bregman term
        (the curvature examples of the scores being checked).
      example: the training example removed, ``(inputs, targets)`` without a
        leading axis.
      num_train: ``n``, the size of the training set (the example's weight is ``1/n``).
      damping: ``lambda > 0``, the proximity weight (the scores' damping).
      steps, maxiter: Newton-CG steps and CG iterations per step.
    """
    model_fn, output_loss = model
    inputs, targets = data
    outputs = model_fn(params, inputs)
    base, output_grad = jax.value_and_grad(output_loss)(outputs, targets)

    def objective(theta):
        moved = model_fn(theta, inputs)
        bregman = output_loss(moved, targets) - base - otu.tree_vdot(output_grad, otu.tree_sub(moved, outputs))
        proximity = 0.5 * damping * otu.tree_norm(otu.tree_sub(theta, params), squared=True)
        return bregman - loss_fn(theta, example) / num_train + proximity

    return minimize_newton_cg(objective, params, steps=steps, forcing=1e-6, maxiter=maxiter).params
