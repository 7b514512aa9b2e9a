"""Progress of long work: `label done/total unit, rate/s, elapsed, ETA | extra`.

A line at the first update, then at least every `every_s` seconds: on each update once the
interval has passed, and — with `heartbeat=True` — from a background thread while one unit of
work takes longer than that (a 10-minute training step still shows the run is alive). On a terminal the line is rewritten in
place (a live bar); otherwise (CI, log files) every update is a plain line. Thread-safe.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    seconds = max(0, round(seconds))
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
        enabled: bool = True,
        done: int = 0,
        scale: float = 1.0,
        heartbeat: bool = False,
    ):
        """`done`: units already done (a resumed run); `scale`: divides counts for display
        (2**20 with unit 'MiB' for bytes)."""
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.enabled, self.scale = enabled, scale
        self.done = self.first = done
        self.extra = ""
        self.start = self.last = time.perf_counter()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        if heartbeat and enabled:
            threading.Thread(target=self._beat, name=f"progress {label}", daemon=True).start()

    def update(self, n: int = 1, extra: str = "") -> None:
        """Counts `n` more units done; prints when the interval has passed (live on a tty)."""
        with self.lock:
            self.done += n
            self.extra = extra or self.extra
            now = time.perf_counter()
            finished = self.total is not None and self.done >= self.total
            first = self.done - n == self.first  # the first update shows the early rate
            if finished or first or now - self.last >= (0.2 if self.tty else self.every_s):
                self._print(now, final=finished)

    def write(self, text: str) -> None:
        """Prints `text` as its own line (clearing a live bar first; it is redrawn next update)."""
        with self.lock:
            if self.enabled:
                self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
                self.stream.flush()

    def line(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        elapsed = now - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        shown = lambda v: f"{v / self.scale:.1f}" if self.scale != 1 else str(v)  # noqa: E731
        counted = (
            f"{shown(self.done)}/{shown(self.total)}"
            if self.total is not None
            else shown(self.done)
        )
        speed = f"{rate / self.scale:.3g} {self.unit}/s, " if rate > 0 else ""
        text = f"{self.label} {counted} {self.unit}, {speed}{duration(elapsed)} elapsed"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        return text + (f" | {self.extra}" if self.extra else "")

    def _print(self, now: float, final: bool = False) -> None:
        self.last = now
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self.line(now) + ("\n" if final else ""))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def _beat(self) -> None:
        while not self._stop.wait(min(self.every_s, 1.0)):
            with self.lock:
                now = time.perf_counter()
                if now - self.last >= self.every_s:
                    self._print(now)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops the heartbeat; a last line unless the total was reached (it printed then)."""
        self._stop.set()
        with self.lock:
            if self.total is None or self.done < self.total:
                self._print(time.perf_counter(), final=True)
