"""A dependency-free progress bar for long command-line steps (written to stderr)."""

import sys
import time
from typing import TextIO


class Progress:
    """``[#####.....] 50/100  loss 1.23  12.3 steps/s``, redrawn in place on a terminal.

    On a terminal the bar is redrawn at most ten times a second; otherwise
    (a log file, CI) a line is printed at every tenth of the way, so logs stay short.
    """

    def __init__(self, total: int, label: str, unit: str = "steps", stream: TextIO | None = None):
        self.total, self.label, self.unit = total, label, unit
        self.stream = sys.stderr if stream is None else stream
        self.interactive = self.stream.isatty()
        self.done, self.start, self.last_draw, self.last_tenth = 0, time.perf_counter(), 0.0, 0

    def update(self, count: int = 1, **metrics) -> None:
        """Advances by ``count``; ``metrics`` (numbers or scalar arrays) are read only when drawn."""
        self.done += count
        now = time.perf_counter()
        tenth = 10 * self.done // max(self.total, 1)
        if self.interactive and (now - self.last_draw > 0.1 or self.done == self.total):
            self.stream.write("\r" + self._line(now, metrics))
            self.stream.flush()
            self.last_draw = now
        elif not self.interactive and tenth > self.last_tenth:
            self.stream.write(self._line(now, metrics) + "\n")
            self.last_tenth = tenth

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
        self.stream.flush()

    def _line(self, now: float, metrics: dict) -> str:
        filled = 20 * self.done // max(self.total, 1)
        rate = self.done / max(now - self.start, 1e-9)
        shown = "  ".join(f"{name} {float(value):.4g}" for name, value in metrics.items())
        return (
            f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total}"
            f"  {shown}  {rate:.1f} {self.unit}/s"
        )
