"""Running untrusted generated programs: a fork server per worker thread, every program in a
fresh PID namespace as an unprivileged user with no capabilities, seccomp and Landlock.

See evaluation/forkserver.py for the process tree, evaluation/isolation.py for the layers,
evaluation/runner.py for how a verdict is made, and docs/sandbox.md for what each layer stops
and what is left when the kernel refuses namespaces. `Sandbox.isolation` says, in one line,
exactly which layers this machine granted.
"""

from __future__ import annotations

import atexit
import json
import struct
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

FORKSERVER = Path(__file__).with_name("forkserver.py")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    output_bytes: int = 1 << 20  # stdout/stderr files; a program writing more is killed
    max_processes: int = 32
    open_files: int = 64
    tmp_mb: int = 64  # the private /tmp and /dev/shm
    uid: int = 400000  # worker i runs programs as uid/gid uid + i (root only)


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed (exception, exit, unfinished) | killed (signal/limit) | timeout
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


class ForkServer:
    """One `evaluation/forkserver.py` process; requests are serialised by its owner thread."""

    def __init__(self, limits: Limits, index: int, isolate: bool):
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
        self._send({"namespaces": isolate, "limits": self.limits})
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

    def run(self, program: str, stdin: str, io: bool) -> dict:
        self._send({"program": program, "stdin": stdin, "io": io, "limits": self.limits})
        return self._receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Sandbox:
    def __init__(self, limits: Limits | None = None, isolate: bool = True):
        self.limits = limits or Limits()
        self.isolate = isolate
        self._local = threading.local()
        self._servers: list[ForkServer] = []
        self._lock = threading.Lock()
        self.report = self._server().report
        self.isolation = describe(self.report, self.limits)
        atexit.register(self.close)

    @property
    def namespaces(self) -> bool:
        """True when programs run in private PID, network and mount namespaces."""
        return self.report.get("mode") == "namespaces"

    def _server(self) -> ForkServer:
        server = getattr(self._local, "server", None)
        if server is None or server.process.poll() is not None:
            with self._lock:
                server = ForkServer(self.limits, len(self._servers), self.isolate)
                self._servers.append(server)
            self._local.server = server
        return server

    def run(self, program: str, stdin: str = "", io: bool = False) -> ExecResult:
        """Runs Python source `program`. Function programs (`io=False`, a completion followed by
        its tests) pass when they exit 0 *and* the runner reached their end (no exit() before
        the tests, no os._exit); stdin/stdout programs (`io=True`) pass the sandbox's part when
        they exit 0, and the caller judges their output."""
        try:
            report = self._server().run(program, stdin, io)
        except (RuntimeError, OSError, ValueError) as exc:  # the server died: a fresh one next time
            self._local.server = None
            return ExecResult(False, "failed", None, "", f"sandbox error: {exc}", 0.0)
        code = report.get("returncode")
        ok = code == 0 and (io or report.get("finished", False))
        if report.get("timed_out"):
            status = "timeout"
        elif ok:
            status = "passed"
        elif code is not None and code < 0:
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
        )

    def close(self) -> None:
        with self._lock:
            for server in self._servers:
                server.close()
            self._servers.clear()


def describe(report: dict, limits: Limits) -> str:
    """One line of what this machine granted, e.g.
    'namespaces(user? net ipc uts mount-ro pid proc) uid 400000 no-caps no_new_privs seccomp landlock-v7 rlimits'."""
    parts = []
    if report.get("mode") == "namespaces":
        spaces = [
            *report.get("namespaces", []),
            "pid",
            *(["proc"] if report.get("own_proc") else []),
        ]
        parts.append(f"namespaces({' '.join(spaces)})")
    else:
        parts.append("no-namespaces" + (f" ({report['refused']})" if report.get("refused") else ""))
    if report.get("root") and "user" not in report.get("namespaces", []):
        parts.append(f"uid {limits.uid}+")
    parts += ["no-caps", "no_new_privs"]
    if report.get("seccomp"):
        parts.append("seccomp")
    if report.get("landlock"):
        parts.append(f"landlock-v{report['landlock']}")
    parts.append("rlimits")
    if not (report.get("probe") or {}).get("finished"):
        parts.append("PROBE-FAILED")
    return " ".join(parts)
