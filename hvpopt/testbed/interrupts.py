"""Ctrl-C at safe points: long commands stop between steps, never inside JAX or XLA.

Python's default SIGINT handler raises ``KeyboardInterrupt`` at whatever bytecode
runs next: inside JAX's dispatch or tracing (the process then crashes on exit),
inside a garbage-collection callback (the exception is printed and swallowed),
or in the middle of writing a checkpoint. Within :func:`deferred_interrupts`
SIGINT only marks an interrupt, however often it comes, and the loops that can
stop call :func:`check_interrupt` between their steps (a training step, a
chunk of scores): it raises ``KeyboardInterrupt`` there, where everything
finished so far is whole and can be saved.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

_marked = threading.Event()
_installed = threading.Event()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block, SIGINT marks an interrupt that :func:`check_interrupt` raises.

    Installed only from the main thread and only over Python's default handler
    (a handler someone else installed, or SIG_IGN, is left alone); nested
    blocks share the outermost one. The previous handler is restored on exit.
    An interrupt that arrives after the last safe point is dropped: the work
    it would have stopped is already finished.

    Example:
      >>> with deferred_interrupts():
      ...     for step in range(3):
      ...         check_interrupt()  # raises KeyboardInterrupt here after a Ctrl-C
    """
    if (
        _installed.is_set()
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _marked.set())
    _installed.set()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _installed.clear()
        _marked.clear()


def check_interrupt() -> None:
    """A safe point: raises ``KeyboardInterrupt`` if SIGINT came since the last one."""
    if _marked.is_set():
        _marked.clear()
        raise KeyboardInterrupt
