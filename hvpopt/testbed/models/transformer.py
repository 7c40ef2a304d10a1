"""A small decoder-only transformer: a language model and a sequence classifier.

Token embeddings, learned or rotary positions, pre-norm blocks of causal
multi-head self-attention and a GELU MLP, and a final layer norm (Radford et
al., 2019). The language model ends in an output head, untied or tied to the
token embeddings; the classifier averages the hidden states of the non-padding
positions and ends in a linear head.

Attention is written out, ``softmax(q k^T / sqrt(d) + causal mask) v``, rather
than calling a fused kernel, so that forward-mode autodiff, and hence
forward-over-reverse Hessian products, are defined on every backend. Rotary
positions rotate each pair of query and key features by an angle proportional
to the position (Su et al., 2021), so attention scores depend on relative
positions only.

References:
  Radford et al., "Language models are unsupervised multitask learners", 2019.
  Su et al., "RoFormer: enhanced transformer with rotary position embedding",
  arXiv:2104.09864, 2021.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hvpopt import _checks
from hvpopt.testbed.models._functional import pure

POSITIONS = ("learned", "rotary")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of the transformer.

    Attributes:
      vocab_size: number of token ids.
      d_model: width of the residual stream.
      num_layers: number of blocks.
      num_heads: attention heads per block; must divide ``d_model``.
      context_length: longest input sequence.
      mlp_ratio: hidden width of the MLP as a multiple of ``d_model``.
      positions: ``"learned"`` position embeddings or ``"rotary"`` (RoPE).
      tie_embeddings: the language model's output head reuses the token
        embeddings (``logits = h E^T``) instead of its own weights.
    """

    vocab_size: int = 64
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    context_length: int = 32
    mlp_ratio: int = 4
    positions: str = "learned"
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "context_length", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        _checks.check_choice("positions", self.positions, POSITIONS)
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False; got {self.tie_embeddings!r}.")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}).")
        if self.positions == "rotary" and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head width; d_model / num_heads = {self.d_model // self.num_heads}."
            )


def rotate_positions(x: jax.Array) -> jax.Array:
    """Rotary position embedding of ``x [..., T, heads, head_dim]`` (Su et al., 2021)."""
    length, half = x.shape[-3], x.shape[-1] // 2
    frequencies = 10000.0 ** (-jnp.arange(half, dtype=x.dtype) / half)
    angles = jnp.arange(length, dtype=x.dtype)[:, None] * frequencies  # [T, half]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.rotary = config.positions == "rotary"
        self.qkv = nnx.Linear(config.d_model, 3 * config.d_model, rngs=rngs)
        self.out = nnx.Linear(config.d_model, config.d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        *batch, length, width = x.shape
        head_dim = width // self.num_heads
        split = lambda t: t.reshape(*batch, length, self.num_heads, head_dim)
        q, k, v = (split(t) for t in jnp.split(self.qkv(x), 3, axis=-1))
        if self.rotary:
            q, k = rotate_positions(q), rotate_positions(k)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        heads = jnp.einsum("...hqk,...khd->...qhd", weights, v)
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


class TransformerBody(nnx.Module):
    """Embeddings, blocks and the final norm: ``tokens [..., T] -> hidden [..., T, d_model]``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        # Plain parameters rather than nnx.Embed, whose lookup casts to float32
        # even when the parameters are float64.
        init = nnx.initializers.normal(stddev=0.02)
        self.token_embedding = nnx.Param(init(rngs.params(), (config.vocab_size, config.d_model)))
        if config.positions == "learned":
            self.position_embedding = nnx.Param(init(rngs.params(), (config.context_length, config.d_model)))
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = nnx.LayerNorm(config.d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[-1]
        if length > self.config.context_length:
            raise ValueError(
                f"tokens has length {length}, longer than the model's context_length {self.config.context_length}."
            )
        x = jnp.take(self.token_embedding[...], tokens, axis=0)
        if self.config.positions == "learned":
            x = x + self.position_embedding[...][:length]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TransformerLM(nnx.Module):
    """Decoder-only language model: ``tokens [..., T] -> logits [..., T, vocab]``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.body = TransformerBody(config, rngs=rngs)
        if not config.tie_embeddings:
            self.head = nnx.Linear(config.d_model, config.vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        hidden = self.body(tokens)
        if self.body.config.tie_embeddings:
            return hidden @ self.body.token_embedding[...].T
        return self.head(hidden)


class TransformerClassifier(nnx.Module):
    """Sequence classifier: ``tokens [..., T] -> logits [..., num_classes]``.

    The hidden states of the positions whose token is not ``pad_id`` are
    averaged. Padding goes at the end: causal attention then never lets a real
    token see a padding token.
    """

    def __init__(self, config: TransformerConfig, num_classes: int, pad_id: int, *, rngs: nnx.Rngs):
        self.pad_id = pad_id
        self.body = TransformerBody(config, rngs=rngs)
        self.head = nnx.Linear(config.d_model, num_classes, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        hidden = self.body(tokens)
        keep = (tokens != self.pad_id)[..., None].astype(hidden.dtype)
        pooled = jnp.sum(hidden * keep, axis=-2) / jnp.maximum(jnp.sum(keep, axis=-2), 1)
        return self.head(pooled)


def transformer_lm(config: TransformerConfig = TransformerConfig(), *, seed: int = 0) -> tuple[Callable, nnx.State]:
    """A :class:`TransformerLM` as ``(model_fn, params)``.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> model_fn, params = hvpopt.testbed.models.transformer_lm()
      >>> jax.jit(model_fn)(params, jnp.zeros((2, 32), jnp.int32)).shape
      (2, 32, 64)
    """
    return pure(TransformerLM(config, rngs=nnx.Rngs(seed)))


def transformer_classifier(
    config: TransformerConfig, num_classes: int, *, pad_id: int = 0, seed: int = 0
) -> tuple[Callable, nnx.State]:
    """A :class:`TransformerClassifier` as ``(model_fn, params)``.

    Args:
      config: the blocks' sizes (``tie_embeddings`` does not apply).
      num_classes: number of labels.
      pad_id: the token id of padding, left out of the average.
      seed: seed of the initialization.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> config = hvpopt.testbed.models.TransformerConfig(vocab_size=12, context_length=8)
      >>> model_fn, params = hvpopt.testbed.models.transformer_classifier(config, num_classes=3)
      >>> jax.jit(model_fn)(params, jnp.ones((5, 8), jnp.int32)).shape
      (5, 3)
    """
    num_classes = _checks.check_positive_int("num_classes", num_classes)
    return pure(TransformerClassifier(config, num_classes, pad_id, rngs=nnx.Rngs(seed)))
