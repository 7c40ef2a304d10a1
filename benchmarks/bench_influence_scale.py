"""Influence at 100x the default model: a 10M-parameter character LM, end to end through the command line.

The model is the size of the common nanoGPT-Shakespeare one: the testbed's
transformer LM with 6 layers, width 384, 6 heads and 128-character windows of the
shipped Shakespeare text (10.8M parameters), trained briefly by ``hvpopt train``
(AdamW, ``--steps`` steps of 16 windows; its loss is reported, not a target).
Then ``hvpopt influence`` (EK-FAC, the defaults but for the options named)
scores 1,000 training windows against 100 validation windows, in a fresh process
with an empty compilation cache, as a first run is. Measured: the process's wall
time, its peak resident memory (``wait4``'s ``ru_maxrss``), and what the command
printed before starting (its memory estimate, ``metadata.json``), with the
compile and work seconds it recorded.

Options of the run (the command line's own, documented on ``docs/influence.rst``):
``--query-rank 32`` keeps each layer's 100 query directions at rank 32 (full
rank, 100 x 10.8M float32 directions alone take 4.3 GB); ``--chunk-size 16``
(the memory estimate names it: the fit holds a chunk's output gradients for
every sampled label).

A second part measures what rank 32 costs in accuracy: on the default language
model (``hvpopt influence``'s, 110k parameters, cached by it), EK-FAC scores of
1,000 training windows on 100 queries at full rank and at rank 32, the same
factors; Pearson correlation over all pairs and the mean per query.

Targets (issue "Influence faster than kronfluence end to end, and at 100x the
parameters"): the 10M run in at most 10 minutes and 4 GB of peak memory, the
estimate within 25% of the measured peak; rank 32 at Pearson >= 0.95.

Usage::

    python benchmarks/bench_influence_scale.py            # about 12 minutes on 2 CPU cores
    python benchmarks/bench_influence_scale.py --quick    # width 128, 2 layers, 200 windows, to the temporary folder
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import harness
import jax
import numpy as np

from hvpopt import influence
from hvpopt.testbed import checkpoint

HVPOPT = [sys.executable, "-m", "hvpopt.cli"]
RANK, TARGET_SECONDS, TARGET_BYTES, TARGET_ESTIMATE, TARGET_PEARSON = 32, 600.0, 4 * 2**30, 0.25, 0.95


def run(command: list[str], env: dict) -> dict:
    """``command`` in a fresh process: its wall seconds, peak resident bytes, exit status and output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # reaped here, so that its own peak memory is read
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        return {"seconds": seconds, "returncode": os.waitstatus_to_exitcode(status), "stdout": out.read(),
                "stderr": err.read(), "peak_bytes": usage.ru_maxrss * 1024}  # fmt: skip


def train(folder: str, model: list[str], steps: int, env: dict) -> dict:
    """The checkpoint, trained once (kept in ``folder`` for later runs)."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return {"reused": folder}
    command = [*HVPOPT, "train", "--out", folder, "--steps", str(steps), "--batch-size", "16", "--eval-every",
               str(steps), "--no-progress", "--json", *model]  # fmt: skip
    done = run(command, env)
    if done["returncode"] != 0:
        raise SystemExit(f"training failed:\n{done['stderr'][-3000:]}")
    summary = json.loads(done["stdout"])
    return {"seconds": done["seconds"], "summary": summary}


def influence_run(folder: str, out: str, num_train: int, num_queries: int, env: dict) -> dict:
    command = [*HVPOPT, "influence", "--checkpoint", folder, "--train-examples", str(num_train), "--num-queries",
               str(num_queries), "--query-rank", str(RANK), "--chunk-size", "16", "--out", out,
               "--no-progress"]  # fmt: skip
    done = run(command, env)
    if done["returncode"] != 0:
        raise SystemExit(f"influence failed:\n{done['stderr'][-3000:]}")
    metadata = json.load(open(os.path.join(out, "metadata.json")))
    memory = metadata["memory"]
    return {
        "command": " ".join(command[2:]),
        "wall_seconds": done["seconds"],
        "peak_resident_bytes": done["peak_bytes"],
        "estimated_peak_bytes": memory.get("estimated_peak_bytes"),
        "estimate_stages_bytes": memory.get("stages_bytes"),
        "estimate_error": memory["estimated_peak_bytes"] / done["peak_bytes"] - 1,
        "seconds": metadata["seconds"],
        "diagnostics": metadata["diagnostics"],
        "problem": metadata["problem"],
        "stderr_head": done["stderr"].splitlines()[:4],
    }


def rank_agreement(num_train: int, num_queries: int, env: dict) -> dict:
    """Full rank against rank 32 on the default LM (trained and cached by ``hvpopt influence`` if missing)."""
    folder = os.path.join(os.environ.get("HVPOPT_CACHE", os.path.expanduser("~/.cache/hvpopt")), "shakespeare")
    if not os.path.exists(os.path.join(folder, "config.json")):
        with tempfile.TemporaryDirectory() as out:
            run([*HVPOPT, "influence", "--out", out, "--no-progress"], env)
    loaded = checkpoint.load_checkpoint(folder)
    task, params = loaded.task, loaded.params
    train, queries = task.train.take(range(num_train)), task.validation.take(range(num_queries))
    model = (task.model_fn, task.loss)
    curvature = task.train.take(np.sort(np.random.default_rng(0).choice(task.train.num_examples, 256, False)))
    inverse = influence.fit_inverse_curvature(None, params, (curvature.inputs, curvature.targets), method="ekfac",
                                              curvature="ggn", model=model, damping=1e-3)  # fmt: skip
    scores = {
        rank: np.asarray(
            influence.pairwise_scores(
                None,
                params,
                (train.inputs, train.targets),
                (queries.inputs, queries.targets),
                inverse=inverse,
                query_rank=rank,
            )
        )  # fmt: skip
        for rank in (None, RANK)
    }
    full, low = scores[None], scores[RANK]
    return {
        "problem": task.describe(),
        "num_train": num_train,
        "num_queries": num_queries,
        "rank": RANK,
        "pearson": influence.pearson(full.ravel(), low.ravel()),
        "mean_query_pearson": float(np.mean([influence.pearson(a, b) for a, b in zip(full, low)])),
        "mean_query_spearman": float(np.mean([influence.spearman(a, b) for a, b in zip(full, low)])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the 10M model")
    parser.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "hvpopt-scale-lm"))
    args = parser.parse_args()
    width, layers, heads = (128, 2, 4) if args.quick else (384, 6, 6)
    num_train, num_queries = (200, 20) if args.quick else (1000, 100)
    model = ["--model", f"d_model={width}", "--model", f"num_layers={layers}", "--model", f"num_heads={heads}",
             "--data", "context_length=128"]  # fmt: skip
    folder = args.checkpoint + ("-quick" if args.quick else "")
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "HVPOPT_COMPILATION_CACHE": cache}  # empty: a first run's compilation
        trained = train(folder, model, 5 if args.quick else args.steps, env)
        print(f"trained: {trained.get('summary', trained)}", flush=True)
        scale = influence_run(folder, os.path.join(out, "scores"), num_train, num_queries, env)
    print(
        f"{scale['problem']}\n  end to end {scale['wall_seconds']:.0f} s "
        f"(compile {scale['seconds']['compile_seconds']:.0f} s), "
        f"peak {scale['peak_resident_bytes'] / 2**30:.2f} GB, estimated {scale['estimated_peak_bytes'] / 2**30:.2f} GB "
        f"({scale['estimate_error']:+.0%})",
        flush=True,
    )
    agreement = rank_agreement(num_train, num_queries, {**os.environ})
    print(f"rank {RANK} vs full on the default LM: Pearson {agreement['pearson']:.4f}", flush=True)
    items = [
        ("end to end <= 600 s", "10M LM", scale["wall_seconds"], TARGET_SECONDS),
        ("peak memory <= 4 GB", "10M LM", scale["peak_resident_bytes"] / 2**30, TARGET_BYTES / 2**30),
        ("|estimate / peak - 1| <= 0.25", "10M LM", abs(scale["estimate_error"]), TARGET_ESTIMATE),
        ("1 - Pearson(rank 32, full) <= 0.05", "default LM", 1 - agreement["pearson"], 1 - TARGET_PEARSON),
    ]
    targets = {
        "items": [{"target": t, "case": c, "measured": m, "threshold": th, "pass": m <= th} for t, c, m, th in items]
    }
    targets |= {"num_pass": sum(i["pass"] for i in targets["items"]), "num_targets": len(items)}
    harness.print_targets(targets, target_width=36)
    report = {
        "benchmark": "bench_influence_scale",
        "environment": harness.environment(("jax", "jaxlib", "flax", "optax")),
        "cpu_load": harness.cpu_load(),
        "trained": trained,
        "scale": scale,
        "rank_agreement": agreement,
        "targets": targets,
        "jax_devices": [str(d) for d in jax.devices()],
    }
    path = (
        harness.quick_path("bench_influence_scale")
        if args.quick
        else harness.results_path("bench_influence_scale_cpu.json")
    )
    harness.write_results(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
