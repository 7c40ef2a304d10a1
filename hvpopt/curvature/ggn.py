"""Generalized Gauss-Newton products ``J^T H_L J v``.

For a loss ``L(theta) = loss_fn(model_fn(theta, inputs), targets)`` the
generalized Gauss-Newton (GGN) matrix is ``G = J^T H_L J``, with ``J`` the
Jacobian of the model outputs in the parameters and ``H_L`` the Hessian of the
loss in the outputs. It drops the second-order term of the model from the
Hessian, and is positive semi-definite whenever the loss is convex in the
outputs (Schraudolph, 2002; Martens, 2020).

Reference:
  Martens, "New insights and perspectives on the natural gradient method",
  JMLR 2020, section 8.
"""

from collections.abc import Callable
from typing import Any

from hvpopt import _checks
from hvpopt.curvature.hvp import hessian_operator
from hvpopt.curvature.sandwich import sandwich_operator
from hvpopt.losses import Loss
from hvpopt.types import MatVec, PyTree


def output_hessian(loss_fn: Callable, outputs: Any, targets: Any) -> MatVec:
    """``u -> H_L u``, the Hessian of ``loss_fn(outputs, targets)`` in ``outputs``.

    A :class:`hvpopt.losses.Loss` gives its closed form; any other callable
    falls back to the forward-over-reverse product in the outputs.
    """
    if isinstance(loss_fn, Loss):
        return loss_fn.output_hessian(outputs, targets)
    return hessian_operator(loss_fn, outputs, targets)


def ggn_operator(model_fn: Callable, loss_fn: Callable, params: PyTree, inputs: Any, targets: Any) -> MatVec:
    """The Gauss-Newton matrix at ``params`` as a matvec ``v -> J^T H_L J v``.

    The model is linearized once; each product costs one linear forward and
    one linear backward pass through the model.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs`` (logits, say).
      loss_fn: ``loss_fn(outputs, targets) -> scalar``. Pass one of
        :mod:`hvpopt.losses` for a closed-form ``H_L``; any other callable uses
        forward-over-reverse in the outputs.
      params: any pytree of floating arrays.
      inputs: the model's inputs.
      targets: the loss's targets.

    Returns:
      A function from a pytree like ``params`` to ``G v`` like ``params``.
    """
    _checks.check_floating("params", params)
    matvec = sandwich_operator(
        lambda p: model_fn(p, inputs),
        params,
        lambda outputs: output_hessian(loss_fn, outputs, targets),
    )
    return _checks.checked_matvec(matvec, params)


def ggn_vp(model_fn: Callable, loss_fn: Callable, params: PyTree, v: PyTree, inputs: Any, targets: Any) -> PyTree:
    """Gauss-Newton-vector product ``J^T H_L J v``.

    .. math:: G v = J^\\top H_L J v,\\quad J = \\partial\\, \\mathrm{model}(\\theta, x)
       / \\partial\\theta,\\quad H_L = \\nabla^2_{z}\\, \\mathrm{loss}(z, y)

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``.
      loss_fn: ``loss_fn(outputs, targets) -> scalar``; see :func:`ggn_operator`.
      params: any pytree of floating arrays.
      v: a pytree with the structure and shapes of ``params``.
      inputs: the model's inputs.
      targets: the loss's targets.

    Returns:
      ``G v`` with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> model_fn = lambda w, x: x @ w
      >>> x, y = jnp.eye(3)[:, :2], jnp.array([0, 1, 1])
      >>> w, v = jnp.zeros((2, 2)), jnp.ones((2, 2))
      >>> hvpopt.ggn_vp(model_fn, hvpopt.losses.softmax_cross_entropy, w, v, x, y)
      Array([[0., 0.],
             [0., 0.]], dtype=float32)
    """
    _checks.check_like("v", v, "params", params)
    return ggn_operator(model_fn, loss_fn, params, inputs, targets)(v)
