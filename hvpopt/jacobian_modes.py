"""Jacobians in the cheaper autodiff mode.

Forward mode (``jax.jacfwd``) builds a Jacobian one input direction at a time,
reverse mode (``jax.jacrev``) one output direction at a time; each pass costs a
small constant times one evaluation of ``f``. So for ``f: R^n -> R^m`` forward
mode needs ``n`` passes and reverse mode ``m``: forward wins on tall Jacobians
(``n < m``), reverse on wide ones (Griewank & Walther, 2008, chapter 3).

Reference:
  Griewank, Walther, "Evaluating Derivatives", 2nd ed., SIAM 2008.
"""

from collections.abc import Callable
from typing import Any

import jax

from hvpopt import _checks

PyTree = Any

JACOBIAN_MODES = ("auto", "fwd", "rev")


def jacobian(f: Callable, x: PyTree, *args, mode: str = "auto") -> PyTree:
    """Jacobian of ``f(x, *args)`` in ``x``, by forward or reverse mode.

    ``"auto"`` counts the total sizes of the input ``x`` and of the output
    (from ``jax.eval_shape``, nothing is computed) and uses ``jacfwd`` when the
    input is smaller than the output, ``jacrev`` otherwise.

    Args:
      f: ``f(x, *args)`` returning an array or pytree of arrays.
      x: the point, a floating array or pytree of them.
      *args: further arguments of ``f``; not differentiated.
      mode: ``"auto"`` (default), ``"fwd"`` or ``"rev"``.

    Returns:
      What ``jax.jacfwd(f)(x, *args)`` returns: for array input and output, an
      array of shape ``out.shape + x.shape``.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> hvpopt.jacobian(lambda x: jnp.outer(x, x).ravel(), jnp.array([1.0, 2.0]))
      Array([[2., 0.],
             [2., 1.],
             [2., 1.],
             [0., 4.]], dtype=float32)
    """
    _checks.check_choice("mode", mode, JACOBIAN_MODES)
    _checks.check_floating("x", x)
    if mode == "auto":
        mode = "fwd" if jacobian_mode_prefers_forward(f, x, *args) else "rev"
    transform = jax.jacfwd if mode == "fwd" else jax.jacrev
    return transform(lambda x_: f(x_, *args))(x)


def jacobian_mode_prefers_forward(f: Callable, x: PyTree, *args) -> bool:
    """Whether forward mode is cheaper: the input of ``f`` is smaller than its output."""
    out = jax.eval_shape(lambda x_: f(x_, *args), x)
    return _size(x) < _size(out)


def _size(tree: PyTree) -> int:
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))
