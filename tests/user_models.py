"""Small transformer language models written the way other people write them, none from hvpopt.testbed.

Each is a decoder-only LM over ``VOCAB`` tokens of ``LENGTH`` positions with
``LAYERS`` blocks, written in its framework's own idiom:

* ``nnx``: Flax NNX, the miniGPT of Flax's documentation: ``nnx.Embed``,
  ``nnx.MultiHeadAttention``, ``nnx.Dropout`` with ``rngs``, a Python list of
  blocks;
* ``nnx_scan``: Flax NNX with its blocks made by ``nnx.vmap`` and run by
  ``nnx.scan`` over an ``nnx.remat`` body;
* ``linen``: Flax Linen like its lm1b example: ``nn.Embed`` with a tied head
  (``attend``), ``nn.MultiHeadDotProductAttention``, ``nn.DenseGeneral``, the
  blocks under ``nn.scan`` of ``nn.remat``;
* ``equinox``: ``eqx.nn.Embedding``, ``eqx.nn.MultiheadAttention``,
  ``eqx.nn.Linear``, called per example under ``jax.vmap``;
* ``pure``: plain JAX, a fused QKV einsum, stacked weights under
  ``lax.scan``, a tied head.

Every model comes with its ``unrolled`` twin where it scans: the same
parameters, the layers applied in a Python loop (``w[l]``), so that whatever is
computed through the scan can be checked against the same model without it.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import hvpopt

VOCAB, LENGTH, WIDTH, HEADS, LAYERS = 11, 6, 16, 2, 2
NAMES = ("nnx", "nnx_scan", "linen", "equinox", "pure")


class UserModel(NamedTuple):
    name: str
    model_fn: Callable
    params: Any
    unrolled: Callable | None  # the same function without its scan (None: it has none)


def causal(length: int) -> jax.Array:
    return jnp.tril(jnp.ones((length, length), bool))


# ---------------------------------------------------------------- Flax NNX


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
        self.ln1 = nnx.LayerNorm(WIDTH, param_dtype=dtype, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=WIDTH, dropout_rate=0.1, decode=False, param_dtype=dtype, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(WIDTH, param_dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, param_dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, param_dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        x = x + self.dropout(self.attention(self.ln1(x), mask=causal(x.shape[-2])))
        return x + self.dropout(self.down(nnx.gelu(self.up(self.ln2(x)))))


class NNXGPT(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
        self.tokens = nnx.Embed(VOCAB, WIDTH, param_dtype=dtype, rngs=rngs)
        self.positions = nnx.Embed(LENGTH, WIDTH, param_dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([NNXBlock(rngs, dtype) for _ in range(LAYERS)])
        self.ln = nnx.LayerNorm(WIDTH, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class NNXScannedGPT(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
        self.tokens = nnx.Embed(VOCAB, WIDTH, param_dtype=dtype, rngs=rngs)
        self.positions = nnx.Embed(LENGTH, WIDTH, param_dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return NNXBlock(rngs, dtype)

        self.blocks = blocks(rngs)
        self.ln = nnx.LayerNorm(WIDTH, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def forward(x, block):
            return block(x)

        x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[-1]))
        return self.head(self.ln(forward(x, self.blocks)))


def nnx_model(seed: int = 0, dtype=jnp.float32) -> UserModel:
    model = NNXGPT(nnx.Rngs(seed, dropout=seed + 1), dtype)
    model_fn, params = hvpopt.from_nnx(model)
    return UserModel("nnx", model_fn, params, None)


def nnx_scan_model(seed: int = 0, dtype=jnp.float32) -> UserModel:
    model = NNXScannedGPT(nnx.Rngs(seed, dropout=seed + 1), dtype)
    model_fn, params = hvpopt.from_nnx(model)
    twin = NNXGPT(nnx.Rngs(seed), dtype)
    twin_fn, _ = hvpopt.from_nnx(twin)
    twin_params = nnx.state(twin, nnx.Param)
    as_list = lambda p: _unstacked(p, twin_params)
    return UserModel("nnx_scan", model_fn, params, lambda p, x: twin_fn(as_list(p), x))


def _unstacked(stacked, like):
    """The scanned model's parameters as the listed twin's: block ``l`` takes slice ``l`` of every stacked leaf."""
    pure = nnx.as_pure(like)
    pure["tokens"], pure["positions"], pure["ln"], pure["head"] = (
        stacked["tokens"], stacked["positions"], stacked["ln"], stacked["head"],
    )  # fmt: skip
    for layer in range(LAYERS):
        pure["blocks"][layer] = jax.tree.map(lambda leaf: leaf[layer], stacked["blocks"])
    return pure


# ---------------------------------------------------------------- Flax Linen


class LinenBlock(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _):
        y = nn.MultiHeadDotProductAttention(
            num_heads=HEADS, qkv_features=WIDTH, deterministic=True, param_dtype=self.dtype
        )(nn.LayerNorm(param_dtype=self.dtype)(x), mask=causal(x.shape[-2]))
        x = x + y
        y = nn.DenseGeneral(2 * WIDTH, param_dtype=self.dtype)(nn.LayerNorm(param_dtype=self.dtype)(x))
        return x + nn.DenseGeneral(WIDTH, param_dtype=self.dtype)(nn.gelu(y)), None


class LinenGPT(nn.Module):
    scan: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(VOCAB, WIDTH, param_dtype=self.dtype)
        positions = self.param("positions", nn.initializers.normal(0.02), (LENGTH, WIDTH), self.dtype)
        x = embed(tokens) + positions
        if self.scan:
            stack = nn.scan(nn.remat(LinenBlock), variable_axes={"params": 0}, split_rngs={"params": True},
                            length=LAYERS)  # fmt: skip
            x, _ = stack(self.dtype, name="blocks")(x, None)
        else:
            for layer in range(LAYERS):
                x, _ = LinenBlock(self.dtype, name=f"block_{layer}")(x, None)
        return embed.attend(nn.LayerNorm(param_dtype=self.dtype)(x))


def linen_model(seed: int = 0, dtype=jnp.float32) -> UserModel:
    module = LinenGPT(dtype=dtype)
    variables = module.init(jax.random.key(seed), jnp.zeros((1, LENGTH), jnp.int32))
    model_fn, params = hvpopt.from_linen(module, variables, deterministic=None)
    twin = LinenGPT(scan=False, dtype=dtype)

    def unrolled(p, tokens):
        blocks = {f"block_{layer}": jax.tree.map(lambda leaf: leaf[layer], p["blocks"]) for layer in range(LAYERS)}
        rest = {name: value for name, value in p.items() if name != "blocks"}
        return twin.apply({"params": {**rest, **blocks}}, tokens)

    return UserModel("linen", model_fn, params, unrolled)


# ---------------------------------------------------------------- Equinox


class EqxBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, key, dtype):
        keys = jax.random.split(key, 3)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(WIDTH, dtype=dtype), eqx.nn.LayerNorm(WIDTH, dtype=dtype)
        self.attention = eqx.nn.MultiheadAttention(HEADS, WIDTH, dtype=dtype, key=keys[0])
        self.up = eqx.nn.Linear(WIDTH, 2 * WIDTH, dtype=dtype, key=keys[1])
        self.down = eqx.nn.Linear(2 * WIDTH, WIDTH, dtype=dtype, key=keys[2])

    def __call__(self, x):  # one sequence [T, d]
        y = jax.vmap(self.ln1)(x)
        x = x + self.attention(y, y, y, mask=causal(x.shape[0]))
        return x + jax.vmap(lambda h: self.down(jax.nn.gelu(self.up(self.ln2(h)))))(x)


class EqxGPT(eqx.Module):
    tokens: eqx.nn.Embedding
    positions: jax.Array
    blocks: list
    ln: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key, dtype):
        keys = jax.random.split(key, LAYERS + 3)
        self.tokens = eqx.nn.Embedding(VOCAB, WIDTH, dtype=dtype, key=keys[0])
        self.positions = 0.02 * jax.random.normal(keys[1], (LENGTH, WIDTH), dtype)
        self.blocks = [EqxBlock(k, dtype) for k in keys[2:-1]]
        self.ln = eqx.nn.LayerNorm(WIDTH, dtype=dtype)
        self.head = eqx.nn.Linear(WIDTH, VOCAB, dtype=dtype, key=keys[-1])

    def __call__(self, tokens):  # one sequence [T]
        x = jax.vmap(self.tokens)(tokens) + self.positions[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(lambda h: self.head(self.ln(h)))(x)


def equinox_model(seed: int = 0, dtype=jnp.float32) -> UserModel:
    model_fn, params = hvpopt.from_equinox(EqxGPT(jax.random.key(seed), dtype))
    return UserModel("equinox", model_fn, params, None)


# ---------------------------------------------------------------- plain JAX


def _layer_norm(x, scale):
    x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt((x**2).mean(-1, keepdims=True) + 1e-5) * scale


def _block(x, p):
    head = WIDTH // HEADS
    q, k, v = jnp.einsum("btd,dkhe->kbthe", _layer_norm(x, p["ln1"]), p["qkv"])  # one fused projection
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / jnp.sqrt(head)
    weights = jax.nn.softmax(jnp.where(causal(x.shape[1]), scores, -1e9), axis=-1)
    x = x + jnp.einsum("bhqk,bkhe,hed->bqd", weights, v, p["proj"])
    hidden = jax.nn.gelu(_layer_norm(x, p["ln2"]) @ p["up"] + p["up_bias"])
    return x + hidden @ p["down"]


def pure_params(seed: int = 0, dtype=jnp.float32) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape, dtype)
    return {
        "embed": normal((VOCAB, WIDTH), 0.1),
        "positions": normal((LENGTH, WIDTH), 0.02),
        "blocks": {
            "ln1": jnp.ones((LAYERS, WIDTH), dtype),
            "qkv": normal((LAYERS, WIDTH, 3, HEADS, WIDTH // HEADS), WIDTH**-0.5),
            "proj": normal((LAYERS, HEADS, WIDTH // HEADS, WIDTH), WIDTH**-0.5),
            "ln2": jnp.ones((LAYERS, WIDTH), dtype),
            "up": normal((LAYERS, WIDTH, 2 * WIDTH), WIDTH**-0.5),
            "up_bias": jnp.zeros((LAYERS, 2 * WIDTH), dtype),
            "down": normal((LAYERS, 2 * WIDTH, WIDTH), (2 * WIDTH) ** -0.5),
        },
        "ln": jnp.ones(WIDTH, dtype),
    }


def pure_gpt(p, tokens):
    x = p["embed"][tokens] + p["positions"][: tokens.shape[1]]
    x, _ = jax.lax.scan(lambda x, block: (_block(x, block), None), x, p["blocks"])
    return _layer_norm(x, p["ln"]) @ p["embed"].T  # the head tied to the embedding


def pure_gpt_unrolled(p, tokens):
    x = p["embed"][tokens] + p["positions"][: tokens.shape[1]]
    for layer in range(LAYERS):
        x = _block(x, jax.tree.map(lambda leaf: leaf[layer], p["blocks"]))
    return _layer_norm(x, p["ln"]) @ p["embed"].T


def pure_model(seed: int = 0, dtype=jnp.float32) -> UserModel:
    return UserModel("pure", pure_gpt, pure_params(seed, dtype), pure_gpt_unrolled)


MAKERS = {"nnx": nnx_model, "nnx_scan": nnx_scan_model, "linen": linen_model, "equinox": equinox_model,
          "pure": pure_model}  # fmt: skip


def language_data(n: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(inputs, targets)``: windows of a repeating token pattern with noise, the next token as the target."""
    key1, key2 = jax.random.split(jax.random.key(seed))
    starts = jax.random.randint(key1, (n, 1), 0, VOCAB)
    tokens = (starts + 3 * jnp.arange(LENGTH + 1)) % VOCAB
    noise = jax.random.bernoulli(key2, 0.1, tokens.shape)
    tokens = jnp.where(noise, (tokens + 1) % VOCAB, tokens)
    return tokens[:, :-1], tokens[:, 1:]
