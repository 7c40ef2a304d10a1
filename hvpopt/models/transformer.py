"""A small decoder-only transformer language model.

Token and learned position embeddings, pre-norm blocks of causal multi-head
self-attention and a GELU MLP, a final layer norm and an untied output head
(Radford et al., 2019). Attention is written out (``softmax(q k^T / sqrt(d))
v`` with a causal mask) rather than calling a fused kernel, so that forward-mode
autodiff, and hence forward-over-reverse Hessian products, are defined on every
backend.

Reference:
  Radford et al., "Language models are unsupervised multitask learners", 2019.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes of :class:`TransformerLM`."""

    vocab_size: int = 64
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    context_length: int = 32
    mlp_ratio: int = 4

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name} must be a positive integer; got {value!r}.")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})."
            )


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.qkv = nnx.Linear(config.d_model, 3 * config.d_model, rngs=rngs)
        self.out = nnx.Linear(config.d_model, config.d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        *batch, length, width = x.shape
        head_dim = width // self.num_heads
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        split = lambda t: t.reshape(*batch, length, self.num_heads, head_dim)
        scores = jnp.einsum("...qhd,...khd->...hqk", split(q), split(k)) / jnp.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        heads = jnp.einsum("...hqk,...khd->...qhd", weights, split(v))
        return self.out(heads.reshape(*batch, length, width))


class Block(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        hidden = config.mlp_ratio * config.d_model
        self.norm1 = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.attention = CausalSelfAttention(config, rngs=rngs)
        self.norm2 = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.up = nnx.Linear(config.d_model, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, config.d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
    """Decoder-only language model: ``tokens [..., T] -> logits [..., T, vocab]``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        # Plain parameters rather than nnx.Embed, whose lookup casts to float32
        # even when the parameters are float64.
        init = nnx.initializers.normal(stddev=0.02)
        self.token_embedding = nnx.Param(init(rngs.params(), (config.vocab_size, config.d_model)))
        self.position_embedding = nnx.Param(
            init(rngs.params(), (config.context_length, config.d_model))
        )
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.head = nnx.Linear(config.d_model, config.vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[-1]
        if length > self.config.context_length:
            raise ValueError(
                f"tokens has length {length}, longer than the model's context_length "
                f"{self.config.context_length}."
            )
        x = jnp.take(self.token_embedding[...], tokens, axis=0)
        x = x + self.position_embedding[...][:length]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def transformer_lm(
    config: TransformerConfig = TransformerConfig(), *, seed: int = 0
) -> tuple[Callable, nnx.State]:
    """A :class:`TransformerLM` as ``(model_fn, params)``.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> model_fn, params = hvpopt.models.transformer_lm()
      >>> model_fn(params, jnp.zeros((2, 32), jnp.int32)).shape
      (2, 32, 64)
    """
    model = TransformerLM(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return (lambda p, tokens: nnx.merge(graphdef, p)(tokens)), params
