"""Products with matrices of the form ``J^T M J``.

The Gauss-Newton matrix, the Fisher information and the empirical Fisher all
have this form: ``J`` is the Jacobian of some function of the parameters (model
outputs, or per-example losses) and ``M`` a small matrix acting on its outputs.
The function is linearized once (``jax.linearize``); ``J v`` is its tangent map
and ``J^T u`` the transpose of that same linear map (``jax.linear_transpose``),
so one forward pass serves every product (Schraudolph, 2002). Where forward
mode is undefined in the function (a ``custom_vjp`` inside it), ``J v`` is
computed as the VJP of the linear map ``u -> J^T u`` instead, with a warning.

Reference:
  Schraudolph, "Fast curvature matrix-vector products for second-order
  gradient descent", Neural Computation 2002.
"""

from collections.abc import Callable

import jax

from hvpopt.curvature.forward_mode import try_linearize, warn_reverse_fallback
from hvpopt.types import MatVec, PyTree


def sandwich_operator(
    fn: Callable[[PyTree], PyTree],
    params: PyTree,
    middle: Callable[[PyTree], MatVec],
) -> MatVec:
    """``v -> J^T M J v`` with ``J`` the Jacobian of ``fn`` at ``params``.

    Args:
      fn: ``fn(params) -> outputs``.
      params: the point of linearization.
      middle: ``middle(outputs) -> (u -> M u)``, given the primal outputs.

    Returns:
      The matvec; it reuses one linearization of ``fn`` for every product.
    """
    linearized, reason = try_linearize(fn, params)
    if linearized is not None:
        outputs, jvp = linearized
        transpose = jax.linear_transpose(jvp, params)
        vjp = lambda u: transpose(u)[0]
    else:
        warn_reverse_fallback(reason, "Jacobian-vector product J v")
        outputs, vjp_fn = jax.vjp(fn, params)
        vjp = lambda u: vjp_fn(u)[0]
        jvp = lambda v: jax.vjp(vjp, outputs)[1](v)[0]
    middle_matvec = middle(outputs)
    return lambda v: vjp(middle_matvec(jvp(v)))
