"""How a run stops when something goes wrong: `TrainingFailure` (what, next action, exit code)
and, across ranks, a `FailureBoard` on the process group's key-value store.

A rank that fails (OOM, a storage error, a bug) posts its failure on the board. Every other rank
watches the board from a background thread, so it learns of the failure within a second even
while it is blocked inside a collective that the failed rank will never join. Rank 0 then writes
the failure report and marks the MLflow run failed, and every rank exits with the failure's exit
code (4 for OOM, 5 for storage, ...). Without a usable store the bounded process-group timeout
(`run.dist_timeout_s`) is the fallback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch.distributed as dist

from runtime.cli import USER_ERRORS, one_line
from runtime.errors import EXIT_FAILED, EXIT_INPUT, EXIT_STORAGE, StorageError
from training.distributed import DistInfo

POLL_S = 0.5
ACK_TIMEOUT_S = 60.0  # how long a rank waits for rank 0's report before exiting anyway
EXIT_WAIT_S = 10.0  # how long rank 0 (the store's host) waits for the others to leave


class TrainingFailure(RuntimeError):
    """A clean, reported stop: `what` went wrong, `next_action` to take, process `exit_code`."""

    def __init__(self, what: str, next_action: str, exit_code: int):
        super().__init__(what)
        self.what, self.next_action, self.exit_code = what, next_action, exit_code


@dataclass
class Posted:
    rank: int
    what: str
    next_action: str
    exit_code: int

    def failure(self) -> TrainingFailure:
        return TrainingFailure(self.what, self.next_action, self.exit_code)


class FailureBoard:
    """Shares the first failure of any rank with all ranks (a no-op in single-process runs)."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.store = _default_store() if info.enabled else None
        self.reporter: Callable[[TrainingFailure], None] | None = None
        self._handled = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self.store is not None

    def watch(self, reporter: Callable[[TrainingFailure], None]) -> None:
        """Starts watching for other ranks' failures; `reporter` writes the report (rank 0)."""
        self.reporter = reporter
        if self.active and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="wmtp-failures", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()

    def fail(self, failure: TrainingFailure) -> None:
        """Posts this rank's failure, then (distributed) reports and exits: never returns."""
        if not self.active:
            return
        posted = Posted(self.info.rank, failure.what, failure.next_action, failure.exit_code)
        self.store.set(f"wmtp/failure/{self.info.rank}", json.dumps(asdict(posted)))
        self.store.add("wmtp/failures", 1)
        self._stop_all(posted)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                if self.store.add("wmtp/failures", 0) == 0:
                    continue
                posted = self._first_posted()
            except Exception:  # the store went away: the job is ending anyway
                return
            if posted is not None:
                self._stop_all(posted)

    def _first_posted(self) -> Posted | None:
        for rank in range(self.info.world_size):
            key = f"wmtp/failure/{rank}"
            if self.store.check([key]):
                return Posted(**json.loads(self.store.get(key)))
        return None

    def _stop_all(self, posted: Posted) -> None:
        """Rank 0 writes the report and acknowledges; the others wait for that; all exit."""
        if not self._handled.acquire(blocking=False):
            time.sleep(ACK_TIMEOUT_S)  # another thread of this rank is already stopping it
            return
        failure = posted.failure()
        if self.info.is_main:  # the store lives in this process: it reports, then exits last
            try:
                if self.reporter is not None:
                    self.reporter(failure)
            finally:
                self.store.set("wmtp/ack", "1")
            others = [f"wmtp/exiting/{r}" for r in range(1, self.info.world_size)]
            with contextlib.suppress(Exception):
                self.store.wait(others, _seconds(EXIT_WAIT_S))
        else:
            print(
                f"[rank {self.info.rank}] stopping: rank {posted.rank} failed "
                f"(exit {failure.exit_code}): {failure.what.splitlines()[0]}",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(Exception):  # no acknowledgement: exit anyway
                self.store.wait(["wmtp/ack"], _seconds(ACK_TIMEOUT_S))
                self.store.set(f"wmtp/exiting/{self.info.rank}", "1")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(failure.exit_code or EXIT_FAILED)


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no store (or a torch without the helper): rely on the timeout
        return None


def _seconds(value: float):
    import datetime as dt

    return dt.timedelta(seconds=value)


def exit_code_of(exc: BaseException) -> int:
    if isinstance(exc, StorageError):
        return EXIT_STORAGE
    return EXIT_INPUT if isinstance(exc, USER_ERRORS) else EXIT_FAILED


def stop_all_ranks(board: FailureBoard, exc: BaseException) -> None:
    """An exception escaped on this rank (maybe only here): say it, and stop every rank."""
    if not board.active or isinstance(exc, SystemExit):
        return
    code = exit_code_of(exc)
    text = traceback.format_exc() if code == EXIT_FAILED else f"error: {one_line(exc)}"
    print(text, file=sys.stderr, flush=True)
    where = f"rank {board.info.rank}: " if board.info.enabled else ""
    board.fail(TrainingFailure(where + one_line(exc), "see the error above", code))
