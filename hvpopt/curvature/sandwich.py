"""Products with matrices of the form ``J^T M J``.

The Gauss-Newton matrix, the Fisher information and the empirical Fisher all
have this form: ``J`` is the Jacobian of some function of the parameters (model
outputs, or per-example losses) and ``M`` a small matrix acting on its outputs.
The function is linearized once (``jax.linearize``); ``J v`` is its tangent map
and ``J^T u`` the transpose of that same linear map (``jax.linear_transpose``),
so one forward pass serves every product (Schraudolph, 2002).

Reference:
  Schraudolph, "Fast curvature matrix-vector products for second-order
  gradient descent", Neural Computation 2002.
"""

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
MatVec = Callable[[PyTree], PyTree]


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
    outputs, jvp_fn = jax.linearize(fn, params)
    transpose_fn = jax.linear_transpose(jvp_fn, params)
    middle_matvec = middle(outputs)
    return lambda v: transpose_fn(middle_matvec(jvp_fn(v)))[0]
