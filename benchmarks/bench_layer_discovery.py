"""A scanned stack of layers: K-FAC's compile time does not grow with depth, and its factors are the unrolled ones.

A pure-JAX transformer (width 64, 4 heads, sequence 32, vocabulary 64, a fused QKV
einsum, a tied head) of depth L in (2, 6, 12), written twice with the same
parameters: its blocks under ``lax.scan`` over stacked weights, as ``nn.scan`` and
``nnx.scan`` write them, and in a Python loop over ``w[l]``. For each:

* seconds to find the layers (:func:`hvpopt.layer_coverage`: trace, read the jaxpr);
* compilation and work seconds of ``hvpopt.kronecker_statistics`` on 16 sequences
  (the K-FAC optimizer's refresh) and of ``hvpopt.fit_kronecker_factors(kind="ekfac")``
  (influence's fit): compilation is the trace, lowering and XLA compile spans inside the
  first call (harness ``CompileSpans``), work the median of 3 later calls;
* the largest relative difference between EK-FAC's inverse of the two, applied to a
  random vector, in float32.

Target: the 12-layer scanned stack compiles no slower than the same stack unrolled
(ratio <= 1.0), for both functions.

Usage::

    python benchmarks/bench_layer_discovery.py           # about 4 minutes on 2 CPU cores
    python benchmarks/bench_layer_discovery.py --quick   # depths 2 and 4, to the temporary folder
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from harness import (
    CompileSpans,
    environment,
    print_targets,
    quick_path,
    results_path,
    round_robin,
    summarize,
    timed_call,
    write_results,
)
from jax.flatten_util import ravel_pytree

import hvpopt

WIDTH, HEADS, LENGTH, VOCAB, BATCH = 64, 4, 32, 64, 16
CE = hvpopt.losses.softmax_cross_entropy


def layer_norm(x, scale):
    x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt((x**2).mean(-1, keepdims=True) + 1e-5) * scale


def block(x, p):
    q, k, v = jnp.einsum("btd,dkhe->kbthe", layer_norm(x, p["ln1"]), p["qkv"])
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / jnp.sqrt(WIDTH // HEADS)
    weights = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((LENGTH, LENGTH), bool)), scores, -1e9), axis=-1)
    x = x + jnp.einsum("bhqk,bkhe,hed->bqd", weights, v, p["proj"])
    return x + jax.nn.gelu(layer_norm(x, p["ln2"]) @ p["up"] + p["up_bias"]) @ p["down"]


def params_of(depth: int) -> dict:
    keys = iter(jax.random.split(jax.random.key(0), 8))
    normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) / np.sqrt(fan_in)
    return {
        "embed": normal((VOCAB, WIDTH), 10.0),
        "blocks": {
            "ln1": jnp.ones((depth, WIDTH)),
            "qkv": normal((depth, WIDTH, 3, HEADS, WIDTH // HEADS), WIDTH),
            "proj": normal((depth, HEADS, WIDTH // HEADS, WIDTH), WIDTH),
            "ln2": jnp.ones((depth, WIDTH)),
            "up": normal((depth, WIDTH, 4 * WIDTH), WIDTH),
            "up_bias": jnp.zeros((depth, 4 * WIDTH)),
            "down": normal((depth, 4 * WIDTH, WIDTH), 4 * WIDTH),
        },
        "ln": jnp.ones(WIDTH),
    }


def scanned(p, tokens):
    x, _ = jax.lax.scan(lambda x, w: (block(x, w), None), p["embed"][tokens], p["blocks"])
    return layer_norm(x, p["ln"]) @ p["embed"].T


def unrolled(p, tokens):
    x = p["embed"][tokens]
    for layer in range(p["blocks"]["up"].shape[0]):
        x = block(x, jax.tree.map(lambda leaf: leaf[layer], p["blocks"]))
    return layer_norm(x, p["ln"]) @ p["embed"].T


def measure(depth: int, spans: CompileSpans) -> dict:
    params = params_of(depth)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH + 1), 0, VOCAB)
    data = (tokens[:, :-1], tokens[:, 1:])
    vector = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), params)
    record = {"depth": depth, "parameters": int(ravel_pytree(params)[0].size)}
    inverses = {}
    for name, model in (("scanned", lambda p, x: scanned(p, x)), ("unrolled", lambda p, x: unrolled(p, x))):
        start = time.perf_counter()
        rows = hvpopt.layer_coverage(model, params, data[0])
        entry = {"find_layers_s": time.perf_counter() - start}
        sizes = {row.treatment != "diagonal": 0 for row in rows}
        for row in rows:
            sizes[row.treatment != "diagonal"] = sizes.get(row.treatment != "diagonal", 0) + int(np.prod(row.shape))
        entry["coverage"] = sizes.get(True, 0) / sum(sizes.values())
        calls = {
            "statistics": lambda: hvpopt.kronecker_statistics(model, CE, params, data, chunk_size=BATCH),
            "ekfac_fit": lambda: hvpopt.fit_kronecker_factors(model, CE, params, data, chunk_size=BATCH),
        }
        for what, call in calls.items():
            first_s, compile_s, result = timed_call(call, spans=spans)
            entry[f"{what}_first_call_s"], entry[f"{what}_compile_s"] = first_s, compile_s
            entry |= summarize(round_robin({what: call}, min_rounds=3).seconds[what], prefix=f"{what}_work_")
        inverses[name] = ravel_pytree(hvpopt.kronecker_inverse(result, damping=1e-3)(vector))[0]
        record[name] = entry
        print(f"depth {depth:2d} {name:8s} " + " ".join(f"{k} {v:.3g}" for k, v in entry.items()), flush=True)
    difference = jnp.abs(inverses["scanned"] - inverses["unrolled"]).max() / jnp.abs(inverses["unrolled"]).max()
    record["ekfac_inverse_max_relative_difference"] = float(difference)
    for what in ("statistics", "ekfac_fit"):
        record[f"{what}_compile_ratio_scanned_to_unrolled"] = (
            record["scanned"][f"{what}_compile_s"] / record["unrolled"][f"{what}_compile_s"]
        )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="depths 2 and 4, written to the temporary folder")
    args = parser.parse_args()
    depths = (2, 4) if args.quick else (2, 6, 12)
    spans = CompileSpans()
    records = [measure(depth, spans) for depth in depths]
    deepest = records[-1]
    items = [
        {
            "target": f"{what} compile, scan / unrolled",
            "case": f"depth {deepest['depth']}",
            "measured": deepest[f"{what}_compile_ratio_scanned_to_unrolled"],
            "threshold": 1.0,
            "pass": deepest[f"{what}_compile_ratio_scanned_to_unrolled"] <= 1.0,
        }
        for what in ("statistics", "ekfac_fit")
    ]
    targets = {"num_pass": sum(item["pass"] for item in items), "num_targets": len(items), "items": items}
    report = {
        "benchmark": "layer_discovery",
        "environment": environment(("jax", "jaxlib", "hvpopt")),
        "model": {"width": WIDTH, "heads": HEADS, "length": LENGTH, "vocabulary": VOCAB, "batch": BATCH},
        "records": records,
        "targets": targets,
    }
    path = quick_path("bench_layer_discovery") if args.quick else results_path("bench_layer_discovery_cpu.json")
    write_results(path, report)
    print_targets(targets, target_width=34, case_width=10)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
