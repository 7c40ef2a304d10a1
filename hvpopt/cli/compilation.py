"""XLA compilation as the command line sees it: a persistent cache on disk, and the seconds spent compiling.

A command compiles the same programs on every run (the same model, the same
chunk shapes); JAX's persistent compilation cache keeps them on disk, so a
second run loads them instead. The cache lives in ``$HVPOPT_COMPILATION_CACHE``
(default ``$HVPOPT_CACHE/xla``, i.e. ``~/.cache/hvpopt/xla``); ``off`` there or
the flag ``--no-compilation-cache`` turns it off. A folder that cannot be made
or written is skipped with a warning, never fatal; a cache entry that cannot be
read is recompiled (JAX's own rule).
"""

import os
import sys
import tempfile
import threading
import time

import jax

ENVIRONMENT = "HVPOPT_COMPILATION_CACHE"
#: JAX's time spans of tracing, lowering and compiling (or loading from the cache) a program.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def cache_folder(disabled: bool) -> str | None:
    """Where the persistent cache is, from the flag and the environment; None where it is turned off."""
    value = os.environ.get(ENVIRONMENT, "")
    if disabled or value.lower() in ("off", "0", "false", "no"):
        return None
    default = os.path.join(os.environ.get("HVPOPT_CACHE", os.path.expanduser("~/.cache/hvpopt")), "xla")
    return value or default


def use_cache(folder: str | None) -> str | None:
    """Turns JAX's persistent compilation cache on in ``folder`` (every program, however quick to compile).

    Returns the folder, or None (with a warning on stderr) where it cannot be
    made or written; None does nothing.
    """
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        print(f"hvpopt: warning: the compilation cache {folder!r} is not writable ({err}); compiling without it.",
              file=sys.stderr)  # fmt: skip
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


class _Spans:
    """The compile spans of this process, recorded by one listener registered once."""

    def __init__(self):
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        jax.monitoring.register_event_time_span_listener(self.record)

    def record(self, event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS:
            with self.lock:
                self.spans.append((start, end))

    def seconds_since(self, start: float) -> float:
        """Seconds since ``start`` (``time.time()``) covered by at least one span (nested spans count once)."""
        with self.lock:
            spans = sorted((max(s, start), e) for s, e in self.spans if e > start)
        total, cursor = 0.0, start
        for s, e in spans:
            s = max(s, cursor)
            if e > s:
                total, cursor = total + e - s, e
        return total


_SPANS: _Spans | None = None


class CompileClock:
    """Wall-clock seconds since it was made, split into compiling (tracing, lowering, XLA) and the rest."""

    def __init__(self):
        global _SPANS
        _SPANS = _SPANS or _Spans()
        self.start = time.time()

    def seconds(self) -> dict[str, float]:
        """``{"compile_seconds", "work_seconds"}`` so far."""
        total = time.time() - self.start
        compiling = _SPANS.seconds_since(self.start)
        return {"compile_seconds": compiling, "work_seconds": max(total - compiling, 0.0)}
