"""A multi-layer perceptron, and multinomial logistic regression (the MLP with no hidden layer)."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hvpopt import _checks
from hvpopt.testbed.models._functional import pure


class MLP(nnx.Module):
    """Dense layers with an activation between them (none after the last)."""

    def __init__(self, sizes: Sequence[int], activation: Callable, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(m, n, rngs=rngs) for m, n in zip(sizes[:-1], sizes[1:])])
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def mlp(sizes: Sequence[int], *, activation: Callable = jnp.tanh, seed: int = 0) -> tuple[Callable, nnx.State]:
    """An MLP as ``(model_fn, params)``.

    Args:
      sizes: layer widths, input first and output last, e.g. ``(784, 128, 10)``.
      activation: applied after every layer but the last.
      seed: seed of the initialization.

    Returns:
      ``model_fn(params, x) -> outputs`` and the parameter pytree.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> model_fn, params = hvpopt.testbed.models.mlp((3, 8, 2))
      >>> model_fn(params, jnp.ones((5, 3))).shape
      (5, 2)
    """
    if len(sizes) < 2:
        raise ValueError(f"sizes must name an input and an output width; got {sizes!r}.")
    sizes = [_checks.check_positive_int("sizes", size) for size in sizes]
    return pure(MLP(sizes, activation, rngs=nnx.Rngs(seed)))


def logistic_regression(num_features: int, num_classes: int, *, seed: int = 0) -> tuple[Callable, nnx.State]:
    """Multinomial logistic regression, ``x -> x W + b``, as ``(model_fn, params)``.

    With softmax cross-entropy the loss is convex in ``(W, b)``, and strictly
    convex with an L2 penalty: the model of the exact checks (leave-one-out
    retraining, Newton's method in one step on quadratics' neighbours).

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> model_fn, params = hvpopt.testbed.models.logistic_regression(4, 3)
      >>> model_fn(params, jnp.ones((5, 4))).shape
      (5, 3)
    """
    return mlp((num_features, num_classes), seed=seed)
