"""A multi-layer perceptron."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """Dense layers with an activation between them (none after the last)."""

    def __init__(self, sizes: Sequence[int], activation: Callable, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(m, n, rngs=rngs) for m, n in zip(sizes[:-1], sizes[1:])]
        )
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def mlp(
    sizes: Sequence[int], *, activation: Callable = jnp.tanh, seed: int = 0
) -> tuple[Callable, nnx.State]:
    """An MLP as ``(model_fn, params)``.

    Args:
      sizes: layer widths, input first and output last, e.g. ``(784, 128, 10)``.
      activation: applied after every layer but the last.
      seed: seed of the initialization.

    Returns:
      ``model_fn(params, x) -> outputs`` and the parameter pytree.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> model_fn, params = hvpopt.models.mlp((3, 8, 2))
      >>> model_fn(params, jnp.ones((5, 3))).shape
      (5, 2)
    """
    if len(sizes) < 2:
        raise ValueError(f"sizes must name an input and an output width; got {sizes!r}.")
    graphdef, params = nnx.split(MLP(sizes, activation, rngs=nnx.Rngs(seed)), nnx.Param)
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params
