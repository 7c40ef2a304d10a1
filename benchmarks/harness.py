"""What every benchmark shares: interleaved timing, compile time apart, a parameter count, the results file.

Imported by the scripts beside it (``python benchmarks/bench_X.py`` puts this folder
on ``sys.path``); it is not part of the installed package and uses only hvpopt's
public API.

Timing (:func:`round_robin`): the candidates are called in rounds, every candidate once
a round, the order reversed every other round, so that a change of machine load hits
each alike; every call is closed by ``jax.block_until_ready`` before the timer stops.
Compilation is measured apart, either ahead of time (:func:`compile_timed`,
:func:`lower_and_compile_timed`) or, for a pipeline that compiles as it goes, as the
union of JAX's own trace/lower/compile event spans inside a call (:class:`CompileSpans`).
:func:`summarize` reduces the times to median, min and max (and quartiles, mean or
spread where a benchmark records them).

Recording (:func:`environment`, :func:`write_results`): the machine, devices, library
versions and the hvpopt source revision (commit and a digest of uncommitted changes),
written atomically so a crash leaves the previous results whole.
"""

import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

import hvpopt
from hvpopt.testbed.files import write_atomically

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
STATISTICS = {
    "median": np.median,
    "p25": lambda a: np.percentile(a, 25),
    "p75": lambda a: np.percentile(a, 75),
    "min": np.min,
    "max": np.max,
    "mean": np.mean,
    "std": np.std,
}


# ---------------------------------------------------------------- paths and sizes


def results_path(name: str) -> str:
    """``benchmarks/results/NAME``, wherever the benchmark is run from."""
    return os.path.join(RESULTS_DIR, name)


def quick_path(benchmark: str) -> str:
    """Where a ``--quick`` smoke run writes: the temporary folder, never over the committed results."""
    return os.path.join(tempfile.gettempdir(), f"{benchmark}_quick.json")


def num_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------- timing


class CompileSpans:
    """Collects JAX's compile-time spans (trace, lowering, XLA compile) to measure compilation inside a call."""

    def __init__(self):
        self.spans = []
        jax.monitoring.register_event_time_span_listener(self.record)

    def record(self, event, start, end, **_):
        if event in COMPILE_EVENTS:
            self.spans.append((start, end))

    def within(self, start: float, end: float) -> float:
        """Seconds of [start, end] (``time.time()``) covered by at least one compile span."""
        clipped = sorted((max(s, start), min(e, end)) for s, e in self.spans if e > start and s < end)
        total, cursor = 0.0, start
        for s, e in clipped:
            s = max(s, cursor)
            if e > s:
                total += e - s
                cursor = e
        return total


def lower_and_compile_timed(fn: Callable, *args) -> tuple[Any, float, float]:
    """``(compiled, lower seconds, compile seconds)`` of ``jax.jit(fn).lower(*args).compile()``."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def compile_timed(fn: Callable, *args) -> tuple[Any, float]:
    """``(compiled, seconds)`` of ``jax.jit(fn).lower(*args).compile()``, lowering included."""
    compiled, lower_s, compile_s = lower_and_compile_timed(fn, *args)
    return compiled, lower_s + compile_s


def timed_call(
    call: Callable[[], Any], sync: Callable[[Any], Any] = jax.block_until_ready, spans: CompileSpans | None = None
) -> tuple[float, float | None, Any]:
    """``(seconds, seconds of compilation inside them or None, output)`` of one call, waited for by ``sync``."""
    wall0, start = time.time(), time.perf_counter()
    output = call()
    sync(output)
    seconds = time.perf_counter() - start
    return seconds, None if spans is None else spans.within(wall0, time.time()), output


class Timings(NamedTuple):
    """What :func:`round_robin` measured: per candidate, one entry per round."""

    seconds: dict[Any, list[float]]
    compile_seconds: dict[Any, list[float]] | None  # compilation inside each call (with ``spans``)
    rounds: int


def round_robin(
    calls: dict[Any, Callable[[], Any]],
    *,
    min_rounds: int,
    max_rounds: int | None = None,
    budget_s: float = 0.0,
    warmup: int = 0,
    sync: Callable[[Any], Any] = jax.block_until_ready,
    spans: CompileSpans | None = None,
) -> Timings:
    """Times every call in interleaved rounds, the order reversed every other round.

    ``warmup`` untimed rounds first. The number of rounds is sized from the first
    timed round: ``ceil(budget_s / round seconds)``, clamped to ``[min_rounds,
    max_rounds]`` (``budget_s=0``: exactly ``min_rounds``).
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            sync(calls[name]())
    seconds = {name: [] for name in names}
    compile_seconds = None if spans is None else {name: [] for name in names}

    def one_round(order):
        for name in order:
            s, c, _ = timed_call(calls[name], sync, spans)
            seconds[name].append(s)
            if spans is not None:
                compile_seconds[name].append(c)

    t0 = time.perf_counter()
    one_round(names)
    round_s = time.perf_counter() - t0
    rounds = max(min_rounds, math.ceil(budget_s / max(round_s, 1e-9)))
    rounds = int(rounds if max_rounds is None else min(max_rounds, rounds))
    for r in range(1, rounds):
        one_round(names if r % 2 == 0 else names[::-1])
    return Timings(seconds, compile_seconds, rounds)


def summarize(times: list[float], fields: tuple[str, ...] = ("median", "min", "max"), prefix: str = "") -> dict:
    """``{prefix + field + "_s": value}`` for fields of :data:`STATISTICS`; ``"repeats"`` counts the times."""
    arr = np.asarray(times)
    out = {}
    for field in fields:
        if field == "repeats":
            out[f"{prefix}repeats"] = int(arr.size)
        else:
            out[f"{prefix}{field}_s"] = float(STATISTICS[field](arr))
    return out


@contextlib.contextmanager
def contention(record: dict) -> Iterator[dict]:
    """Fills ``record`` with the load average before and after the block, its wall time and the process CPU/wall."""
    before, wall0, cpu0 = cpu_load(), time.perf_counter(), time.process_time()
    yield record
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    record.update(
        loadavg_before=before,
        loadavg_after=cpu_load(),
        timing_wall_s=wall,
        process_cpu_s=cpu,
        process_cpu_per_wall=cpu / wall,
    )


# ---------------------------------------------------------------- recording


def cpu_load() -> dict:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    try:
        return dict(zip(("1min", "5min", "15min"), os.getloadavg()))
    except OSError:
        return {}


def git_state() -> dict:
    """Commit and local modifications (tracked and untracked) of the hvpopt sources."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(hvpopt.__file__)))

    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--", "hvpopt").strip()
    digest = hashlib.sha1(git("diff", "HEAD", "--", "hvpopt").encode())
    for line in status.splitlines():
        if line.startswith("??"):
            path = os.path.join(root, line[3:].strip())
            for dirpath, _, files in os.walk(path) if os.path.isdir(path) else [("", None, [path])]:
                for f in sorted(files):
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        digest.update(fh.read())
    return {
        "path": root,
        "commit": git("rev-parse", "HEAD").strip() or None,
        "modified_files": status.splitlines(),
        "diff_and_untracked_sha1": digest.hexdigest() if status else None,
    }


def environment(packages: tuple[str, ...]) -> dict:
    """Machine, devices, library versions and the measured hvpopt source, for a results JSON."""

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    uname = platform.uname()
    return {
        "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(),
        "hvpopt_source": git_state(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_model": cpu_model,
            "uname": {f: getattr(uname, f) for f in ("system", "node", "release", "version", "machine", "processor")},
            "cpu_count": os.cpu_count(),
            "cpu_affinity_count": affinity,
            "python": sys.version,
        },
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_backend": jax.default_backend(),
        "versions": {p: version(p) for p in packages},
    }


def write_results(path: str, report: dict) -> None:
    """Writes a results JSON atomically (a crash leaves the previous results whole)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    write_atomically(path, lambda file: json.dump(report, file, indent=2, default=str), mode="w")


def print_targets(targets: dict, *, target_width: int = 28, case_width: int = 22) -> None:
    """Prints a benchmark's targets (``{"num_pass", "num_targets", "items"}``) as PASS/FAIL lines."""
    print(f"\n=== Targets: {targets['num_pass']}/{targets['num_targets']} pass ===")
    for item in targets["items"]:
        measured = "n/a" if item["measured"] is None else f"{item['measured']:.3f}"
        note = f"   {item['note']}" if item.get("note") else ""
        print(
            f"  [{'PASS' if item['pass'] else 'FAIL'}] {item['target']:<{target_width}} {item['case']:<{case_width}} "
            f"{measured:>8} <= {item['threshold']}{note}"
        )
