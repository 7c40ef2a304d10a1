"""The loss of one example, derived from a model, and the check that a given one agrees.

Influence needs the loss twice over: as ``loss_fn(params, example)``, whose
gradients it scores, and as ``model=(model_fn, output_loss)``, whose Gauss-Newton
matrix (or K-FAC / EK-FAC factors) it inverts. Written twice, the two can drift
apart (other labels, another scale) and the scores stop meaning anything, with
no error. :func:`example_loss` derives the first from the second;
:func:`check_example_loss` refuses a pair that disagrees.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from hvpopt import _checks
from hvpopt.types import PyTree

__all__ = ["check_example_loss", "example_loss"]


@functools.lru_cache(maxsize=32)
def example_loss(model_fn: Callable, output_loss: Callable) -> Callable:
    """``loss_fn(params, (inputs, targets))``: ``output_loss`` of ``model_fn`` on one example, a batch of one.

    ``output_loss`` is a mean over the batch (as :mod:`hvpopt.losses` are), so
    on a batch of one it is that example's loss. The same pair gives the same
    function, so that what is compiled for it (keyed on it) is reused.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> model_fn = lambda w, x: x @ w
      >>> loss_fn = hvpopt.influence.example_loss(model_fn, hvpopt.losses.squared_error)
      >>> float(loss_fn(jnp.ones((2, 1)), (jnp.array([1.0, 2.0]), jnp.array([1.0]))))
      2.0
    """

    def loss_fn(params: PyTree, example: tuple[Any, Any]) -> jax.Array:
        inputs, targets = jax.tree.map(lambda x: x[None], tuple(example))
        return output_loss(model_fn(params, inputs), targets)

    return loss_fn


def check_example_loss(
    loss_fn: Callable,
    model: tuple[Callable, Callable],
    params: PyTree,
    data: tuple[Any, Any],
    *,
    num_examples: int = 4,
    rtol: float = 1e-3,
) -> None:
    """Raises ValueError if ``loss_fn`` and ``model=(model_fn, output_loss)`` are not the same loss on ``data``.

    Compares them on the first ``num_examples`` examples (one batched forward pass
    of each, outside ``jit``), within ``rtol`` of the larger (and float rounding near 0).

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> model = (lambda w, x: x @ w, hvpopt.losses.squared_error)
      >>> wrong = lambda w, ex: 5.0 * hvpopt.influence.example_loss(*model)(w, ex)
      >>> data = (jnp.ones((3, 2)), jnp.zeros((3, 1)))
      >>> hvpopt.influence.check_example_loss(wrong, model, jnp.ones((2, 1)), data)
      Traceback (most recent call last):
      ...
      ValueError: loss_fn and model=(model_fn, output_loss) are not the same loss: on example 0 loss_fn gives
      10, output_loss(model_fn(params, inputs), targets) gives 2. Pass one of them (influence derives loss_fn
      from model), or make them agree.
    """
    size = min(num_examples, _checks.leading_size("data", data))
    first = jax.tree.map(lambda x: x[:size], tuple(data))
    on_each = lambda fn: np.asarray(jax.vmap(fn, in_axes=(None, 0))(params, first), np.float64)
    given, expected = on_each(loss_fn), on_each(example_loss(*model))
    slack = rtol * np.maximum(np.abs(given), np.abs(expected)) + 1e4 * np.finfo(np.float32).tiny
    for j in range(size):
        if not abs(given[j] - expected[j]) <= slack[j]:
            raise ValueError(
                "loss_fn and model=(model_fn, output_loss) are not the same loss: on example "
                f"{j} loss_fn gives {given[j]:.4g}, output_loss(model_fn(params, inputs), targets) gives "
                f"{expected[j]:.4g}. Pass one of them (influence derives loss_fn from model), or make them agree."
            )
