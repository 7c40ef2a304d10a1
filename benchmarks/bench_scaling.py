#!/usr/bin/env python
"""Scaling of hvpopt over 1, 2, 4, 8 devices: a Gauss-Newton product, a CG solve and an influence scoring run.

Caveat first. On CPU the devices are simulated: the script appends
``--xla_force_host_platform_device_count=8`` to ``XLA_FLAGS`` before JAX is
imported (unless ``XLA_FLAGS`` already sets a count), and the eight "devices"
share the same cores (2 here). Splitting a batch over them cannot make it
faster; the numbers measure the overhead of the sharded programs (partitioning,
all-reduces, per-device dispatch, smaller per-device kernels), and ``t1/tD``
below 1 (weak scaling) or below D (strong scaling) is expected. On a machine
with several accelerators the same script measures real scaling; device counts
beyond the devices present are skipped and listed in the JSON.

Model and data. The ``shakespeare`` task's character transformer language model
(``hvpopt.testbed.tasks.make_task``: context 32, d_model 64, 2 layers, 4 heads, 110,271
parameters, float32) at its initial parameters; batches are the first training
sequences, queries the first validation sequences; vectors are standard
normal (key 0).

Workloads, each on a one-axis mesh of the first D devices (``hvpopt.data_mesh``),
parameters and vectors replicated (``hvpopt.replicate``):

* ``ggn_product``: ``jax.jit`` of ``hvpopt.ggn_vp`` on a batch split over the
  devices (``hvpopt.shard_batch``): each device's share, one all-reduce.
* ``cg_solve``: ``jax.jit`` of ``hvpopt.cg`` on the ``hvpopt.ggn_operator`` of a
  split batch, damping 1e-2, ``rtol=0`` so that every device count runs exactly
  ``maxiter`` (10) iterations.
* ``influence``: the whole ``hvpopt.influence.pairwise_scores(..., method="cg",
  curvature="ggn", mesh=mesh)`` call (a Python pipeline: CG fit on the training
  examples, query gradients and solves, scoring), 4 queries, damping 1e-2,
  ``maxiter`` 5 with ``rtol=0``; ``chunk_size`` = the number of training
  examples, so the curvature data and the one gradient chunk are each split
  over the devices, one share per device.

Modes. Weak scaling: the examples per device fixed (products: 16 sequences;
influence: 16 training examples), the total growing as 16 D. Strong scaling:
the total fixed (64 sequences; 64 training examples), 64 / D per device. Every
(workload, mode) reports ``t1/tD``, the median time on one device over the
median on D, both measured in the same run; ideal: D for strong scaling, 1.0
for weak scaling (``efficiency`` = ``t1/tD`` over the ideal).

Timing. The first call of each configuration is timed alone (``first_call_s``);
its compilation, measured not estimated, is the union of the spans of JAX's
trace, lowering and XLA compile events (``jax.monitoring``
``/jax/core/compile/*``) inside the call (``compile_s``). It leaves out what an
earlier configuration already compiled: influence's per-example gradient and
scoring programs are shared by configurations of the same chunk and mesh
(weak scaling on 4 devices reuses strong scaling's). Then every device
count of a (workload, mode) is called in round-robin rounds (order reversed
every other round, so that machine load hits each alike), each call ended by
``jax.block_until_ready``: median, min and max over the rounds. The compile
spans inside each timed call are recorded too, and ``steady_*`` = call -
compilation inside it beside the whole call: they should be zero (the
jitted workloads, and ``pairwise_scores`` since it compiles once per model;
before that fix its CG solver recompiled at every call, ~80% of the call).

Correctness. Every sharded result is compared with the one-device result of
the same examples (a measured D = 1 run where one has them, else a separate,
untimed one-device run; ``reference`` in the JSON says which):
``max_relative_difference`` = the largest ``max|sharded - one device|`` over
``max|one device|`` among the result's arrays (the CG solve's iteration count
included). They differ only by the order of float32 sums; ``agrees`` is
``max_relative_difference <= 1e-3``.

Output: a table, and a JSON (``benchmarks/results/bench_scaling_<backend>.json``:
``_cpu`` or ``_gpu``) with the machine, devices and versions, the settings and
every timed call. ``--quick`` (1 and 2 devices, a one-layer d_model 32 model,
context 16, batches of 4 per device and 8 in all, fewer repeats) is a smoke
run of every code path; its numbers are not the benchmark.

Usage (from the repository root):
  python benchmarks/bench_scaling.py            # full run, ~3 min on 2 shared CPU cores
  python benchmarks/bench_scaling.py --quick    # smoke run (~1 min), writes to the temporary folder
  python benchmarks/bench_scaling.py --devices 1,2 --per-device-batch 64 --total-batch 256
"""

import os
import sys

SIMULATED_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={SIMULATED_DEVICES}"
    ).strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import harness  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax.tree_utils as otu  # noqa: E402
from harness import CompileSpans  # noqa: E402

import hvpopt  # noqa: E402
from hvpopt.testbed import tasks  # noqa: E402

QUICK_OUT = harness.quick_path("bench_scaling")
WORKLOADS = ("ggn_product", "cg_solve", "influence")
MODES = ("strong", "weak")
AGREEMENT_TOLERANCE = 1e-3
FULL = {
    "devices": [1, 2, 4, 8],
    "context_length": 32,
    "model_options": {},
    "per_device_batch": 16,
    "total_batch": 64,
    "train_per_device": 16,
    "train_total": 64,
    "queries": 4,
    "damping": 1e-2,
    "cg_iterations": 10,
    "influence_maxiter": 5,
    "repeats": {"ggn_product": 10, "cg_solve": 5, "influence": 3},
}
QUICK = {
    **FULL,
    "devices": [1, 2],
    "context_length": 16,
    "model_options": {"d_model": 32, "num_layers": 1},
    "per_device_batch": 4,
    "total_batch": 8,
    "train_per_device": 4,
    "train_total": 8,
    "queries": 2,
    "cg_iterations": 3,
    "influence_maxiter": 2,
    "repeats": {"ggn_product": 3, "cg_solve": 2, "influence": 1},
}


# --------------------------------------------------------------------------
# Workloads: (task, settings, mesh, total examples) -> a call with no arguments
# --------------------------------------------------------------------------


def ggn_product(task, params, vector, inputs, targets):
    return hvpopt.ggn_vp(task.model_fn, task.loss, params, vector, inputs, targets)


def cg_solve(task, settings, params, vector, inputs, targets):
    operator = hvpopt.ggn_operator(task.model_fn, task.loss, params, inputs, targets)
    result = hvpopt.cg(operator, vector, damping=settings["damping"], rtol=0.0, maxiter=settings["cg_iterations"])
    return result.x, result.iterations


def jitted_call(function: Callable, task, mesh, total: int) -> Callable[[], Any]:
    """``function(params, vector, inputs, targets)`` jitted, on the first ``total`` sequences split over ``mesh``."""
    vector = otu.tree_random_like(jax.random.key(0), task.params)
    params, vector = hvpopt.replicate((task.params, vector), mesh)
    inputs, targets = hvpopt.shard_batch(tasks.first_batch(task, total), mesh)
    jitted = jax.jit(function)
    return lambda: jitted(params, vector, inputs, targets)


def influence_call(task, settings: dict, mesh, total: int) -> Callable[[], Any]:
    """The whole ``pairwise_scores`` pipeline on the first ``total`` training sequences, one chunk."""
    train = tasks.first_batch(task, total)
    head = task.validation.take(range(settings["queries"]))
    queries = (head.inputs, head.targets)
    return lambda: hvpopt.influence.pairwise_scores(
        task.example_loss,
        task.params,
        train,
        queries,
        method="cg",
        damping=settings["damping"],
        curvature="ggn",
        model=(task.model_fn, task.loss),
        chunk_size=total,
        mesh=mesh,
        maxiter=settings["influence_maxiter"],
        rtol=0.0,
    )


def make_call(workload: str, task, settings: dict, devices: int, total: int) -> Callable[[], Any]:
    mesh = hvpopt.data_mesh(devices)
    if workload == "influence":
        return influence_call(task, settings, mesh, total)
    function = {
        "ggn_product": functools.partial(ggn_product, task),
        "cg_solve": functools.partial(cg_solve, task, settings),
    }[workload]
    return jitted_call(function, task, mesh, total)


def total_examples(workload: str, mode: str, devices: int, settings: dict) -> int:
    if workload == "influence":
        return settings["train_total"] if mode == "strong" else settings["train_per_device"] * devices
    return settings["total_batch"] if mode == "strong" else settings["per_device_batch"] * devices


# --------------------------------------------------------------------------
# Comparison with one device
# --------------------------------------------------------------------------


def max_relative_difference(result: Any, reference: Any) -> float:
    """Largest ``max|result - reference| / max|reference|`` over the arrays of the two pytrees."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(reference)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)))
    return worst


# --------------------------------------------------------------------------
# One (workload, mode) over every device count
# --------------------------------------------------------------------------


def run_mode(
    workload: str, mode: str, task, settings: dict, device_counts: list[int], spans: CompileSpans, references: dict
) -> list[dict]:
    """Measures every device count; ``references`` caches one-device results by (workload, total examples)."""
    totals = {d: total_examples(workload, mode, d, settings) for d in device_counts}
    calls = {d: make_call(workload, task, settings, d, totals[d]) for d in device_counts}
    records, outputs = {}, {}
    for devices, call in calls.items():
        first_call_s, compile_s, outputs[devices] = harness.timed_call(call, spans=spans)
        records[devices] = {
            "workload": workload,
            "mode": mode,
            "devices": devices,
            "examples_per_device": totals[devices] // devices,
            "total_examples": totals[devices],
            "first_call_s": first_call_s,
            "compile_s": compile_s,
        }
        print(
            f"  {workload} {mode} D={devices}: first call {first_call_s:.2f} s (compile {compile_s:.2f} s)", flush=True
        )
    references.setdefault((workload, totals[1]), outputs[1])
    timings = harness.round_robin(calls, min_rounds=settings["repeats"][workload], spans=spans)
    for devices, seconds in timings.seconds.items():
        compile_s = timings.compile_seconds[devices]
        steady = [s - c for s, c in zip(seconds, compile_s)]
        reference, separate = reference_result(workload, task, settings, totals[devices], references)
        records[devices].update(
            {
                "seconds": seconds,
                "compile_in_call_s": compile_s,
                **harness.summarize(seconds),
                **harness.summarize(steady, prefix="steady_"),
                "max_relative_difference": max_relative_difference(outputs[devices], reference),
                "reference": "separate one-device run" if separate else "a measured one-device run",
            }
        )
        records[devices]["agrees"] = records[devices]["max_relative_difference"] <= AGREEMENT_TOLERANCE
    add_speedups(list(records.values()), mode)
    return list(records.values())


def reference_result(workload: str, task, settings: dict, total: int, references: dict) -> tuple[Any, bool]:
    """The one-device result for ``total`` examples (computed untimed if not measured), and whether it was."""
    key = (workload, total)
    separate = key not in references
    if separate:
        references[key] = jax.block_until_ready(make_call(workload, task, settings, 1, total)())
    return references[key], separate


def add_speedups(records: list[dict], mode: str) -> None:
    one = next(r for r in records if r["devices"] == 1)
    for record in records:
        ideal = record["devices"] if mode == "strong" else 1.0
        speedup = one["median_s"] / record["median_s"]
        steady_speedup = one["steady_median_s"] / record["steady_median_s"]
        record.update(
            {
                "t1_over_tD": speedup,
                "steady_t1_over_tD": steady_speedup,
                "ideal_t1_over_tD": ideal,
                "efficiency": speedup / ideal,
                "steady_efficiency": steady_speedup / ideal,
            }
        )


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def settings_from(args) -> dict:
    settings = dict(QUICK if args.quick else FULL)
    for name in ("per_device_batch", "total_batch", "train_per_device", "train_total"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.devices:
        settings["devices"] = [int(d) for d in args.devices.split(",") if d.strip()]
    if 1 not in settings["devices"]:
        raise SystemExit("--devices must include 1: speed-ups are relative to one device.")
    for name in ("total_batch", "train_total"):
        uneven = [d for d in settings["devices"] if settings[name] % d]
        if uneven:
            raise SystemExit(
                f"--{name.replace('_', '-')} {settings[name]} cannot be split evenly over "
                f"{uneven} devices; use a multiple of every device count."
            )
    return settings


def available_device_counts(requested: list[int]) -> tuple[list[int], dict]:
    """The requested counts this backend has devices for, and why the others are skipped."""
    present = jax.device_count()
    skipped = {str(d): f"only {present} {jax.default_backend()} device(s)" for d in requested if d > present}
    return sorted(d for d in requested if d <= present), skipped


def format_table(records: list[dict]) -> str:
    header = (
        f"{'workload':<12} {'mode':<6} {'D':>2} {'per dev':>7} {'total':>5} {'compile':>7} "
        f"{'median s':>8} {'min':>7} {'max':>7} {'in-call':>7} {'t1/tD':>6} {'steady':>6} "
        f"{'ideal':>5} {'max rel diff':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            f"{r['workload']:<12} {r['mode']:<6} {r['devices']:>2} {r['examples_per_device']:>7} "
            f"{r['total_examples']:>5} {r['compile_s']:7.2f} {r['median_s']:8.3f} {r['min_s']:7.3f} "
            f"{r['max_s']:7.3f} {np.median(r['compile_in_call_s']):7.2f} {r['t1_over_tD']:6.2f} "
            f"{r['steady_t1_over_tD']:6.2f} {r['ideal_t1_over_tD']:5.0f} {r['max_relative_difference']:12.1e}"
            f"{'' if r['agrees'] else '  DISAGREES'}"
        )
    lines.append(
        "compile = compilation in the first call; in-call = median compilation inside the timed calls; "
        "t1/tD = median on 1 device / median on D; steady = the same without in-call compilation; "
        "ideal = D (strong) or 1 (weak)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", help="comma list of device counts, including 1 (default 1,2,4,8)")
    parser.add_argument("--per-device-batch", type=int, help="weak scaling of the products: sequences per device")
    parser.add_argument("--total-batch", type=int, help="strong scaling of the products: sequences in all")
    parser.add_argument("--train-per-device", type=int, help="weak scaling of influence: training examples per device")
    parser.add_argument("--train-total", type=int, help="strong scaling of influence: training examples in all")
    parser.add_argument(
        "--out", help=f"JSON output (default benchmarks/results/bench_scaling_<backend>.json; --quick: {QUICK_OUT})"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller model and sizes, fewer repeats")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    settings = settings_from(args)
    device_counts, skipped = available_device_counts(settings["devices"])
    backend = jax.default_backend()
    out_path = args.out or (QUICK_OUT if args.quick else harness.results_path(f"bench_scaling_{backend}.json"))
    load_before = harness.cpu_load()
    spans = CompileSpans()
    task = tasks.make_task(
        "shakespeare",
        data_options={"context_length": settings["context_length"]},
        model_options=settings["model_options"],
    )
    print(
        f"{task.describe()}\n{jax.device_count()} {backend} devices; measuring {device_counts}"
        f"{f', skipping {sorted(skipped)}' if skipped else ''}; load before {load_before}",
        flush=True,
    )

    references, records = {}, []
    for workload in WORKLOADS:
        for mode in MODES:  # strong first: its one-device run is also weak scaling's reference at that size
            records += run_mode(workload, mode, task, settings, device_counts, spans, references)

    report = {
        "benchmark": "bench_scaling",
        "environment": harness.environment(("jax", "jaxlib", "flax", "optax", "numpy", "hvpopt")),
        "cpu_load_before": load_before,
        "cpu_load_after": harness.cpu_load(),
        "quick": args.quick,
        "simulated_cpu_devices": backend == "cpu",
        "caveat": (
            "simulated CPU devices share the same cores: only the overhead of sharding is measured"
            if backend == "cpu"
            else None
        ),
        "device_counts": device_counts,
        "skipped_device_counts": skipped,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "task": task.config,
        "parameters": harness.num_params(task.params),
        "settings": {
            **settings,
            "agreement_tolerance": AGREEMENT_TOLERANCE,
            "dtype": "float32",
            "influence_chunk_size": "the number of training examples (one chunk)",
        },
        "timing_method": (
            "first call timed alone, its compilation = union of JAX's trace/lower/compile event spans "
            "(jax.monitoring /jax/core/compile/*) inside it; then round-robin rounds over the device "
            "counts of a (workload, mode), order reversed every other round, each call ended by "
            "jax.block_until_ready; steady = call - compilation inside it"
        ),
        "runs": records,
        "wall_seconds_total": time.perf_counter() - start,
    }
    harness.write_results(out_path, report)
    print()
    print(format_table(records))
    print(
        f"\nwrote {out_path} ({report['wall_seconds_total']:.0f} s; load before {load_before}, "
        f"after {report['cpu_load_after']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
