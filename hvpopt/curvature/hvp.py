"""Hessian-vector products of a scalar function of a parameter pytree.

For a scalar ``f(params, *args)`` with Hessian ``H = d^2 f / d params^2`` the
product ``H v`` costs a small constant times one gradient and never forms ``H``
(Pearlmutter, 1994). Three orderings of the two derivatives give the same
product:

* ``"fwd_rev"``: forward-over-reverse, ``jvp(grad(f))``. The cheapest in time
  and memory; the default.
* ``"rev_rev"``: reverse-over-reverse, ``vjp(grad(f))`` (``H`` is symmetric). Works
  where forward mode is not defined.
* ``"rev_fwd"``: reverse-over-forward, ``grad(<grad f, v>)`` with the inner
  directional derivative taken by ``jvp``.

``"auto"`` uses forward-over-reverse and falls back to reverse-over-reverse,
with a warning, when forward mode is not defined inside ``f``: a
``jax.custom_vjp`` whose backward rule cannot be differentiated in forward mode
(it calls another ``custom_vjp``, say), or a fused kernel with no JVP rule.
Under ``jit`` JAX reports the first case only when compiling, so ``"auto"``
traces the product once, inspects it (:mod:`hvpopt.curvature.forward_mode`)
and reuses that trace.

References:
  Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
  JAX autodiff cookbook, "Hessian-vector products using both forward- and
  reverse-mode".
"""

from collections.abc import Callable

import jax

from hvpopt import _checks
from hvpopt.curvature.forward_mode import trace_jvp, try_linearize, warn_reverse_fallback
from hvpopt.types import MatVec, PyTree

HVP_MODES = ("auto", "fwd_rev", "rev_rev", "rev_fwd")


def hvp(f: Callable, params: PyTree, v: PyTree, *args, mode: str = "auto") -> PyTree:
    """Hessian-vector product ``H v`` of a scalar function in its first argument.

    .. math:: H v = \\nabla^2_{\\theta} f(\\theta, \\ldots)\\, v
       = \\left.\\tfrac{d}{dt}\\nabla_\\theta f(\\theta + t v)\\right|_{t=0}

    Args:
      f: ``f(params, *args) -> scalar``.
      params: the point, any pytree of floating arrays.
      v: the direction, a pytree with the structure and shapes of ``params``.
      *args: further arguments of ``f`` (a batch, say); not differentiated.
      mode: ``"auto"`` (default), ``"fwd_rev"``, ``"rev_rev"`` or ``"rev_fwd"``.

    Returns:
      ``H v`` with the structure of ``params``.

    Raises:
      ValueError: ``v`` does not match ``params``, ``f`` is not scalar, or
        ``mode`` is unknown.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> f = lambda p: jnp.sum(p["w"] ** 3)
      >>> hvpopt.hvp(f, {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([1.0, 1.0])})
      {'w': Array([ 6., 12.], dtype=float32)}
    """
    _check_mode_and_params(mode, params)
    _checks.check_like("v", v, "params", params)
    return _HVP_BY_MODE[mode](_checks.scalar_fn("f", f, *args), params, v)


def hessian_operator(f: Callable, params: PyTree, *args, mode: str = "auto") -> MatVec:
    """The Hessian of ``f`` at ``params`` as a matvec ``v -> H v``, built once.

    For ``"fwd_rev"`` the gradient is linearized once (``jax.linearize``) and each
    product evaluates only the linear (tangent) part; for ``"rev_rev"`` the
    gradient's VJP is built once. Both keep the linearization's residuals in
    memory (about what one gradient needs), so the primal forward and backward
    passes run once however many products follow, as in a CG or Lanczos loop.
    Inside one ``jit`` XLA often finds that sharing by itself for repeated
    :func:`hvp` calls (``benchmarks/bench_curvature.py`` measures both equal per
    product); the operator guarantees it. ``"rev_fwd"`` has nothing to reuse.

    Args:
      f: ``f(params, *args) -> scalar``.
      params: the point, any pytree of floating arrays.
      *args: further arguments of ``f``; not differentiated.
      mode: as in :func:`hvp`.

    Returns:
      A function from a pytree like ``params`` to ``H v`` like ``params``.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> f = lambda p, x: jnp.sum((x @ p) ** 2) / 2
      >>> x = jnp.array([[1.0, 0.0], [1.0, 1.0]])
      >>> matvec = hvpopt.hessian_operator(f, jnp.zeros(2), x)  # H = x^T x
      >>> matvec(jnp.array([1.0, 0.0]))
      Array([2., 1.], dtype=float32)
    """
    _check_mode_and_params(mode, params)
    loss = _checks.scalar_fn("f", f, *args)
    if mode == "rev_fwd":
        product = lambda v: _rev_fwd(loss, params, v)
    elif mode == "rev_rev":
        product = _reverse_linearization(loss, params)
    else:
        linearized, reason = try_linearize(jax.grad(loss), params)
        if linearized is not None:
            product = linearized[1]
        else:
            _fallback_or_raise(mode, reason)
            product = _reverse_linearization(loss, params)
    return _checks.checked_matvec(product, params)


def _check_mode_and_params(mode: str, params: PyTree) -> None:
    _checks.check_choice("mode", mode, HVP_MODES)
    _checks.check_floating("params", params)


def _fwd_rev(loss: Callable, params: PyTree, v: PyTree, *, mode: str = "fwd_rev") -> PyTree:
    run, reason = trace_jvp(jax.grad(loss), params, v)
    if run is not None:
        return run(params, v)
    _fallback_or_raise(mode, reason)
    return _rev_rev(loss, params, v)


def _rev_rev(loss: Callable, params: PyTree, v: PyTree) -> PyTree:
    return _reverse_linearization(loss, params)(v)


def _rev_fwd(loss: Callable, params: PyTree, v: PyTree) -> PyTree:
    directional = lambda p: jax.jvp(loss, (p,), (v,))[1]
    return jax.grad(directional)(params)


def _auto(loss: Callable, params: PyTree, v: PyTree) -> PyTree:
    return _fwd_rev(loss, params, v, mode="auto")


def _fallback_or_raise(mode: str, reason: str) -> None:
    """Where forward mode is undefined: warn for ``"auto"``, refuse ``"fwd_rev"``."""
    if mode != "auto":
        raise TypeError(
            f"mode={mode!r} needs forward-mode autodiff, which is not defined inside f "
            f"({reason}). Use mode='auto' or mode='rev_rev'."
        )
    warn_reverse_fallback(reason, "Hessian-vector product", "Pass mode='rev_rev' to silence this.")


def _reverse_linearization(loss: Callable, params: PyTree) -> MatVec:
    """``v -> vjp(grad(loss))(v)``, which is ``H v`` because ``H`` is symmetric."""
    grad_vjp = jax.vjp(jax.grad(loss), params)[1]
    return lambda v: grad_vjp(v)[0]


_HVP_BY_MODE = {"auto": _auto, "fwd_rev": _fwd_rev, "rev_rev": _rev_rev, "rev_fwd": _rev_fwd}
