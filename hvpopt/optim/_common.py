"""Pieces shared by the second-order optimizers: argument checks, skipping bad steps, line search."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hvpopt.tree import add_scaled


def require(name: str, value: Any, optimizer: str, hint: str) -> None:
    """Raises a ValueError naming an extra argument ``update`` needs but did not get."""
    if value is None:
        raise ValueError(f"{optimizer}.update needs {name}=...: {hint}")


def step_or_skip(ok: jax.Array, step: Callable[[], tuple], skip: Callable[[], tuple]) -> tuple:
    """``step()`` if ``ok`` else ``skip()``, without running the step's work on a skipped step."""
    return jax.lax.cond(ok, step, skip)


def skip_step(grad: Any, state: Any, **changes) -> tuple:
    """Zero updates, and ``state`` with this step counted as skipped (plus ``changes``; a last step's CG
    iterations, if the state counts them, set to 0)."""
    if "cg_iterations" in state._fields:
        changes = {"cg_iterations": jnp.zeros_like(state.cg_iterations), **changes}
    return jax.tree.map(jnp.zeros_like, grad), state._replace(
        count=state.count + 1, skipped_steps=state.skipped_steps + 1, **changes
    )


def backtracking_line_search(
    value_fn: Callable,
    params: Any,
    direction: Any,
    value: jax.Array,
    slope: jax.Array,
    initial_step: jax.Array,
    *,
    shrink: float,
    sufficient_decrease: float,
    max_steps: int,
    first_trial: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The largest ``t = initial_step * shrink^k`` with ``f(x + t d) <= f(x) + c t slope`` (Armijo).

    Returns ``(t, evaluations)``; ``t = 0`` if no step in ``max_steps`` tries
    decreases ``f`` enough (or every try is non-finite). The test allows the
    rounding error of ``f``, ``eps |f(x)|``: near a minimum the decrease asked
    for is smaller than that, and insisting on it would shrink good steps.
    ``first_trial``, if known, is ``f(x + initial_step d)`` and saves an evaluation.
    """
    slack = jnp.finfo(value.dtype).eps * jnp.abs(value)

    def acceptable(t, trial):
        return jnp.isfinite(trial) & (trial <= value + sufficient_decrease * t * slope + slack)

    def loss_at(t):
        return value_fn(add_scaled(params, t, direction))

    def keep_shrinking(carry):
        t, trial, k = carry
        return ~acceptable(t, trial) & (k < max_steps)

    def shrink_step(carry):
        t, _, k = carry
        t = t * shrink
        return t, loss_at(t), k + 1

    t0 = jnp.asarray(initial_step, value.dtype)
    known = first_trial is not None
    start = (t0, first_trial.astype(value.dtype) if known else loss_at(t0), jnp.asarray(1))
    t, trial, k = jax.lax.while_loop(keep_shrinking, shrink_step, start)
    return jnp.where(acceptable(t, trial), t, 0.0), k - known
