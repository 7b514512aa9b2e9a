"""Running untrusted generated programs: a fork server per worker thread, every program in a
fresh PID and IPC namespace and a cgroup, as an unprivileged user with no capabilities,
seccomp and Landlock, and with output read from pipes it cannot redirect.

See evaluation/forkserver.py for the process tree, evaluation/isolation.py for the layers,
evaluation/runner.py for how a verdict is made, and docs/sandbox.md for what each layer stops
and what is left when the kernel refuses namespaces. `Sandbox.isolation` says, in one line,
exactly which layers this machine granted.
"""

from __future__ import annotations

import atexit
import json
import os
import struct
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import InputError

FORKSERVER = Path(__file__).with_name("forkserver.py")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class SandboxUnavailable(InputError):
    """This machine cannot run programs in the sandbox correctly; the message says why (an
    entry point stops with it in one line, exit 2, rather than judge every program failed)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_mb: int = 1024  # per program: all its processes together (and each one's address space)
    output_bytes: int = 1 << 20  # stdout kept; more is read and dropped (stdout_truncated)
    max_processes: int = 32  # tasks (processes and threads) of the whole program
    open_files: int = 64
    tmp_mb: int = 64  # the private /tmp and /dev/shm; the largest file it may write
    uid: int = 400000  # worker i runs programs as uid/gid uid + i (root only)


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed (exception, exit, unfinished) | killed (signal/limit) | timeout
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    limit: str | None = None  # "memory" | "processes" when the whole program tree hit one
    stdout_truncated: bool = False


class ForkServer:
    """One `evaluation/forkserver.py` process; requests are serialised by its owner thread."""

    def __init__(self, limits: Limits, index: int, isolate: bool, hide: list[str], cgroups: bool):
        self.limits = {**asdict(limits), "uid": limits.uid + index}
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-B", str(FORKSERVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"},
            close_fds=True,
            start_new_session=True,
        )
        self._send({"namespaces": isolate, "limits": self.limits, "hide": hide, "cgroup": cgroups})
        self.report = self._receive()

    def _send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.process.stdin.write(struct.pack(">I", len(data)) + data)
        self.process.stdin.flush()

    def _receive(self) -> dict:
        head = self.process.stdout.read(4)
        if len(head) < 4:
            raise RuntimeError(f"sandbox fork server exited (code {self.process.poll()})")
        return json.loads(self.process.stdout.read(struct.unpack(">I", head)[0]))

    def run(self, program: str, stdin: str, io: bool, guards: bool) -> dict:
        request = {"program": program, "stdin": stdin, "io": io, "limits": self.limits}
        self._send({**request, "guards": guards})
        return self._receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Sandbox:
    """Runs programs; a pool of fork servers, one per program running at the same time (each
    with its own uid), reused across threads and thread pools.

    Args:
        limits: per-program limits.
        isolate: use namespaces where the kernel grants them (False: the fallback layers only).
        hide: directories programs must not see (datasets, checkpoints, storage), beyond the
            project tree and the home directory, which are always hidden. Landlock already lets
            programs read nothing but the interpreter; with namespaces these are also covered.
        guards: the in-process guard and audit hook (False only to test the kernel layers alone).
        cgroups: a cgroup leaf per worker where the kernel allows it (False: the supervisor's
            polled bound on the whole tree, as on machines without one).

    Raises:
        SandboxUnavailable: a trivial program importing the standard library does not pass here.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        isolate: bool = True,
        hide: tuple[str | Path, ...] = (),
        guards: bool = True,
        cgroups: bool = True,
    ):
        self.limits = limits or Limits()
        self.isolate, self.guards, self.cgroups = isolate, guards, cgroups
        self.hide = sorted({str(PROJECT_ROOT), os.path.expanduser("~"), *map(str, hide)})
        self._servers: list[ForkServer] = []
        self._idle: list[ForkServer] = []
        self._lock = threading.Lock()
        first = self._checkout()
        self.report = first.report
        self._checkin(first)
        self.isolation = describe(self.report, self.limits)
        if not (self.report.get("probe") or {}).get("finished"):
            self.close()
            raise SandboxUnavailable(probe_failure(self.report, self.isolation))
        atexit.register(self.close)

    @property
    def namespaces(self) -> bool:
        """True when programs run in private PID, network and mount namespaces."""
        return self.report.get("mode") == "namespaces"

    def _checkout(self) -> ForkServer:
        """An idle live server, or a new one (with the next uid)."""
        with self._lock:
            while self._idle:
                server = self._idle.pop()
                if server.process.poll() is None:
                    return server
            index = len(self._servers)
            server = ForkServer(self.limits, index, self.isolate, self.hide, self.cgroups)
            self._servers.append(server)
            return server

    def _checkin(self, server: ForkServer) -> None:
        with self._lock:
            if server.process.poll() is None:
                self._idle.append(server)

    def run(self, program: str, stdin: str = "", io: bool = False) -> ExecResult:
        """Runs Python source `program`. Function programs (`io=False`, a completion followed by
        its tests) pass when they exit 0 *and* the runner reached their end (no exit() before
        the tests, no os._exit); stdin/stdout programs (`io=True`) pass the sandbox's part when
        they exit 0, and the caller judges their output."""
        server = self._checkout()
        try:
            report = server.run(program, stdin, io, self.guards)
        except (RuntimeError, OSError, ValueError) as exc:  # the server died: a fresh one next time
            server.close()
            return ExecResult(False, "failed", None, "", f"sandbox error: {exc}", 0.0)
        finally:
            self._checkin(server)
        code = report.get("returncode")
        ok = code == 0 and (io or report.get("finished", False)) and not report.get("limit")
        if report.get("timed_out"):
            status = "timeout"
        elif ok:
            status = "passed"
        elif (code is not None and code < 0) or report.get("limit"):
            status = "killed"
        else:
            status = "failed"
        return ExecResult(
            ok and not report.get("timed_out"),
            status,
            code,
            report.get("stdout", ""),
            report.get("stderr", ""),
            report.get("seconds", 0.0),
            report.get("limit"),
            report.get("stdout_truncated", False),
        )

    def close(self) -> None:
        with self._lock:
            for server in self._servers:
                server.close()
            self._servers.clear()
            self._idle.clear()


def describe(report: dict, limits: Limits) -> str:
    """One line of what this machine granted, e.g. 'namespaces(net ipc uts mount-ro pid proc
    ipc-per-program) uid 400000+ cgroup-v2(memory pids) no-caps not-dumpable no_new_privs
    seccomp landlock-v7(read-allowlist) rlimits'."""
    parts = []
    if report.get("mode") == "namespaces":
        spaces = [
            *report.get("namespaces", []),
            "pid",
            *(["proc"] if report.get("own_proc") else []),  # not needed: Landlock hides /proc
            "ipc-per-program",
        ]
        parts.append(f"namespaces({' '.join(spaces)})")
        if report.get("covered"):
            parts.append(f"covered({' '.join(report['covered'])})")
    else:
        parts.append("no-namespaces" + (f" ({report['refused']})" if report.get("refused") else ""))
        if report.get("copies"):
            parts.append("stdlib-copy")
    if report.get("root") and "user" not in report.get("namespaces", []):
        parts.append(f"uid {limits.uid}+")
    parts.append(f"cgroup-{report['cgroup']}" if report.get("cgroup") else "tree-polled-limits")
    parts += ["no-caps", "not-dumpable", "no_new_privs"]
    if report.get("seccomp"):
        parts.append("seccomp" if report.get("mode") == "namespaces" else "seccomp(+sysv-ipc)")
    if report.get("landlock"):
        parts.append(f"landlock-v{report['landlock']}(read-allowlist)")
    parts.append("rlimits")
    if not (report.get("probe") or {}).get("finished"):
        parts.append("PROBE-FAILED")
    return " ".join(parts)


def probe_failure(report: dict, isolation: str) -> str:
    """One line: why a trivial standard-library program does not pass in this sandbox."""
    lines = [line for line in (report.get("probe") or {}).get("stderr", "").splitlines() if line]
    cause = lines[-1] if lines else "no output"
    hint = ""
    if report.get("copies_refused"):
        hint = f"; the readable copy of the standard library failed: {report['copies_refused']}"
    elif report.get("mode") != "namespaces":
        hint = "; allow namespaces (or run the harness as root with Landlock) to fix it"
    return (
        f"sandbox: a trivial program importing the standard library fails here ({cause}){hint}; "
        f"isolation: {isolation}"
    )
