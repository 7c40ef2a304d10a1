"""The two models of ``bench_peers.py``, written twice: in plain JAX and in PyTorch, with the same weights.

* ``mlp``: scikit-learn's digits (shipped with it, 8x8 images, 10 classes),
  ``64 -> 128 (tanh) -> 10``, 9,610 parameters, softmax cross-entropy.
* ``lm``: a causal character language model on the Shakespeare text shipped
  with hvpopt (``hvpopt.testbed.data.corpus_text``): token and learned
  position embeddings, two pre-LayerNorm blocks (causal self-attention with a
  fused q/k/v ``Linear``, 5 heads, an output projection, a GELU MLP of width
  4 d), a final LayerNorm and an untied output head; d = 50, 64 tokens,
  70,963 parameters (64,113 in its `Linear` layers), softmax cross-entropy at every position.

The JAX parameters are nested dicts whose paths, joined by ``.``, are the
PyTorch ``state_dict`` names (``blocks.0.qkv.weight``); a dense weight is
stored ``[in, out]`` in JAX (``x @ W``) and ``[out, in]`` in PyTorch
(``nn.Linear``), so it is transposed on the way across (:func:`to_torch`).

Importing this module imports only NumPy: the JAX and PyTorch parts import
their framework when called, so that a PyTorch-only process never loads JAX
(and the other way round) and each side's import time is its own.
"""

import math

import numpy as np

MLP_SIZES = (64, 128, 10)
LM = {"d_model": 50, "num_heads": 5, "num_layers": 2, "context_length": 64, "mlp_ratio": 4}
LN_EPS = 1e-5
#: The dense (``Linear``) layers of each model: what kronfluence tracks, and the parameters influence is taken over.
DENSE_MODULES = {"mlp": ("fc1", "fc2"), "lm": ("qkv", "proj", "up", "down", "head")}


# ---------------------------------------------------------------- data


def digits(num_train: int, num_queries: int, seed: int = 0) -> dict:
    """Digits split at random: ``num_train`` training images, ``num_queries`` held-out query images (float32, /16)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x, y = (data.data / 16.0).astype(np.float32)[order], data.target.astype(np.int32)[order]
    if num_train + num_queries > len(y):
        raise ValueError(f"digits has {len(y)} images; asked for {num_train} + {num_queries}.")
    return {
        "x_train": x[:num_train],
        "y_train": y[:num_train],
        "x_query": x[num_train : num_train + num_queries],
        "y_query": y[num_train : num_train + num_queries],
    }


def shakespeare(num_train: int, num_queries: int, context_length: int = LM["context_length"]) -> dict:
    """Non-overlapping windows of ``context_length + 1`` characters: the first ``num_train`` of the first 90% of
    the text for training, the first ``num_queries`` of the last 10% as queries; inputs and next-character labels."""
    from hvpopt.testbed.data import CharTokenizer, corpus_text

    text = corpus_text()
    tokenizer = CharTokenizer.from_text(text)
    window, boundary = context_length + 1, int(len(text) * 0.9)

    def windows(start, stop, count):
        offsets = list(range(start, stop - window + 1, window))[:count]
        if len(offsets) < count:
            raise ValueError(f"the text holds {len(offsets)} windows there; asked for {count}.")
        ids = np.stack([tokenizer.encode(text[o : o + window]) for o in offsets]).astype(np.int32)
        return ids[:, :-1], ids[:, 1:]

    x_train, y_train = windows(0, boundary, num_train)
    x_query, y_query = windows(boundary, len(text), num_queries)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_query": x_query,
        "y_query": y_query,
        "vocab_size": np.int32(tokenizer.vocab_size),
    }


# ---------------------------------------------------------------- JAX


def init_mlp(seed: int = 0) -> dict:
    """PyTorch's default ``nn.Linear`` initialisation (uniform in +-1/sqrt(fan_in)), drawn with NumPy."""
    rng = np.random.default_rng(seed)
    return {f"fc{i + 1}": _linear(rng, a, b) for i, (a, b) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:]))}


def init_lm(vocab_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d, hidden = LM["d_model"], LM["mlp_ratio"] * LM["d_model"]
    normal = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
    norm = lambda: {"weight": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)}
    block = lambda: {
        "ln1": norm(),
        "qkv": _linear(rng, d, 3 * d),
        "proj": _linear(rng, d, d),
        "ln2": norm(),
        "up": _linear(rng, d, hidden),
        "down": _linear(rng, hidden, d),
    }
    return {
        "embed": {"weight": normal(vocab_size, d)},
        "pos": {"weight": normal(LM["context_length"], d)},
        "blocks": [block() for _ in range(LM["num_layers"])],
        "ln_f": norm(),
        "head": _linear(rng, d, vocab_size),
    }


def _linear(rng, fan_in: int, fan_out: int) -> dict:
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "weight": rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
        "bias": rng.uniform(-bound, bound, fan_out).astype(np.float32),
    }


def mlp_apply(params: dict, x):
    """``x [..., 64] -> logits [..., 10]``."""
    import jax.numpy as jnp

    hidden = jnp.tanh(x @ params["fc1"]["weight"] + params["fc1"]["bias"])
    return hidden @ params["fc2"]["weight"] + params["fc2"]["bias"]


def lm_apply(params: dict, tokens):
    """``tokens [..., T] -> logits [..., T, vocab]``."""
    import jax
    import jax.numpy as jnp

    dense = lambda p, x: x @ p["weight"] + p["bias"]
    *batch, length = tokens.shape
    d, heads = LM["d_model"], LM["num_heads"]
    head_dim = d // heads
    x = jnp.take(params["embed"]["weight"], tokens, axis=0) + params["pos"]["weight"][:length]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    for block in params["blocks"]:
        q, k, v = jnp.split(dense(block["qkv"], _layer_norm(block["ln1"], x)), 3, axis=-1)
        split = lambda t: t.reshape(*batch, length, heads, head_dim)
        scores = jnp.einsum("...qhd,...khd->...hqk", split(q), split(k)) / math.sqrt(head_dim)
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        mixed = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(scores, axis=-1), split(v))
        x = x + dense(block["proj"], mixed.reshape(*batch, length, d))
        x = x + dense(block["down"], jax.nn.gelu(dense(block["up"], _layer_norm(block["ln2"], x)), approximate=False))
    return dense(params["head"], _layer_norm(params["ln_f"], x))


def _layer_norm(p: dict, x):
    import jax.numpy as jnp

    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + LN_EPS) * p["weight"] + p["bias"]


APPLY = {"mlp": mlp_apply, "lm": lm_apply}


def split_dense(model: str, params: dict) -> tuple[dict, dict]:
    """``(dense, rest)``: the ``Linear`` layers' weights and biases (kronfluence's tracked modules), and the rest
    (embeddings, LayerNorms) that influence treats as constants on both sides."""
    if model == "mlp":
        return params, {}
    dense_keys = DENSE_MODULES["lm"]
    dense = {
        "blocks": [{k: v for k, v in b.items() if k in dense_keys} for b in params["blocks"]],
        "head": params["head"],
    }
    rest = {k: v for k, v in params.items() if k not in ("blocks", "head")}
    rest["blocks"] = [{k: v for k, v in b.items() if k not in dense_keys} for b in params["blocks"]]
    return dense, rest


def merge_dense(model: str, dense: dict, rest: dict) -> dict:
    """The inverse of :func:`split_dense`."""
    if model == "mlp":
        return dense
    blocks = [{**r, **d} for r, d in zip(rest["blocks"], dense["blocks"])]
    return {**{k: v for k, v in rest.items() if k != "blocks"}, "blocks": blocks, "head": dense["head"]}


def dense_model_fn(model: str, rest: dict):
    """``model_fn(dense, inputs)``: the model as a function of its dense layers, the rest closed over."""
    apply = APPLY[model]
    if model == "mlp":
        return apply
    return lambda dense, inputs: apply(merge_dense(model, dense, rest), inputs)


def train(model: str, params: dict, data: dict, *, steps: int, batch_size: int, learning_rate: float, seed: int = 0):
    """Adam on the mean softmax cross-entropy of the training split; ``(params, first loss, last loss)``."""
    import jax
    import jax.numpy as jnp
    import optax

    import hvpopt

    apply, loss = APPLY[model], hvpopt.losses.softmax_cross_entropy
    optimizer = optax.adam(learning_rate)
    params = jax.tree.map(jnp.asarray, params)
    state = optimizer.init(params)
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    n = x.shape[0]
    batch_size = min(batch_size, n)

    @jax.jit
    def step(params, state, idx):
        value, grads = jax.value_and_grad(lambda p: loss(apply(p, x[idx]), y[idx]))(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = jnp.asarray(rng.choice(n, batch_size, replace=False) if batch_size < n else np.arange(n))
        params, state, value = step(params, state, idx)
        losses.append(value)
    losses = [float(v) for v in losses]
    return jax.tree.map(np.asarray, params), losses[0], losses[-1]


# ---------------------------------------------------------------- flat names (both frameworks)


def flat(params: dict) -> dict[str, np.ndarray]:
    """``{"blocks.0.qkv.weight": array}``: the JAX parameters under their PyTorch names (JAX layout)."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(f"{prefix}{i}.", v)
        else:
            out[prefix[:-1]] = np.asarray(node)

    walk("", params)
    return out


def unflat(model: str, arrays: dict[str, np.ndarray]) -> dict:
    """The nested JAX parameters from :func:`flat`'s names."""
    if model == "mlp":
        return {f"fc{i}": {k: arrays[f"fc{i}.{k}"] for k in ("weight", "bias")} for i in (1, 2)}
    pair = lambda prefix: {k: arrays[f"{prefix}.{k}"] for k in ("weight", "bias")}
    blocks = []
    for i in range(LM["num_layers"]):
        names = ("ln1", "qkv", "proj", "ln2", "up", "down")
        blocks.append({name: pair(f"blocks.{i}.{name}") for name in names})
    return {
        "embed": {"weight": arrays["embed.weight"]},
        "pos": {"weight": arrays["pos.weight"]},
        "blocks": blocks,
        "ln_f": pair("ln_f"),
        "head": pair("head"),
    }


# ---------------------------------------------------------------- PyTorch


def torch_model(model: str, vocab_size: int | None = None):
    """The PyTorch mirror (an ``nn.Module`` whose ``state_dict`` names are :func:`flat`'s), float32, eval mode."""
    import torch
    from torch import nn

    if model == "mlp":

        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(MLP_SIZES[0], MLP_SIZES[1])
                self.fc2 = nn.Linear(MLP_SIZES[1], MLP_SIZES[2])

            def forward(self, x):
                return self.fc2(torch.tanh(self.fc1(x)))

        return MLP().eval()

    d, heads, hidden = LM["d_model"], LM["num_heads"], LM["mlp_ratio"] * LM["d_model"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(d, eps=LN_EPS)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d, eps=LN_EPS)
            self.up = nn.Linear(d, hidden)
            self.down = nn.Linear(hidden, d)

        def forward(self, x):
            *batch, length, _ = x.shape
            split = lambda t: t.reshape(*batch, length, heads, d // heads).transpose(-3, -2)  # [..., H, T, hd]
            q, k, v = (split(t) for t in self.qkv(self.ln1(x)).split(d, dim=-1))
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            mixed = (torch.softmax(scores, dim=-1) @ v).transpose(-3, -2).reshape(*batch, length, d)
            x = x + self.proj(mixed)
            return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, d)
            self.pos = nn.Embedding(LM["context_length"], d)
            self.blocks = nn.ModuleList([Block() for _ in range(LM["num_layers"])])
            self.ln_f = nn.LayerNorm(d, eps=LN_EPS)
            self.head = nn.Linear(d, vocab_size)

        def forward(self, tokens):
            x = self.embed(tokens) + self.pos.weight[: tokens.shape[-1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    return CharLM().eval()


def to_torch(module, arrays: dict[str, np.ndarray]) -> None:
    """Copies :func:`flat` arrays into ``module``: ``nn.Linear`` weights transposed, everything else as is."""
    import torch
    from torch import nn

    linear = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    state = module.state_dict()
    if set(state) != set(arrays):
        raise ValueError(f"parameter names differ: {sorted(set(state) ^ set(arrays))}")
    with torch.no_grad():
        for name, tensor in state.items():
            value = arrays[name].T if name in linear else arrays[name]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: shape {value.shape} for a tensor of shape {tuple(tensor.shape)}")
            tensor.copy_(torch.from_numpy(np.array(value, copy=True)))


def from_torch(module, tensors) -> dict[str, np.ndarray]:
    """``{name: tensor}`` in ``module``'s names and layout -> :func:`flat`'s layout (``nn.Linear`` weights
    transposed back), as float64 NumPy arrays."""
    from torch import nn

    linear = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for name, t in tensors.items():
        value = t.detach().double().numpy()
        out[name] = value.T if name in linear else value
    return out
