"""Built-in problems for the command line, until the training testbed provides checkpoints."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from hvpopt import _checks
from hvpopt.models.mlp import mlp
from hvpopt.models.transformer import TransformerConfig, transformer_lm

BUILTIN_MODELS = ("transformer", "mlp")


class BuiltinProblem(NamedTuple):
    """``loss(model_fn(params, inputs), targets)`` on a batch of random data."""

    description: str
    model_fn: Callable
    params: Any
    inputs: jax.Array
    targets: jax.Array


def builtin_problem(model: str = "transformer", *, batch_size: int = 16, seed: int = 0) -> BuiltinProblem:
    """The default small transformer LM on random tokens, or an MLP on random inputs.

    Args:
      model: ``"transformer"`` (:class:`TransformerConfig`'s defaults, next-token
        targets) or ``"mlp"`` (sizes ``(32, 64, 64, 10)``, random labels).
      batch_size: sequences or examples.
      seed: seed of the parameters and the data.
    """
    _checks.check_choice("model", model, BUILTIN_MODELS)
    _checks.check_positive_int("batch_size", batch_size)
    data_key = jax.random.key(seed + 1)
    if model == "transformer":
        config = TransformerConfig()
        model_fn, params = transformer_lm(config, seed=seed)
        shape = (batch_size, config.context_length + 1)
        tokens = jax.random.randint(data_key, shape, 0, config.vocab_size)
        return BuiltinProblem(f"transformer LM {config}", model_fn, params, tokens[:, :-1], tokens[:, 1:])
    sizes = (32, 64, 64, 10)
    model_fn, params = mlp(sizes, seed=seed)
    x_key, y_key = jax.random.split(data_key)
    inputs = jax.random.normal(x_key, (batch_size, sizes[0]))
    targets = jax.random.randint(y_key, (batch_size,), 0, sizes[-1])
    return BuiltinProblem(f"MLP {sizes}", model_fn, params, inputs, targets)
