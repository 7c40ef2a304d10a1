#!/usr/bin/env python
"""Benchmark of hvpopt's curvature-vector products on CPU (or whatever JAX sees).

Measures, for a small flax transformer LM (d_model 64 and 128) and an MLP, the
wall time, compile time and compiled memory of the loss, its gradient, the
Hessian-vector product in every mode, the raw ``jax.jvp(jax.grad(f))``
reference, the Gauss-Newton product and the reuse of a built operator over ten
vectors, and compares with the same transformer's gradient and HVP in eager
PyTorch. Prints a table and writes a JSON file with everything, including a
``targets`` section (measured value, threshold, pass) for the goals:

* ``hvpopt.hvp`` within 5% of raw ``jvp(grad)``      (time ratio <= 1.05)
* ``ggn_vp`` at most 1.3x the gradient's time
* HVP temp memory at most 2x the gradient's
* HVP at most 0.6x PyTorch's best HVP time

Timing: every function of one model is compiled once (``jit(...).lower(...)
.compile()``, timed separately), warmed up, then all of them are called in
round-robin rounds (order reversed every other round), so that machine noise
hits each equally and ``hvpopt.hvp`` alternates with the raw reference. Each
call is closed by ``jax.block_until_ready``. The median over rounds is
reported, with the quartiles. The PyTorch phase times the compiled JAX
gradient and ``hvpopt.hvp`` again in its own rounds; the JAX/PyTorch target
uses those same-rounds times, since the two phases may see different machine
load (the per-phase load average and process CPU/wall ratio are recorded).

Usage (from the repository root):
  python benchmarks/bench_curvature.py              # full run (minutes): benchmarks/results/bench_curvature_cpu.json
  python benchmarks/bench_curvature.py --quick      # smoke run, writes to the temporary folder
  python benchmarks/bench_curvature.py --no-torch
"""

import argparse
import math
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import harness
import jax
import jax.numpy as jnp
import numpy as np
from harness import num_params

import hvpopt
from hvpopt.testbed.models import TransformerConfig, transformer_lm

ce = hvpopt.losses.softmax_cross_entropy

DEFAULT_OUT = harness.results_path("bench_curvature_cpu.json")
QUICK_OUT = harness.quick_path("bench_curvature")
TIME_FIELDS = ("median", "p25", "p75", "min", "mean", "std", "repeats")  # harness.summarize
K_VECTORS = 10  # products per operator-reuse loop

# What --quick compiles (compilation dominates a quick run): the transformer
# gets the core functions, the MLP (fast to compile) most of the rest.
QUICK_TRANSFORMER_FUNCTIONS = ("loss", "grad", "hvp", "raw_jvp_grad", "ggn_vp")
QUICK_MLP_FUNCTIONS = QUICK_TRANSFORMER_FUNCTIONS + (
    "hvp[rev_rev]",
    "hvp[rev_fwd]",
    f"hessian_operator_x{K_VECTORS}",
    f"hvp_loop_x{K_VECTORS}",
    f"ggn_operator_x{K_VECTORS}",
    f"ggn_vp_loop_x{K_VECTORS}",
    "hessian_operator_x1",
    "hvp_loop_x1",
)

TARGETS = {
    "hvp_vs_raw_jvp_grad_time": 1.05,
    "ggn_vp_vs_grad_time": 1.3,
    "hvp_vs_grad_temp_memory": 2.0,
    "hvp_vs_torch_best_hvp_time": 0.6,
}


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


def random_like(seed: int, tree: Any, leading: tuple[int, ...] = ()) -> Any:
    """Standard-normal float32 pytree like ``tree`` (drawn with NumPy: eager JAX
    random calls would compile one kernel per leaf shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(leading + jnp.shape(x), dtype=np.float32)),
        tree,
    )


def transformer_case(d_model: int, batch: int = 16, seq: int = 32, vocab: int = 64) -> dict:
    config = TransformerConfig(vocab_size=vocab, d_model=d_model, num_layers=2, num_heads=4, context_length=seq)
    model_fn, params = transformer_lm(config, seed=0)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return {
        "name": f"transformer_d{d_model}",
        "kind": "transformer",
        "model_fn": model_fn,
        "params": params,
        "batch": (inputs, targets),
        "config": {
            "model": "hvpopt.testbed.models.transformer_lm",
            "vocab_size": vocab,
            "d_model": d_model,
            "num_layers": 2,
            "num_heads": 4,
            "context_length": seq,
            "mlp_ratio": config.mlp_ratio,
            "batch_size": batch,
            "input_shape": list(inputs.shape),
            "loss": "hvpopt.losses.softmax_cross_entropy (next-token)",
            "dtype": "float32",
            "num_params": num_params(params),
        },
    }


def mlp_case(sizes=(256, 512, 512, 10), batch: int = 128) -> dict:
    model_fn, params = hvpopt.testbed.models.mlp(sizes, seed=0)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((batch, sizes[0]), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, sizes[-1], (batch,), dtype=np.int32))
    return {
        "name": "mlp_" + "x".join(map(str, sizes)),
        "kind": "mlp",
        "model_fn": model_fn,
        "params": params,
        "batch": (x, y),
        "config": {
            "model": "hvpopt.testbed.models.mlp",
            "sizes": list(sizes),
            "activation": "tanh",
            "batch_size": batch,
            "loss": "hvpopt.losses.softmax_cross_entropy",
            "dtype": "float32",
            "num_params": num_params(params),
        },
    }


# --------------------------------------------------------------------------
# JAX functions under test, each of (params, v, batch)
# --------------------------------------------------------------------------


def jax_functions(model_fn: Callable) -> dict[str, tuple[Callable, str]]:
    """name -> (fn(params, v_or_vs, batch), which vector argument: "v" or "vs")."""

    def f(p, batch):
        inputs, targets = batch
        return ce(model_fn(p, inputs), targets)

    def hvp_mode(mode):
        return lambda p, v, b: hvpopt.hvp(f, p, v, b, mode=mode)

    def raw_jvp_grad(p, v, b):
        return jax.jvp(jax.grad(lambda q: f(q, b)), (p,), (v,))[1]

    def ggn(p, v, b):
        return hvpopt.ggn_vp(model_fn, ce, p, v, b[0], b[1])

    def hess_op_loop(p, vs, b):
        return jax.lax.map(hvpopt.hessian_operator(f, p, b), vs)

    def hvp_loop(p, vs, b):
        return jax.lax.map(lambda v: hvpopt.hvp(f, p, v, b), vs)

    def ggn_op_loop(p, vs, b):
        return jax.lax.map(hvpopt.ggn_operator(model_fn, ce, p, b[0], b[1]), vs)

    def ggn_loop(p, vs, b):
        return jax.lax.map(lambda v: hvpopt.ggn_vp(model_fn, ce, p, v, b[0], b[1]), vs)

    fns = {
        "loss": (lambda p, v, b: f(p, b), "v"),
        "grad": (lambda p, v, b: jax.grad(f)(p, b), "v"),
        "hvp": (lambda p, v, b: hvpopt.hvp(f, p, v, b), "v"),  # default mode ("auto")
        "hvp[fwd_rev]": (hvp_mode("fwd_rev"), "v"),
        "hvp[rev_rev]": (hvp_mode("rev_rev"), "v"),
        "hvp[rev_fwd]": (hvp_mode("rev_fwd"), "v"),
        "raw_jvp_grad": (raw_jvp_grad, "v"),
        "ggn_vp": (ggn, "v"),
    }
    loops = {
        "hessian_operator": hess_op_loop,
        "hvp_loop": hvp_loop,
        "ggn_operator": ggn_op_loop,
        "ggn_vp_loop": ggn_loop,
    }
    for name, fn in loops.items():
        fns[f"{name}_x{K_VECTORS}"] = (fn, f"vs{K_VECTORS}")
        fns[f"{name}_x1"] = (fn, "vs1")
    return fns


def memory_stats(compiled) -> dict:
    try:
        ma = compiled.memory_analysis()
    except Exception as err:  # noqa: BLE001 - report whatever the backend says
        return {"error": repr(err)}
    if ma is None:
        return {"error": "memory_analysis() returned None"}
    out = {}
    for attr in dir(ma):
        if attr.endswith("_in_bytes"):
            value = getattr(ma, attr)
            if isinstance(value, (int, float)):
                out[attr] = int(value)
    return out


def cost_stats(compiled) -> dict:
    try:
        ca = compiled.cost_analysis()
    except Exception as err:  # noqa: BLE001
        return {"error": repr(err)}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    if not isinstance(ca, dict):
        return {}
    return {k: float(ca[k]) for k in ("flops", "transcendentals", "bytes accessed") if k in ca}


def max_rel_err(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over all leaves (on the host)."""
    pairs = [
        (np.asarray(x, np.float64), np.asarray(y, np.float64))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    ]
    num = max(float(np.max(np.abs(x - y))) for x, y in pairs)
    den = max(float(np.max(np.abs(y))) for _, y in pairs)
    return num / max(den, 1e-30)


def normalized_hlo(compiled) -> str | None:
    """Optimized HLO text without names of source files, lines and stack frames."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        return None
    lines = text.splitlines()
    start = next((k for k, line in enumerate(lines) if line.startswith(("%", "ENTRY"))), 0)
    text = "\n".join(lines[start:])
    text = re.sub(r",?\s*metadata=\{[^}]*\}", "", text)
    return re.sub(r",?\s*stack_frame_id=\d+", "", text)


def bench_jax_case(case: dict, args, include: tuple[str, ...] | None = None) -> tuple[dict, dict[str, Callable]]:
    """Compiles, checks and times the functions of one case.

    Returns the results and the compiled ``grad`` and ``hvp`` calls (reused to
    time JAX again in the same rounds as PyTorch).
    """
    params, batch = case["params"], case["batch"]
    v = random_like(10, params)
    vs = {
        f"vs{K_VECTORS}": random_like(11, params, (K_VECTORS,)),
        "vs1": random_like(12, params, (1,)),
    }
    vectors = {"v": v, **vs}
    fns = jax_functions(case["model_fn"])
    if include is not None:
        fns = {name: fn for name, fn in fns.items() if name in include}

    results: dict[str, dict] = {}
    compiled: dict[str, Any] = {}
    for name, (fn, vec_name) in fns.items():
        vec = vectors[vec_name]
        comp, lower_s, compile_s = harness.lower_and_compile_timed(fn, params, vec, batch)
        compiled[name] = (comp, vec)
        results[name] = {
            "vector_arg": vec_name,
            "lower_s": lower_s,
            "compile_s": compile_s,
            "lower_plus_compile_s": lower_s + compile_s,
            "memory": memory_stats(comp),
            "cost": cost_stats(comp),
        }
        print(f"  compiled {case['name']}/{name}: {lower_s + compile_s:.2f} s", flush=True)

    # Correctness: every HVP variant against the raw reference, and whether
    # XLA got the very same program for it.
    ref = compiled["raw_jvp_grad"][0](params, v, batch)
    ref_hlo = normalized_hlo(compiled["raw_jvp_grad"][0])
    for name in ("hvp", "hvp[fwd_rev]", "hvp[rev_rev]", "hvp[rev_fwd]"):
        if name in compiled:
            results[name]["max_rel_err_vs_raw_jvp_grad"] = max_rel_err(compiled[name][0](params, v, batch), ref)
            hlo = normalized_hlo(compiled[name][0])
            results[name]["hlo_identical_to_raw_jvp_grad"] = None if hlo is None or ref_hlo is None else hlo == ref_hlo
    del ref
    vk = vs[f"vs{K_VECTORS}"]
    for op, loop, key in (
        ("hessian_operator", "hvp_loop", "max_rel_err_vs_hvp_loop"),
        ("ggn_operator", "ggn_vp_loop", "max_rel_err_vs_ggn_vp_loop"),
    ):
        op, loop = f"{op}_x{K_VECTORS}", f"{loop}_x{K_VECTORS}"
        if op in compiled and loop in compiled:
            results[op][key] = max_rel_err(compiled[op][0](params, vk, batch), compiled[loop][0](params, vk, batch))

    calls = {name: (lambda c=comp, x=vec: c(params, x, batch)) for name, (comp, vec) in compiled.items()}
    with harness.contention({}) as contention:
        times, _, rounds = harness.round_robin(
            calls,
            warmup=args.warmup,
            min_rounds=args.min_repeats,
            max_rounds=args.max_repeats,
            budget_s=args.budget_per_case,
        )
    for name in fns:
        results[name]["time"] = harness.summarize(times[name], TIME_FIELDS)

    # Derived ratios.
    grad_t = results["grad"]["time"]["median_s"]
    grad_mem = results["grad"]["memory"].get("temp_size_in_bytes")
    for res in results.values():
        res["time_ratio_to_grad"] = res["time"]["median_s"] / grad_t
        temp = res["memory"].get("temp_size_in_bytes")
        res["temp_ratio_to_grad"] = (temp / grad_mem) if (temp is not None and grad_mem) else None

    # Paired ratio hvp / raw over the interleaved rounds (per-round ratio, median).
    paired = [a / b for a, b in zip(times["hvp"], times["raw_jvp_grad"])]
    reuse = {}
    for op, loop in (("hessian_operator", "hvp_loop"), ("ggn_operator", "ggn_vp_loop")):
        t = {n: r["time"]["median_s"] for n, r in results.items()}
        if f"{op}_x{K_VECTORS}" not in t or f"{loop}_x{K_VECTORS}" not in t:
            continue
        t_op_k, t_loop_k = t[f"{op}_x{K_VECTORS}"], t[f"{loop}_x{K_VECTORS}"]
        entry = {
            "k": K_VECTORS,
            "operator_per_product_s": t_op_k / K_VECTORS,
            "repeated_call_per_product_s": t_loop_k / K_VECTORS,
            "operator_vs_repeated_calls": t_op_k / t_loop_k,
            "operator_marginal_per_product_s": None,
            "repeated_call_marginal_per_product_s": None,
            "operator_build_plus_one_product_s": None,
            "operator_marginal_vs_grad": None,
        }
        if f"{op}_x1" in t and f"{loop}_x1" in t:
            # Marginal cost of one more product, (T_k - T_1) / (k - 1): the matvec
            # application alone, without building the operator.
            marginal = (t_op_k - t[f"{op}_x1"]) / (K_VECTORS - 1)
            entry.update(
                operator_marginal_per_product_s=marginal,
                repeated_call_marginal_per_product_s=(t_loop_k - t[f"{loop}_x1"]) / (K_VECTORS - 1),
                operator_build_plus_one_product_s=t[f"{op}_x1"],
                operator_marginal_vs_grad=marginal / grad_t,
            )
        reuse[op] = entry
    summary = {
        "hvp_default_vs_raw_jvp_grad_time": results["hvp"]["time"]["median_s"]
        / results["raw_jvp_grad"]["time"]["median_s"],
        "hvp_default_vs_raw_jvp_grad_time_paired_median": float(np.median(paired)),
        "hvp_default_vs_raw_jvp_grad_flops": _ratio(results["hvp"]["cost"], results["raw_jvp_grad"]["cost"], "flops"),
        "hvp_default_hlo_identical_to_raw_jvp_grad": results["hvp"].get("hlo_identical_to_raw_jvp_grad"),
        "hvp_default_vs_grad_time": results["hvp"]["time_ratio_to_grad"],
        "hvp_default_vs_grad_flops": _ratio(results["hvp"]["cost"], results["grad"]["cost"], "flops"),
        "hvp_default_vs_grad_temp_memory": results["hvp"]["temp_ratio_to_grad"],
        "ggn_vp_vs_grad_time": results["ggn_vp"]["time_ratio_to_grad"],
        "ggn_vp_vs_grad_flops": _ratio(results["ggn_vp"]["cost"], results["grad"]["cost"], "flops"),
        "ggn_vp_vs_grad_temp_memory": results["ggn_vp"]["temp_ratio_to_grad"],
        "operator_reuse": reuse,
    }
    result = {"rounds": rounds, "contention": contention, "functions": results, "summary": summary}
    return result, {name: calls[name] for name in ("grad", "hvp")}


def _ratio(a: dict, b: dict, key: str):
    if key in a and key in b and b[key]:
        return a[key] / b[key]
    return None


# --------------------------------------------------------------------------
# PyTorch baseline
# --------------------------------------------------------------------------


def bench_torch(
    d_model: int,
    args,
    jax_calls: dict[str, Callable] | None = None,
    batch: int = 16,
    seq: int = 32,
    vocab: int = 64,
) -> dict:
    """The same transformer in eager PyTorch: gradient and two HVPs.

    ``jax_calls`` (the compiled JAX gradient and ``hvpopt.hvp`` of the same
    shapes) are timed again in the same interleaved rounds, so that the
    JAX/PyTorch ratios compare calls made under the same machine load.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, d, heads, ratio=4):
            super().__init__()
            self.heads = heads
            self.norm1 = nn.LayerNorm(d, eps=1e-6)
            self.qkv = nn.Linear(d, 3 * d)
            self.out = nn.Linear(d, d)
            self.norm2 = nn.LayerNorm(d, eps=1e-6)
            self.up = nn.Linear(d, ratio * d)
            self.down = nn.Linear(ratio * d, d)

        def attention(self, x):
            b, t, d = x.shape
            hd = d // self.heads
            q, k, v = self.qkv(x).split(d, dim=-1)
            split = lambda z: z.reshape(b, t, self.heads, hd).transpose(1, 2)
            q, k, v = split(q), split(k), split(v)
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            heads = torch.softmax(scores, dim=-1) @ v
            return self.out(heads.transpose(1, 2).reshape(b, t, d))

        def forward(self, x):
            x = x + self.attention(self.norm1(x))
            return x + self.down(F.gelu(self.up(self.norm2(x)), approximate="tanh"))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.positions = nn.Embedding(seq, d_model)
            self.blocks = nn.ModuleList([Block(d_model, 4) for _ in range(2)])
            self.norm = nn.LayerNorm(d_model, eps=1e-6)
            self.head = nn.Linear(d_model, vocab)

        def forward(self, tokens):
            x = self.embed(tokens) + self.positions(torch.arange(tokens.shape[-1]))
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    model = LM().float()
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    names = [n for n, _ in model.named_parameters()]
    leaf_params = [p for _, p in model.named_parameters()]
    pdict = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(10)
    vdict = {n: torch.randn(p.shape, generator=gen) for n, p in pdict.items()}
    vlist = [vdict[n] for n in names]

    def loss_of(logits):
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    def f_func(p):
        return loss_of(torch.func.functional_call(model, p, (x,)))

    def grad_autograd():
        return torch.autograd.grad(loss_of(model(x)), leaf_params)

    def hvp_jvp_grad():
        return torch.func.jvp(torch.func.grad(f_func), (pdict,), (vdict,))[1]

    def hvp_double_backward():
        g = torch.autograd.grad(loss_of(model(x)), leaf_params, create_graph=True)
        return torch.autograd.grad(g, leaf_params, grad_outputs=vlist)

    out = {
        "config": {
            "d_model": d_model,
            "num_layers": 2,
            "num_heads": 4,
            "vocab_size": vocab,
            "context_length": seq,
            "batch_size": batch,
            "mlp_ratio": 4,
            "num_params": int(sum(p.numel() for p in leaf_params)),
            "mode": "eager (no torch.compile)",
            "num_threads": torch.get_num_threads(),
            "dtype": "float32",
        },
        "errors": {},
    }
    calls = {"grad": grad_autograd, "hvp_double_backward": hvp_double_backward}
    for name, call in (jax_calls or {}).items():
        calls[f"jax:{name}"] = lambda c=call: jax.block_until_ready(c())
    try:
        hv_jvp = hvp_jvp_grad()
        hv_dbl = hvp_double_backward()
        num = max(float((hv_jvp[n] - b).abs().max()) for n, b in zip(names, hv_dbl))
        den = max(float(b.abs().max()) for b in hv_dbl)
        out["max_rel_err_jvp_grad_vs_double_backward"] = num / max(den, 1e-30)
        calls["hvp_jvp_grad"] = hvp_jvp_grad
    except Exception as err:  # noqa: BLE001 - record and fall back to double backward
        out["errors"]["hvp_jvp_grad"] = f"{type(err).__name__}: {err}"

    with harness.contention({}) as out["contention"]:
        times, _, rounds = harness.round_robin(
            calls,
            sync=lambda _: None,  # eager CPU torch is synchronous
            warmup=args.warmup,
            min_rounds=args.min_repeats,
            max_rounds=args.max_repeats,
            budget_s=args.budget_per_case / 2,
        )
    out["rounds"] = rounds
    out["functions"] = {
        name: {"time": harness.summarize(t, TIME_FIELDS)} for name, t in times.items() if not name.startswith("jax:")
    }
    grad_t = out["functions"]["grad"]["time"]["median_s"]
    for res in out["functions"].values():
        res["time_ratio_to_grad"] = res["time"]["median_s"] / grad_t
    hvps = {n: r["time"]["median_s"] for n, r in out["functions"].items() if n.startswith("hvp")}
    best = min(hvps, key=hvps.get)
    out["best_hvp"] = {"method": best, "median_s": hvps[best], "ratio_to_grad": hvps[best] / grad_t}
    if jax_calls:
        jt = {name[4:]: harness.summarize(t, TIME_FIELDS) for name, t in times.items() if name.startswith("jax:")}
        out["jax_interleaved"] = {
            "note": "the compiled JAX grad and hvpopt.hvp, timed in the same rounds as PyTorch",
            "functions": {name: {"time": t} for name, t in jt.items()},
            "hvp_vs_torch_best_hvp": jt["hvp"]["median_s"] / hvps[best],
            "hvp_vs_torch_best_hvp_paired_median": float(
                np.median([a / b for a, b in zip(times["jax:hvp"], times[best])])
            ),
            "grad_vs_torch_grad": jt["grad"]["median_s"] / grad_t,
            "hvp_vs_jax_grad": jt["hvp"]["median_s"] / jt["grad"]["median_s"],
        }
    return out


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _mb(x):
    return "-" if x is None else f"{x / 2**20:8.2f}"


def _fmt_ratio(x):
    return "-" if x is None else f"{x:6.2f}"


def print_case(name: str, res: dict) -> None:
    print(f"\n=== {name}  ({res['rounds']} interleaved rounds; median [p25, p75]) ===")
    header = (
        f"{'function':<22}{'median ms':>11}{'p25':>9}{'p75':>9}{'/grad':>7}"
        f"{'compile s':>10}{'temp MB':>9}{'temp/grad':>10}{'arg MB':>9}{'out MB':>9}"
    )
    print(header)
    print("-" * len(header))
    for fname, r in res["functions"].items():
        t, m = r["time"], r["memory"]
        print(
            f"{fname:<22}{t['median_s'] * 1e3:11.3f}{t['p25_s'] * 1e3:9.3f}{t['p75_s'] * 1e3:9.3f}"
            f"{r['time_ratio_to_grad']:7.2f}{r['lower_plus_compile_s']:10.2f}"
            f"{_mb(m.get('temp_size_in_bytes')):>9}{_fmt_ratio(r['temp_ratio_to_grad']):>10}"
            f"{_mb(m.get('argument_size_in_bytes')):>9}{_mb(m.get('output_size_in_bytes')):>9}"
        )
    s, c = res["summary"], res["contention"]
    print(
        f"hvp(default)/raw jvp(grad): {s['hvp_default_vs_raw_jvp_grad_time']:.3f} (medians), "
        f"{s['hvp_default_vs_raw_jvp_grad_time_paired_median']:.3f} (paired per-round median); "
        f"flops ratio {_fmt_ratio(s['hvp_default_vs_raw_jvp_grad_flops'])}; "
        f"identical optimized HLO: {s['hvp_default_hlo_identical_to_raw_jvp_grad']}"
    )
    print(
        f"flops / grad's (XLA cost analysis): hvp {_fmt_ratio(s['hvp_default_vs_grad_flops'])}, "
        f"ggn_vp {_fmt_ratio(s['ggn_vp_vs_grad_flops'])}"
    )
    print(
        f"load average before/after timing: {c['loadavg_before'].get('1min', float('nan')):.2f}/"
        f"{c['loadavg_after'].get('1min', float('nan')):.2f}; process CPU/wall "
        f"{c['process_cpu_per_wall']:.2f}"
    )
    errs = {
        k: v["max_rel_err_vs_raw_jvp_grad"] for k, v in res["functions"].items() if "max_rel_err_vs_raw_jvp_grad" in v
    }
    print("max rel err vs raw jvp(grad): " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    for op, r in s["operator_reuse"].items():
        line = (
            f"{op} reuse (k={r['k']}): {r['operator_per_product_s'] * 1e3:.3f} ms/product "
            f"vs {r['repeated_call_per_product_s'] * 1e3:.3f} ms/product by repeated calls "
            f"(ratio {r['operator_vs_repeated_calls']:.2f})"
        )
        if r["operator_marginal_per_product_s"] is not None:
            line += (
                f"; marginal (T_k-T_1)/(k-1): {r['operator_marginal_per_product_s'] * 1e3:.3f} vs "
                f"{r['repeated_call_marginal_per_product_s'] * 1e3:.3f} ms "
                f"({r['operator_marginal_vs_grad']:.2f}x grad)"
            )
        print(line)


def print_torch(name: str, res: dict, jax_res: dict | None) -> None:
    c = res["contention"]
    print(
        f"\n--- PyTorch {name} (eager, {res['config']['num_threads']} threads, {res['rounds']} rounds; "
        f"load {c['loadavg_before'].get('1min', float('nan')):.2f}/"
        f"{c['loadavg_after'].get('1min', float('nan')):.2f}, CPU/wall {c['process_cpu_per_wall']:.2f}) ---"
    )
    for fname, r in res["functions"].items():
        t = r["time"]
        print(
            f"{fname:<22}{t['median_s'] * 1e3:11.3f}{t['p25_s'] * 1e3:9.3f}{t['p75_s'] * 1e3:9.3f}"
            f"{r['time_ratio_to_grad']:7.2f}"
        )
    for k, v in res["errors"].items():
        print(f"  {k} failed: {v}")
    if "max_rel_err_jvp_grad_vs_double_backward" in res:
        print(f"  max rel err jvp(grad) vs double backward: {res['max_rel_err_jvp_grad_vs_double_backward']:.1e}")
    ji = res.get("jax_interleaved")
    if ji:
        for fname, r in ji["functions"].items():
            t = r["time"]
            print(
                f"{'jax ' + fname + ' (same rounds)':<22}{t['median_s'] * 1e3:11.3f}"
                f"{t['p25_s'] * 1e3:9.3f}{t['p75_s'] * 1e3:9.3f}"
            )
    b = res["best_hvp"]
    print(f"best torch HVP: {b['method']} {b['median_s'] * 1e3:.3f} ms ({b['ratio_to_grad']:.2f}x torch grad)")
    if ji:
        print(
            f"hvpopt.hvp / torch best HVP = {ji['hvp_vs_torch_best_hvp']:.3f} (same rounds; paired "
            f"per-round median {ji['hvp_vs_torch_best_hvp_paired_median']:.3f}); "
            f"jax grad / torch grad = {ji['grad_vs_torch_grad']:.3f}"
        )
    if jax_res is not None:
        print(
            f"with the JAX medians of its own phase: hvpopt.hvp / torch best HVP = "
            f"{res['hvpopt_hvp_vs_torch_best_hvp_separate']:.3f}; jax grad / torch grad = "
            f"{res['jax_grad_vs_torch_grad_separate']:.3f}"
        )


def evaluate_targets(jax_results: dict, torch_results: dict) -> dict:
    targets = []

    def add(name, case, measured, threshold, note=""):
        targets.append(
            {
                "target": name,
                "case": case,
                "measured": measured,
                "threshold": threshold,
                "comparison": "<=",
                "pass": (measured is not None and measured <= threshold),
                **({"note": note} if note else {}),
            }
        )

    for case, res in jax_results.items():
        s = res["summary"]
        add(
            "hvp_vs_raw_jvp_grad_time",
            case,
            s["hvp_default_vs_raw_jvp_grad_time"],
            TARGETS["hvp_vs_raw_jvp_grad_time"],
            "ratio of medians, hvpopt.hvp default mode",
        )
        add("ggn_vp_vs_grad_time", case, s["ggn_vp_vs_grad_time"], TARGETS["ggn_vp_vs_grad_time"])
        add(
            "hvp_vs_grad_temp_memory",
            case,
            s["hvp_default_vs_grad_temp_memory"],
            TARGETS["hvp_vs_grad_temp_memory"],
            "compiled temp_size_in_bytes",
        )
    for case, res in torch_results.items():
        add(
            "hvp_vs_torch_best_hvp_time",
            case,
            res.get("hvpopt_hvp_vs_torch_best_hvp"),
            TARGETS["hvp_vs_torch_best_hvp_time"],
            f"ratio of medians timed in the same interleaved rounds; torch best: "
            f"{res['best_hvp']['method']} (eager, float32)",
        )
    return {
        "all_pass": all(t["pass"] for t in targets),
        "num_pass": sum(t["pass"] for t in targets),
        "num_targets": len(targets),
        "items": targets,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run with few repeats")
    parser.add_argument(
        "--out", default=None, help=f"JSON output path (default {DEFAULT_OUT}; with --quick {QUICK_OUT})"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.quick:
        args.warmup, args.min_repeats, args.max_repeats, args.budget_per_case = 1, 3, 3, 0.0
    else:
        args.warmup, args.min_repeats, args.max_repeats, args.budget_per_case = 3, 20, 200, 20.0

    start = time.perf_counter()
    env = harness.environment(("jax", "jaxlib", "flax", "optax", "numpy", "torch", "hvpopt"))
    print(
        f"JAX {jax.__version__} on {env['jax_devices']}; {env['machine']['cpu_count']} CPUs; "
        f"{'quick' if args.quick else 'full'} run",
        flush=True,
    )
    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.zeros(())))  # absorb one-time init

    if args.quick:  # a smoke run: one transformer with the core functions, MLP with more
        cases = [(transformer_case(64), QUICK_TRANSFORMER_FUNCTIONS), (mlp_case(), QUICK_MLP_FUNCTIONS)]
    else:
        cases = [(transformer_case(64), None), (transformer_case(128), None), (mlp_case(), None)]
    jax_results, jax_calls = {}, {}
    for case, include in cases:
        print(f"\n[{case['name']}] {case['config']['num_params']} params", flush=True)
        res, jax_calls[case["name"]] = bench_jax_case(case, args, include)
        res["config"] = case["config"]
        jax_results[case["name"]] = res
        print_case(case["name"], res)

    torch_results = {}
    torch_info = {"enabled": False}
    if not args.no_torch:
        try:
            import torch

            torch_info = {"enabled": True, "version": torch.__version__, "num_threads": torch.get_num_threads()}
        except Exception as err:  # noqa: BLE001
            torch_info = {"enabled": False, "import_error": repr(err)}
    else:
        torch_info["reason"] = "--no-torch"
    if torch_info["enabled"]:
        for d in (64,) if args.quick else (64, 128):
            name = f"transformer_d{d}"
            res = bench_torch(d, args, jax_calls.get(name))
            jres = jax_results[name]
            res["hvpopt_hvp_vs_torch_best_hvp"] = res["jax_interleaved"]["hvp_vs_torch_best_hvp"]
            res["hvpopt_hvp_vs_torch_best_hvp_separate"] = (
                jres["functions"]["hvp"]["time"]["median_s"] / res["best_hvp"]["median_s"]
            )
            res["jax_grad_vs_torch_grad_separate"] = (
                jres["functions"]["grad"]["time"]["median_s"] / res["functions"]["grad"]["time"]["median_s"]
            )
            torch_results[name] = res
            print_torch(name, res, jres)

    targets = evaluate_targets(jax_results, torch_results)
    harness.print_targets(targets)
    total = time.perf_counter() - start
    print(f"\ntotal wall time {total:.1f} s")

    report = {
        "benchmark": "bench_curvature",
        "mode": "quick" if args.quick else "full",
        "settings": {
            "warmup_calls": args.warmup,
            "min_repeats": args.min_repeats,
            "max_repeats": args.max_repeats,
            "timing_budget_per_case_s": args.budget_per_case,
            "operator_reuse_k": K_VECTORS,
            "timing": "round-robin interleaved over all functions of a case, order reversed "
            "every other round; jax.block_until_ready before stopping the timer; median reported",
            "compile": "jax.jit(fn).lower(params, v, batch).compile(), timed once per function",
            "memory": "compiled.memory_analysis() (all *_in_bytes fields; the targets use "
            "temp_size_in_bytes; on the CPU backend peak_memory_in_bytes does not include "
            "temporaries and is smaller than temp_size_in_bytes)",
            "cost": "compiled.cost_analysis(); XLA counts a while-loop body once, so the flops "
            "of the lax.map loops are not multiplied by k",
            "operator_reuse": "jit(params, vs, batch -> lax.map(matvec, vs)) with the operator "
            "built inside; *_x10 on k=10 vectors, *_x1 on one, marginal cost per product = "
            "(T_x10 - T_x1) / 9",
            "dtype": "float32",
        },
        **env,
        "torch": torch_info,
        "targets_thresholds": TARGETS,
        "jax": jax_results,
        "pytorch": torch_results,
        "targets": targets,
        "total_wall_s": total,
    }
    harness.write_results(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
