#!/usr/bin/env python
"""Benchmark of ``hvpopt.influence`` on the default small transformer: wall time, peak memory and accuracy per method.

The issue's target: 1,000 training examples x 100 queries on the 110,271-parameter
character transformer (``hvpopt train`` defaults), under 60 seconds for ``cg`` and
``arnoldi`` on 2 CPU cores.

What a run is. Every setting runs the whole pipeline as ``hvpopt influence score``
does (without its files): load the checkpoint; take the first N training examples,
the first Q validation examples as queries, and the curvature subset exactly as the
CLI picks it (``np.random.default_rng(seed).choice(N, curvature_examples)``, sorted);
``fit_inverse_curvature`` (curvature ``ggn``, the CLI's default for a checkpoint);
``query_directions``; every chunk of ``score_blocks`` (each block copied to the
host, which waits for it). Each setting runs in a fresh subprocess, so its peak
resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) and, on an accelerator, the
device's ``peak_bytes_in_use`` are its own.

Timing. ``total`` = fit + query solves + scoring, as seen by a user (compilation
included); process start, imports and checkpoint loading are reported apart. The
compilation inside each phase is measured, not estimated: JAX reports the time
spans of tracing, lowering and XLA compilation (``jax.monitoring`` events
``/jax/core/compile/*``) and the union of those spans inside a phase is its
``compile`` time; ``phase - compile`` is the ``steady`` (run) time. Nothing is
run twice.

Settings (defaults). ``chunk_size`` 64 as the CLI. Damping 1e-3 (the CLI's
default for this task, which has no L2 penalty) and 1e-2. ``arnoldi``: rank 50
(Lanczos with ``2 rank + 1`` products), fitted on 64 and 256 curvature
examples; its eigenpairs do not depend on the damping, so one fit serves both
dampings (each damping's row reports the shared fit plus its own solves and
scoring). ``cg`` and ``lissa`` solve every query separately (cost ~ queries x
iterations x curvature examples), so they run on 64 curvature examples: ``cg``
with maxiter 10 (about what fits the 60 s target here) and 25 (the accuracy a
little more time buys), the library's rtol 1e-4; ``lissa`` with 10 terms, at
damping 1e-2 only (at an affordable depth its series is still close to a scaled
identity at either damping). The CLI's defaults (256 examples, 50 CG
iterations, LiSSA depth 1000) would take tens of minutes to hours
(``extrapolated`` in the JSON, from the measured cost per iteration). ``exact``
is not run: it refuses more than 5,000 parameters (the dense curvature of
110,271 parameters would hold 1.2e10 numbers, 49 GB in float32).

Accuracy. The reference is ``(G + lambda I)^{-1}`` solved to convergence: a plain
conjugate gradient written here (independent of ``hvpopt.cg``; the two agreed to
Pearson 0.99999999 on two queries) on the library's Gauss-Newton operator of the
first cg/lissa curvature subset (64 examples), per damping, stopping at a
relative residual of 1e-3 or after 300 iterations, for the first 8 queries (the
100 would take longer than all the other runs together). The exact inverse
cannot be formed. The reference's own convergence is recorded: the residuals
(recurrence and true) and the correlation of its scores with those of an
iterate 50-100 iterations earlier. Each run's scores for those 8 queries are
compared with the reference at the same damping (``identity`` with each):
Pearson and Spearman correlation over all (query, training example) pairs, the
mean per-query Pearson, and the mean overlap of the top-10 proponents (largest
scores) and opponents. Runs on 256 curvature examples are compared with the
64-example reference (the difference then includes the subsampling of the
curvature; marked * and flagged in the JSON). ``arnoldi`` keeps the part of a
query gradient outside its top eigenvectors at ``1/damping``; the recorded
``bench_influence_cpu.json`` predates that: its arnoldi rows are the bare
projection, and its ``diagnostic_arnoldi_plus_complement`` entries what the
library computes now.

Usage (from the repository root):
  python benchmarks/bench_influence.py              # full run (15 min on 2 shared CPU cores, load 3-7)
  python benchmarks/bench_influence.py --quick      # smoke run in one process, in the temporary folder
  python benchmarks/bench_influence.py --methods cg,arnoldi --dampings 1e-2 --reference-queries 0   # timings only

Without ``--checkpoint`` the default model cached by ``hvpopt influence``
($HVPOPT_CACHE/shakespeare, default ~/.cache/hvpopt/shakespeare) is used; if it
is not there it is trained there by ``hvpopt train`` on its defaults, the model
``hvpopt influence`` trains (about 3 minutes on 2 CPU cores).
"""

import time

_PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import harness  # noqa: E402
import numpy as np  # noqa: E402
from harness import CompileSpans  # noqa: E402

DEFAULT_OUT = harness.results_path("bench_influence_cpu.json")
QUICK_OUT = harness.quick_path("bench_influence")
TARGET_SECONDS = 60.0
TARGET_METHODS = ("cg", "arnoldi")
#: Methods whose fit does not depend on the damping: fitted once, applied at every damping.
FIT_ONCE = ("arnoldi", "identity", "kfac", "ekfac")
TOP_K = 10


# --------------------------------------------------------------------------
# Worker side: one setting (or the reference) in its own process
# --------------------------------------------------------------------------


class Phase:
    """Times a phase by wall clock (``perf_counter``) and its compilation (from :class:`CompileSpans`)."""

    def __init__(self, spans: CompileSpans, name: str, record: dict):
        self.spans, self.name, self.record = spans, name, record

    def __enter__(self):
        self.wall0, self.perf0, self.cpu0 = time.time(), time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.perf0
        compile_s = self.spans.within(self.wall0, time.time())
        self.record[f"{self.name}_seconds"] = seconds
        self.record[f"{self.name}_compile_seconds"] = compile_s
        self.record[f"{self.name}_steady_seconds"] = seconds - compile_s
        self.record[f"{self.name}_cpu_seconds"] = time.process_time() - self.cpu0  # ~2x wall: both cores ours
        return False


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _device_peak_bytes():
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 (CPU backends may raise or return None)
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


@functools.lru_cache(maxsize=1)  # --in-process: load once
def _load(folder: str):
    from hvpopt.testbed import checkpoint

    return checkpoint.load_checkpoint(folder)


def _problem(spec: dict):
    """(task, params, train examples, query examples, curvature subsets by size), as the CLI builds them."""
    loaded = _load(spec["checkpoint"])
    task = loaded.task
    train = task.train.take(range(min(spec["train_examples"], task.train.num_examples)))
    queries = task.validation.take(range(min(spec["queries"], task.validation.num_examples)))

    def curvature_data(size):  # as hvpopt/cli/influence.py picks its curvature subset
        rng = np.random.default_rng(spec["seed"])
        chosen = np.sort(rng.choice(train.num_examples, min(size, train.num_examples), replace=False))
        subset = train.take(chosen)
        return subset.inputs, subset.targets

    return task, loaded.params, (train.inputs, train.targets), (queries.inputs, queries.targets), curvature_data


def _solver_summary(info: dict) -> dict:
    summary = {}
    for name, values in info.items():
        values = np.asarray(values)
        if values.dtype == bool:
            summary[f"fraction_{name}"] = float(values.mean())
        else:
            summary[f"max_{name}"] = float(values.max())
            summary[f"median_{name}"] = float(np.median(values))
    return summary


def worker(spec: dict) -> None:
    """Runs one setting; writes ``spec['result']`` (JSON) and ``spec['scores']`` (npz)."""
    import jax

    from hvpopt import influence

    import_seconds = time.perf_counter() - _PROCESS_START
    spans = CompileSpans()
    t0 = time.perf_counter()
    task, params, train, queries, curvature_data = _problem(spec)
    jax.block_until_ready(params)
    base = {
        "import_seconds": import_seconds,
        "load_seconds": time.perf_counter() - t0,
        "rss_after_load_mb": _rss_mb(),
        "cpu_load_at_start": os.getloadavg()[0],
    }
    loss_fn, model, chunk = task.example_loss, (task.model_fn, task.loss), spec["chunk_size"]
    if spec["kind"] == "reference":
        return _reference_worker(spec, base, spans, loss_fn, params, train, queries, curvature_data, model)

    method = spec["method"]
    results, scores = [], {}
    shared = {}
    data = curvature_data(spec["curvature_examples"]) if method != "identity" else None
    options = {
        "cg": {"maxiter": spec.get("cg_iterations")},
        "lissa": {"depth": spec.get("lissa_depth")},
        "arnoldi": {"rank": spec.get("rank")},
        "kfac": {},
        "ekfac": {},
        "identity": {},
    }[method]
    if method in FIT_ONCE:  # the fit does not depend on the damping: fit once
        with Phase(spans, "fit", shared):
            fitted = influence.fit_inverse_curvature(
                loss_fn,
                params,
                data if data is not None else train,
                method=method,
                damping=spec["dampings"][0],
                curvature="ggn",
                model=model,
                chunk_size=chunk,
                key=jax.random.key(spec["seed"]),
                **options,
            )
            jax.block_until_ready((fitted.eigenvalues, fitted.eigenvectors, fitted.factors))
        shared["fit_diagnostics"] = {k: np.asarray(v).tolist() for k, v in fitted.diagnostics.items()}
        if fitted.eigenvalues is not None:
            shared["fit_diagnostics"]["top_eigenvalues"] = np.asarray(fitted.eigenvalues)[::-1][:10].tolist()
            shared["fit_diagnostics"]["smallest_eigenvalue"] = float(np.min(fitted.eigenvalues))

    for damping in spec["dampings"]:
        record = {"damping": damping}
        if method in FIT_ONCE:
            record.update({k: v for k, v in shared.items()})
            if method in ("kfac", "ekfac"):
                apply = influence.kronecker_inverse_rows(fitted.factors, damping)
                inverse = fitted._replace(apply=apply, damping=damping)
            elif method == "arnoldi":
                inverse = influence.InverseCurvature(
                    influence.eigen_inverse(fitted.eigenvalues, fitted.eigenvectors, damping),
                    method,
                    damping,
                    fitted.eigenvalues,
                    fitted.eigenvectors,
                    fitted.diagnostics,
                )
            else:
                inverse = fitted
        else:
            with Phase(spans, "fit", record):
                inverse = influence.fit_inverse_curvature(
                    loss_fn,
                    params,
                    data,
                    method=method,
                    damping=damping,
                    curvature="ggn",
                    model=model,
                    chunk_size=chunk,
                    key=jax.random.key(spec["seed"]),
                    **options,
                )
            record["fit_diagnostics"] = {k: np.asarray(v).tolist() for k, v in inverse.diagnostics.items()}
        with Phase(spans, "query", record):
            directions, info = influence.query_directions(loss_fn, params, queries, inverse, chunk_size=chunk)
            jax.block_until_ready(directions)
        record["solver"] = _solver_summary(info)
        block_seconds = []
        with Phase(spans, "score", record):
            blocks = []
            for _, block in influence.score_blocks(loss_fn, params, train, directions, chunk_size=chunk):
                t = time.perf_counter()
                blocks.append(np.asarray(block))  # waits for the block, as the CLI's np.save does
                block_seconds.append(time.perf_counter() - t)
            matrix = np.concatenate(blocks, axis=1)
        record["score_chunks"] = len(blocks)
        record["total_seconds"] = record["fit_seconds"] + record["query_seconds"] + record["score_seconds"]
        record["total_compile_seconds"] = (
            record["fit_compile_seconds"] + record["query_compile_seconds"] + record["score_compile_seconds"]
        )
        record["total_steady_seconds"] = record["total_seconds"] - record["total_compile_seconds"]
        record["scores_finite"] = bool(np.all(np.isfinite(matrix)))
        scores[f"damping_{damping:g}"] = matrix
        results.append(record)
        if method == "identity":
            break  # no damping: one run
    out = {
        **base,
        "runs": results,
        "peak_rss_mb": _rss_mb(),
        "device_peak_bytes": _device_peak_bytes(),
        "cpu_load_at_end": os.getloadavg()[0],
        "process_seconds": time.perf_counter() - _PROCESS_START,
    }
    np.savez(spec["scores"], **scores)
    with open(spec["result"], "w") as file:
        json.dump(out, file, indent=1)


def _reference_worker(spec, base, spans, loss_fn, params, train, queries, curvature_data, model) -> None:
    """Converged CG (plain, written here) on the library's GGN operator, for the first ``reference_queries``."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from hvpopt import influence
    from hvpopt.influence import pearson

    data = curvature_data(spec["curvature_examples"])
    count = min(spec["reference_queries"], np.shape(queries[0])[0])
    queries = jax.tree.map(lambda x: x[:count], queries)
    gradients = jax.jit(influence.flat_example_gradients, static_argnums=0)(loss_fn, params, queries)
    rtol, maxiter, every = spec["reference_rtol"], spec["reference_maxiter"], 50

    @jax.jit
    def solve(params, data, b, damping):
        unravel = ravel_pytree(params)[1]
        operator = influence.curvature_operator(
            loss_fn, params, data, curvature="ggn", model=model, chunk_size=spec["chunk_size"]
        )
        single = lambda v: ravel_pytree(operator(unravel(v)))[0]
        apply = lambda rows: jax.vmap(single)(rows) + damping * rows
        b_norm = jnp.linalg.norm(b, axis=1)

        def cond(c):
            k, _, r, _, _, _, _, _ = c
            return (k < maxiter) & jnp.any(jnp.linalg.norm(r, axis=1) > rtol * b_norm)

        def body(c):
            k, x, r, p, rs, older, old, old_k = c
            ap = apply(p)
            alpha = rs / jnp.sum(p * ap, axis=1)
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            rs_new = jnp.sum(r * r, axis=1)
            p = r + (rs_new / rs)[:, None] * p
            k = k + 1
            snap = k % every == 0  # keep the iterates of the last two multiples of `every`
            older, old = jnp.where(snap, old, older), jnp.where(snap, x, old)
            old_k = jnp.where(snap, jnp.stack([old_k[1], k]), old_k)
            return k, x, r, p, rs_new, older, old, old_k

        zeros = jnp.zeros_like(b)
        init = (jnp.int32(0), zeros, b, b, jnp.sum(b * b, axis=1), zeros, zeros, jnp.zeros(2, jnp.int32))
        k, x, r, _, _, older, old, old_k = jax.lax.while_loop(cond, body, init)
        true_residual = jnp.linalg.norm(b - apply(x), axis=1) / b_norm
        return x, k, jnp.linalg.norm(r, axis=1) / b_norm, true_residual, older, old, old_k

    out = {**base, "reference_queries": count, "runs": []}
    scores = {}
    for damping in spec["dampings"]:
        record = {"damping": damping}
        with Phase(spans, "solve", record):
            x, k, rel, true_rel, older, old, old_k = jax.block_until_ready(
                solve(params, data, gradients, jnp.float32(damping))
            )
        old_k = np.asarray(old_k)
        earlier, earlier_k = (old, int(old_k[1])) if int(old_k[1]) < int(k) else (older, int(old_k[0]))
        with Phase(spans, "score", record):
            matrix = np.concatenate(
                [
                    np.asarray(b)
                    for _, b in influence.score_blocks(loss_fn, params, train, x, chunk_size=spec["chunk_size"])
                ],
                axis=1,
            )
            earlier_matrix = np.concatenate(
                [
                    np.asarray(b)
                    for _, b in influence.score_blocks(loss_fn, params, train, earlier, chunk_size=spec["chunk_size"])
                ],
                axis=1,
            )
        record.update(
            {
                "iterations": int(k),
                "max_relative_residual": float(np.max(rel)),
                "relative_residuals": np.asarray(rel).tolist(),
                "max_true_relative_residual": float(np.max(true_rel)),
                "earlier_iteration": earlier_k,
                "pearson_with_earlier_iterate": pearson(matrix, earlier_matrix) if earlier_k > 0 else None,
                "top10_overlap_with_earlier_iterate": _top_overlap(earlier_matrix, matrix) if earlier_k > 0 else None,
            }
        )
        scores[f"damping_{damping:g}"] = matrix
        out["runs"].append(record)
    out.update({"peak_rss_mb": _rss_mb(), "process_seconds": time.perf_counter() - _PROCESS_START})
    np.savez(spec["scores"], **scores)
    with open(spec["result"], "w") as file:
        json.dump(out, file, indent=1)


# --------------------------------------------------------------------------
# Accuracy against the reference
# --------------------------------------------------------------------------


def _top_overlap(a, b, k: int = TOP_K) -> float:
    """Mean over queries (rows) of |top-k of a ∩ top-k of b| / k, top-k = the k largest scores (proponents)."""
    overlaps = [len(set(np.argsort(-ra)[:k]) & set(np.argsort(-rb)[:k])) / k for ra, rb in zip(a, b)]
    return float(np.mean(overlaps))


def quality(matrix: np.ndarray, reference: np.ndarray) -> dict:
    from hvpopt.influence import pearson, spearman  # like jax, imported where used, not at start

    rows = None if reference is None else matrix[: reference.shape[0]]
    if rows is None or not np.all(np.isfinite(rows)):
        return {"pearson": None, "spearman": None, "mean_query_pearson": None, "top10_overlap": None}
    return {
        "pearson": pearson(rows, reference),
        "spearman": spearman(rows, reference),
        "mean_query_pearson": float(np.mean([pearson(r, q) for r, q in zip(rows, reference)])),
        "top10_overlap": _top_overlap(rows, reference),
        "top10_opponent_overlap": _top_overlap(-rows, -reference),
    }


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _checkpoint(args) -> str:
    from hvpopt.testbed import checkpoint

    if args.checkpoint:
        if not os.path.exists(os.path.join(args.checkpoint, checkpoint.CONFIG_FILE)):
            sys.exit(
                f"--checkpoint {args.checkpoint!r} holds no checkpoint: train one with "
                f"'hvpopt train --out {args.checkpoint}' (or leave --checkpoint out for the cached default)."
            )
        return os.path.abspath(args.checkpoint)
    folder = os.path.join(os.environ.get("HVPOPT_CACHE", os.path.expanduser("~/.cache/hvpopt")), "shakespeare")
    if not os.path.exists(os.path.join(folder, checkpoint.CONFIG_FILE)):  # train it as `hvpopt influence` would
        print(f"no --checkpoint and no cached default model: training it into {folder}", flush=True)
        subprocess.run([sys.executable, "-m", "hvpopt.cli", "train", "--out", folder], check=True)
    return os.path.abspath(folder)


def _run_worker(spec: dict, folder: str, name: str, in_process: bool) -> tuple[dict, dict]:
    spec = {**spec, "result": os.path.join(folder, f"{name}.json"), "scores": os.path.join(folder, f"{name}.npz")}
    t = time.perf_counter()
    if in_process:  # --quick: no per-process memory, compiled pieces shared between settings
        worker(spec)
    else:
        completed = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], capture_output=True, text=True
        )
        if completed.returncode != 0:
            print(completed.stderr[-4000:], file=sys.stderr)
            return {
                "error": completed.stderr[-2000:],
                "returncode": completed.returncode,
                "subprocess_seconds": time.perf_counter() - t,
            }, {}
    wall = time.perf_counter() - t
    with open(spec["result"]) as file:
        result = json.load(file)
    result["subprocess_seconds"] = wall
    with np.load(spec["scores"]) as saved:
        scores = {k: saved[k] for k in saved.files}
    if spec.get("save_scores"):
        os.makedirs(spec["save_scores"], exist_ok=True)
        shutil.copy(spec["scores"], os.path.join(spec["save_scores"], os.path.basename(spec["scores"])))
    return result, scores


def _settings(args) -> dict:
    if args.quick:
        return {
            "train_examples": 48,
            "queries": 6,
            "curvature_examples": [16],
            "solve_curvature_examples": [16],
            "factor_examples": [16],
            "dampings": [1e-2],
            "lissa_dampings": [1e-2],
            "cg_iterations": [3],
            "rank": 6,
            "lissa_depth": 3,
            "chunk_size": 16,
            "reference_queries": 3,
            "reference_rtol": 1e-3,
            "reference_maxiter": 60,
        }
    return {
        "train_examples": args.train_examples,
        "queries": args.queries,
        "curvature_examples": _int_list(args.curvature_examples),
        "solve_curvature_examples": _int_list(args.solve_curvature_examples),
        "factor_examples": _int_list(args.factor_examples),
        "dampings": _float_list(args.dampings),
        "lissa_dampings": _float_list(args.lissa_dampings),
        "cg_iterations": _int_list(args.cg_iterations),
        "rank": args.rank,
        "lissa_depth": args.lissa_depth,
        "chunk_size": args.chunk_size,
        "reference_queries": args.reference_queries,
        "reference_rtol": args.reference_rtol,
        "reference_maxiter": args.reference_maxiter,
    }


def _plan(methods: list[str], settings: dict) -> list[dict]:
    """One worker per (method, curvature examples); each covers every damping."""
    plan = []
    for method in methods:
        if method == "identity":
            plan.append({"method": "identity", "curvature_examples": None, "label": "identity"})
        elif method == "arnoldi":
            plan += [
                {
                    "method": "arnoldi",
                    "curvature_examples": n,
                    "rank": settings["rank"],
                    "label": f"arnoldi nc={n} rank={settings['rank']}",
                }
                for n in settings["curvature_examples"]
            ]
        elif method in ("kfac", "ekfac"):
            for n in settings["factor_examples"]:
                plan.append({"method": method, "curvature_examples": n, "label": f"{method} nc={n}"})
        elif method == "cg":
            plan += [
                {"method": "cg", "curvature_examples": n, "cg_iterations": k, "label": f"cg nc={n} maxiter={k}"}
                for n in settings["solve_curvature_examples"]
                for k in settings["cg_iterations"]
            ]
        elif method == "lissa":
            missing = sorted(set(settings["lissa_dampings"]) - set(settings["dampings"]))
            if missing:
                raise SystemExit(f"--lissa-dampings {missing} must be among --dampings (the reference's).")
            plan += [
                {
                    "method": "lissa",
                    "curvature_examples": n,
                    "lissa_depth": settings["lissa_depth"],
                    "dampings": settings["lissa_dampings"],
                    "label": f"lissa nc={n} depth={settings['lissa_depth']}",
                }
                for n in settings["solve_curvature_examples"]
            ]
        else:
            raise SystemExit(
                f"--methods: unknown method {method!r}; 'exact' cannot run on 110,271 parameters "
                "(the library refuses more than 5,000)."
            )
    return plan


def _extrapolations(rows: list[dict], settings: dict) -> dict:
    """Seconds the CLI's default solver settings would take, from this run's measured steady cost per iteration."""
    entries = []
    for row in rows:
        if row["method"] not in ("cg", "lissa") or "query_steady_seconds" not in row:
            continue
        if row["method"] == "cg":  # a vmapped CG runs until its slowest row stops
            steps, cli_steps = row["solver"].get("max_iterations", row["cg_iterations"]), 50
        else:
            steps, cli_steps = row["lissa_depth"], 1000
        per_step = row["query_steady_seconds"] / steps
        nc = row["curvature_examples"]
        entries.append(
            {
                "from": row["label"],
                "damping": row["damping"],
                "cli_default_steps": cli_steps,
                "steady_seconds_per_step_all_queries": per_step,
                "cli_default_seconds_by_curvature_examples": {
                    str(n): per_step * cli_steps * n / nc + row["score_steady_seconds"]
                    for n in sorted(set(settings["curvature_examples"]) | {nc, 256})
                },
            }
        )
    return {
        "note": "not measured: the query phase's steady seconds per iteration (all queries) x the CLI's default "
        "iterations (cg 50, lissa depth 1000), scaled linearly in curvature examples, plus the scoring "
        "phase's steady seconds; compilation excluded",
        "entries": entries,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a 'hvpopt train' checkpoint (default: the cached "
        "default model of 'hvpopt influence', trained and cached if absent)",
    )
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100, help="the first N validation examples")
    parser.add_argument(
        "--curvature-examples",
        default="64,256",
        help="comma list: curvature subsets for arnoldi (the CLI's default is 256)",
    )
    parser.add_argument(
        "--solve-curvature-examples",
        default="64",
        help="comma list: curvature subsets for cg and lissa (per-query solvers)",
    )
    parser.add_argument(
        "--factor-examples",
        default="256,1000",
        help="comma list: examples kfac and ekfac fit their factors on (1000: the whole training set)",
    )
    parser.add_argument("--dampings", default="1e-3,1e-2", help="comma list")
    parser.add_argument("--lissa-dampings", default="1e-2", help="comma list, among --dampings")
    parser.add_argument(
        "--methods",
        default="identity,cg,arnoldi,lissa,kfac,ekfac",
        help="comma list of identity, cg, arnoldi, lissa, kfac, ekfac ('exact' is impossible at this size)",
    )
    parser.add_argument("--cg-iterations", default="10,25", help="comma list: cg's maxiter (rtol 1e-4, the default)")
    parser.add_argument("--rank", type=int, default=50)
    parser.add_argument("--lissa-depth", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument(
        "--reference-queries",
        type=int,
        default=8,
        help="queries solved to convergence for the reference (0: no reference)",
    )
    parser.add_argument("--reference-rtol", type=float, default=1e-3)
    parser.add_argument("--reference-maxiter", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; --quick: {QUICK_OUT})")
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny sizes (< 1 minute)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every setting in this process (implied by "
        "--quick): faster, but peak memory and compile times are then not per setting",
    )
    parser.add_argument("--save-scores", metavar="DIR", help="keep every setting's score matrices (npz) in DIR")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    start = time.perf_counter()
    out_path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = _settings(args)
    plan = _plan(methods, settings)
    load_before = harness.cpu_load()
    common = {"checkpoint": _checkpoint(args), "seed": args.seed, "save_scores": args.save_scores, **settings}
    reference_nc = settings["solve_curvature_examples"][0]
    in_process = args.quick or args.in_process
    print(
        f"load before: {load_before}; {len(plan)} settings + the reference, "
        f"{'all in this process' if in_process else 'one process each'}",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="bench_influence_") as folder:
        if settings["reference_queries"] > 0:
            reference, reference_scores = _run_worker(
                {**common, "kind": "reference", "curvature_examples": reference_nc}, folder, "reference", in_process
            )
            if "error" in reference:
                raise SystemExit("the reference failed")
        else:
            reference, reference_scores = {"skipped": "--reference-queries 0", "runs": []}, {}
        for run in reference["runs"]:
            print(
                f"reference damping {run['damping']:g}: {run['iterations']} CG iterations, max relative residual "
                f"{run['max_true_relative_residual']:.2e} (true), Pearson with iteration {run['earlier_iteration']} "
                f"{run['pearson_with_earlier_iterate']}, {run['solve_seconds']:.1f} s",
                flush=True,
            )
        rows = []
        for item in plan:
            spec = {**common, "kind": "method", **item}
            result, scores = _run_worker(spec, folder, item["label"].replace(" ", "_").replace("=", ""), in_process)
            if "error" in result:
                rows.append({**item, "error": result["error"]})
                continue
            process = {k: v for k, v in result.items() if k != "runs"}
            for run in result["runs"]:
                matrix = scores[f"damping_{run['damping']:g}"]
                compared = [run["damping"]] if item["method"] != "identity" else settings["dampings"]
                for damping in compared:
                    row = {
                        **item,
                        **run,
                        "damping": damping if item["method"] != "identity" else None,
                        "reference_damping": damping,
                        "process": process,
                        "quality": quality(matrix, reference_scores.get(f"damping_{damping:g}")),
                        "reference_curvature_examples": reference_nc,
                        "curvature_differs_from_reference": item["curvature_examples"] not in (None, reference_nc),
                    }
                    row["meets_target"] = row["total_seconds"] < TARGET_SECONDS
                    rows.append(row)
                    print(_line(row), flush=True)

    report = {
        "benchmark": "bench_influence",
        "environment": harness.environment(("jax", "jaxlib", "flax", "optax", "numpy", "hvpopt")),
        "cpu_load_before": load_before,
        "cpu_load_after": harness.cpu_load(),
        "quick": args.quick,
        "in_process": in_process,
        "target": {
            "seconds": TARGET_SECONDS,
            "methods": list(TARGET_METHODS),
            "what": "fit + query solves + scoring (compilation included) of 1,000 training examples x 100 "
            "queries, the checkpoint already loaded",
        },
        "settings": {**{k: v for k, v in common.items()}, "curvature": "ggn", "methods": methods},
        "timing_method": (
            "wall clock (perf_counter) per phase, each phase ended by block_until_ready or by copying "
            "the score blocks to the host; compile = union of JAX's trace/lower/compile event spans "
            "(jax.monitoring /jax/core/compile/*) inside the phase; steady = phase - compile"
        ),
        "reference": {
            "what": f"plain CG (this script) on the GGN of the {reference_nc}-example curvature subset, "
            f"per damping, for the first {reference.get('reference_queries')} queries",
            **reference,
        },
        "runs": rows,
        "extrapolated": _extrapolations(
            [
                r
                for r in rows
                if "error" not in r and r.get("damping") is not None and r["reference_damping"] == r["damping"]
            ],
            settings,
        ),
        "wall_seconds_total": time.perf_counter() - start,
    }
    harness.write_results(out_path, report)
    print()
    print(_table(rows))
    print(
        f"\nwrote {out_path} ({report['wall_seconds_total']:.0f} s; load before {load_before}, "
        f"after {report['cpu_load_after']})"
    )
    return 0


def _line(row: dict) -> str:
    q = row["quality"]
    fmt = lambda v: "  n/a" if v is None else f"{v:5.3f}"
    damping = "-" if row["damping"] is None else f"{row['damping']:g}"
    return (
        f"{row['label']:<26} {damping:>6} {row['reference_damping']:>8g} {row['total_seconds']:7.1f} "
        f"{row['total_compile_seconds']:7.1f} {row['process']['peak_rss_mb']:7.0f} {fmt(q['pearson'])} "
        f"{fmt(q['spearman'])} {fmt(q['top10_overlap'])}  {'yes' if row['meets_target'] else 'no'}"
        f"{'  *' if row['curvature_differs_from_reference'] else ''}"
    )


def _table(rows: list[dict]) -> str:
    header = (
        f"{'setting':<26} {'damp':>6} {'ref damp':>8} {'total s':>7} {'compile':>7} {'RSS MB':>7} "
        f"{'pears':>5} {'spear':>5} {'top10':>5}  <60s"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['label']:<26} FAILED" if "error" in row else _line(row))
    lines.append(
        "total s = fit + query solves + scoring, compilation included; pears/spear/top10 against the "
        "converged-CG reference at 'ref damp' (* = other curvature subset than the reference's)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
