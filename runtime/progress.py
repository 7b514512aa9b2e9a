"""Progress of long work: `label done/total unit, rate/s, ETA` at least every `every_s` seconds.

On a terminal the line is rewritten in place (a live bar); otherwise (CI, log files) each update
is a plain line, so logs show progress without control characters. Thread-safe.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "it",
        every_s: float = 10.0,
        stream: TextIO | None = None,
        tty: bool | None = None,
        first_after_s: float = 0.0,
        enabled: bool = True,
    ):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.done, self.extra = 0, ""
        self.start = time.perf_counter()
        self.last = self.start - every_s + first_after_s  # the first line after first_after_s
        self.lock = threading.Lock()
        self.enabled = enabled

    def update(self, n: int = 1, extra: str = "") -> None:
        """Counts `n` more units done; prints when the interval has passed (or live on a tty)."""
        with self.lock:
            self.done += n
            self.extra = extra or self.extra
            now = time.perf_counter()
            finished = self.total is not None and self.done >= self.total
            if finished or now - self.last >= (0.2 if self.tty else self.every_s):
                self.last = now
                self._print(now, final=finished)

    def line(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        counted = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        text = f"{self.label} {counted} {self.unit}, {rate:.3g} {self.unit}/s, {duration(elapsed)} elapsed"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        return text + (f" | {self.extra}" if self.extra else "")

    def _print(self, now: float, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self.line(now) + ("\n" if final else ""))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """A last line unless the total was reached (it printed then)."""
        with self.lock:
            if self.total is None or self.done < self.total:
                self._print(time.perf_counter(), final=True)
