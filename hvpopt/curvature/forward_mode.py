"""Detecting where forward-mode autodiff is undefined.

Forward mode fails in two ways. At trace time: a primitive with no JVP rule
(some fused kernels), or ``jvp`` applied to a ``jax.custom_vjp`` function.
Or silently: differentiating a ``custom_vjp`` *backward rule* in forward mode
(as forward-over-reverse does) can leave a ``custom_lin`` primitive in the
traced program that only fails when it is lowered for compilation, long after
a ``try`` around the transformation has returned. :func:`trace_jvp` and
:func:`try_linearize` trace once and check for both, so callers can choose
another mode in time, and reuse the trace when forward mode works.
"""

import warnings
from collections.abc import Callable

import jax
import jax.extend

from hvpopt.types import PyTree


def trace_jvp(fn: Callable, primal: PyTree, tangent: PyTree):
    """Traces ``t -> jvp(fn, (primal,), (t,))[1]``.

    Returns:
      ``(run, None)`` where ``run(primal, tangent)`` evaluates the traced
      program, or ``(None, reason)`` when forward mode is undefined in ``fn``.

    Raises:
      Any error of ``fn`` that is not about forward mode.
    """
    tangent_map = lambda p, t: jax.jvp(fn, (p,), (t,))[1]
    try:
        closed, out_shape = jax.make_jaxpr(tangent_map, return_shape=True)(primal, tangent)
    except (TypeError, NotImplementedError) as err:
        if not _says_forward_mode_undefined(err):
            raise
        return None, str(err).splitlines()[0]
    if _contains_primitive(closed.jaxpr, "custom_lin"):
        return None, _CUSTOM_LIN_REASON
    out_tree = jax.tree.structure(out_shape)

    def run(p: PyTree, t: PyTree) -> PyTree:
        flat_out = jax.extend.core.jaxpr_as_fun(closed)(*jax.tree.leaves((p, t)))
        return jax.tree.unflatten(out_tree, flat_out)

    return run, None


def try_linearize(fn: Callable, primal: PyTree):
    """``jax.linearize(fn, primal)``, checked for forward mode.

    Returns:
      ``((outputs, jvp_fn), None)``, or ``(None, reason)`` when forward mode is
      undefined in ``fn``.

    Raises:
      Any error of ``fn`` that is not about forward mode.
    """
    try:
        outputs, jvp_fn = jax.linearize(fn, primal)
    except (TypeError, NotImplementedError) as err:
        if not _says_forward_mode_undefined(err):
            raise
        return None, str(err).splitlines()[0]
    if _contains_primitive(jax.make_jaxpr(jvp_fn)(primal).jaxpr, "custom_lin"):
        return None, _CUSTOM_LIN_REASON
    return (outputs, jvp_fn), None


def warn_reverse_fallback(reason: str, product: str, hint: str = "") -> None:
    """Warns that ``product`` uses reverse mode because forward mode is undefined."""
    warnings.warn(
        f"hvpopt: forward-mode autodiff is not defined inside the function ({reason}); "
        f"computing the {product} with reverse-over-reverse instead, which is slower. " + hint,
        stacklevel=4,
    )


_CUSTOM_LIN_REASON = "a custom_vjp function, or one called by a custom_vjp backward rule"


def _says_forward_mode_undefined(err: Exception) -> bool:
    message = str(err)
    return any(phrase in message for phrase in ("forward-mode", "custom_vjp", "Differentiation rule for", "JVP rule"))


def _contains_primitive(jaxpr, name: str) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            return True
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if _contains_primitive(getattr(sub, "jaxpr", sub), name):
                return True
    return False
