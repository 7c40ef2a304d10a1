"""Jacobians: in the cheaper autodiff mode, and their spectral norm without forming them.

Forward mode (``jax.jacfwd``) builds a Jacobian one input direction at a time,
reverse mode (``jax.jacrev``) one output direction at a time; each pass costs a
small constant times one evaluation of ``f``. So for ``f: R^n -> R^m`` forward
mode needs ``n`` passes and reverse mode ``m``: forward wins on tall Jacobians
(``n < m``), reverse on wide ones (Griewank & Walther, 2008, chapter 3).

The spectral norm ``||J||_2`` (the local Lipschitz constant of a network at a
point, a robustness measure) needs neither: power iteration on ``J^T J`` uses
one forward-mode product ``J v`` and one reverse-mode product ``J^T u`` per
step (Golub & Van Loan, 2013, section 8.2; Virmaux & Scaman, 2018).

References:
  Griewank, Walther, "Evaluating Derivatives", 2nd ed., SIAM 2008.
  Golub, Van Loan, "Matrix Computations", 4th ed., 2013.
  Virmaux, Scaman, "Lipschitz regularity of deep neural networks: analysis and
  efficient estimation", NeurIPS 2018.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from hvpopt import _checks
from hvpopt.types import PyTree

__all__ = ["JACOBIAN_MODES", "SpectralNorm", "jacobian", "jacobian_mode_prefers_forward", "jacobian_spectral_norm"]

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


class SpectralNorm(NamedTuple):
    """The outcome of :func:`jacobian_spectral_norm`.

    Attributes:
      value: the estimate of ``||J||_2`` (a lower bound that converges to it).
      input_vector: the unit input direction ``v`` with ``||J v|| = value``.
      output_vector: ``J v / ||J v||``.
      relative_change: ``|sigma_k - sigma_{k-1}| / sigma_k`` at the last step,
        a convergence gauge.
    """

    value: jax.Array
    input_vector: PyTree
    output_vector: PyTree
    relative_change: jax.Array


def jacobian_spectral_norm(f: Callable, x: PyTree, *args, key: jax.Array, num_iters: int = 20) -> SpectralNorm:
    """Largest singular value of the Jacobian of ``f(x, *args)`` in ``x``, by power iteration.

    .. math:: v_{k+1} = \\frac{J^\\top J v_k}{\\|J^\\top J v_k\\|},\\qquad
       \\sigma_k = \\|J v_k\\| \\to \\|J\\|_2

    ``f`` is linearized once; each step costs one JVP and one VJP (the linear
    transpose of the JVP), never the Jacobian itself. Convergence is linear
    with rate ``(sigma_2 / sigma_1)^2``.

    Args:
      f: ``f(x, *args)`` returning an array or pytree of arrays.
      x: the point, a floating array or pytree of them.
      *args: further arguments of ``f``; not differentiated.
      key: a JAX PRNG key for the starting direction.
      num_iters: power iterations (one more JVP gives the final value).

    Returns:
      A :class:`SpectralNorm`.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> w = jnp.array([[3.0, 0.0], [0.0, 1.0]])
      >>> hvpopt.jacobian_spectral_norm(lambda x: w @ x, jnp.ones(2), key=jax.random.key(0)).value
      Array(3., dtype=float32)
    """
    _checks.check_floating("x", x)
    _checks.check_positive_int("num_iters", num_iters)
    outputs, jvp = jax.linearize(lambda x_: f(x_, *args), x)
    vjp = jax.linear_transpose(jvp, x)
    v = otu.tree_random_like(key, x, jax.random.normal)
    v = otu.tree_scale(1.0 / otu.tree_norm(v), v)

    def step(carry, _):
        v, _ = carry
        jv = jvp(v)
        w = vjp(jv)[0]
        w_norm = otu.tree_norm(w)
        v_next = otu.tree_scale(1.0 / jnp.where(w_norm > 0, w_norm, 1.0), w)
        v_next = jax.tree.map(lambda a, b: jnp.where(w_norm > 0, a, b), v_next, v)
        return (v_next, otu.tree_norm(jv)), None

    zero = jnp.zeros((), ravel_pytree(x)[0].dtype)
    (v, previous), _ = jax.lax.scan(step, (v, zero), None, length=num_iters)
    # sigma is stationary in v at the top singular vector, so its gradient is
    # u^T dJ v with v held fixed: no need to differentiate the iterations.
    v = jax.lax.stop_gradient(v)
    jv = jvp(v)
    squared = otu.tree_vdot(jv, jv)
    positive = squared > 0  # both wheres keep the gradient at J = 0 finite
    sigma = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    safe = jnp.where(sigma > 0, sigma, 1.0)
    return SpectralNorm(
        value=sigma,
        input_vector=v,
        output_vector=otu.tree_scale(1.0 / safe, jv),
        relative_change=jnp.abs(sigma - previous) / safe,
    )
