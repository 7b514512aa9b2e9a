"""The sandbox's fork server: `python -I -B evaluation/forkserver.py` (stdlib only, one per worker).

Set up once: a user namespace when not root, then private network (no interfaces but a downed
loopback), IPC, UTS and mount namespaces in which the whole tree is read-only. Per program:

    server ─fork→ child ─unshare(PID, mount), fork→ supervisor (PID 1 of a new PID namespace)
                              private /tmp, /dev/shm, /proc; writes program.py and stdin
                              ─fork→ program process: rlimits, unprivileged uid, no capabilities,
                                     no_new_privs, Landlock, seccomp; runs runner.run() in this
                                     already-warm interpreter (no new Python start)
            supervisor: hands the nonce over, waits (wall timeout), kills every process of the
            namespace, reads the verdict and the captured output, reports to the server.

Without namespaces (not permitted by the kernel) the supervisor is a plain child with
PR_SET_CHILD_SUBREAPER (orphans and daemons come back to it and are killed), the program gets a
temporary directory, and the uid drop (when root), Landlock, seccomp and rlimits still apply.

Protocol on stdin/stdout: 4-byte big-endian length + JSON, one request → one response.
"""

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script dir out
# Imported once here rather than in every program: what the runner's guard touches, and what
# most programs start with.
import socket  # noqa: E402, F401
import subprocess  # noqa: E402, F401

import isolation  # noqa: E402
import runner  # noqa: E402

PATH = "/usr/local/bin:/usr/bin:/bin"


def send(obj) -> None:
    data = json.dumps(obj).encode()
    os.write(1, struct.pack(">I", len(data)) + data)


def receive():
    head = _read_exactly(0, 4)
    if head is None:
        return None
    return json.loads(_read_exactly(0, struct.unpack(">I", head)[0]))


def _read_exactly(fd: int, n: int):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------- set-up
def setup(config: dict) -> dict:
    """The server-wide namespaces; returns what held (reported by Sandbox.isolation)."""
    held = {"namespaces": [], "mode": "fallback", "uid": None, "root": os.geteuid() == 0}
    if not config.get("namespaces", True):
        return held
    uid, gid = os.geteuid(), os.getegid()
    flags = (
        isolation.CLONE_NEWNS
        | isolation.CLONE_NEWNET
        | isolation.CLONE_NEWIPC
        | isolation.CLONE_NEWUTS
    )
    try:
        if uid != 0:
            isolation.unshare(isolation.CLONE_NEWUSER | flags)
            isolation.write_id_maps(uid, gid)
            held["namespaces"].append("user")
        else:
            isolation.unshare(flags)
            isolation.mount(None, "/", None, isolation.MS_REC | isolation.MS_PRIVATE)
            interpreter = [sys.base_prefix, sys.prefix, *[p for p in sys.path if p]]
            held["covered"] = isolation.expose_to_others(interpreter)
        isolation.read_only_tree()
    except OSError as exc:
        held["refused"] = str(exc)
        return held
    held["namespaces"] += ["net", "ipc", "uts", "mount-ro"]
    held["mode"] = "namespaces"
    return held


# ---------------------------------------------------------------------------- per program
def run_one(request: dict, held: dict) -> dict:
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(report_r)
        _child(request, held, report_w)
    os.close(report_w)
    deadline = time.monotonic() + request["limits"]["timeout_s"] + 30
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([report_r], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        chunk = os.read(report_r, 1 << 20)
        if not chunk:
            break
        data += chunk
    os.close(report_r)
    if not data:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    try:
        return json.loads(data)
    except ValueError:
        return {
            "status": "failed",
            "returncode": None,
            "stdout": "",
            "stderr": "sandbox supervisor crashed",
            "finished": False,
        }


def _child(request: dict, held: dict, report_w: int) -> None:
    try:
        if held["mode"] == "namespaces":
            isolation.unshare(isolation.CLONE_NEWPID | isolation.CLONE_NEWNS)
            supervisor = os.fork()
            if supervisor == 0:
                _supervise(request, held, report_w, pid_namespace=True)
            os.close(report_w)
            os.waitpid(supervisor, 0)
            os._exit(0)
        isolation.libc.prctl(isolation.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _supervise(request, held, report_w, pid_namespace=False)
    except BaseException as exc:  # noqa: BLE001
        os.write(
            report_w,
            json.dumps(
                {
                    "status": "failed",
                    "returncode": None,
                    "stdout": "",
                    "stderr": f"sandbox set-up failed: {exc}",
                    "finished": False,
                }
            ).encode(),
        )
        os._exit(70)


def _supervise(request: dict, held: dict, report_w: int, pid_namespace: bool) -> None:
    limits = request["limits"]
    proc = False
    if pid_namespace:
        proc = isolation.private_mounts(limits["tmp_mb"])
        work = "/tmp/wmtp"
        os.mkdir(work, 0o700)
    else:
        work = tempfile.mkdtemp(prefix="wmtp-sandbox-")
    uid = limits["uid"] if os.geteuid() == 0 and "user" not in held["namespaces"] else None
    with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
        f.write(request["program"])
    with open(os.path.join(work, "stdin.txt"), "w", encoding="utf-8") as f:
        f.write(request["stdin"])
    if uid is not None:
        os.chown(work, uid, uid)
    nonce_r, nonce_w = os.pipe()
    result_r, result_w = os.pipe()
    start = time.monotonic()
    program = os.fork()
    if program == 0:  # pragma: no cover - the untrusted process
        os.close(nonce_w)
        os.close(result_r)
        _program_process(request, held, work, uid, nonce_r, result_w, report_w, pid_namespace)
    os.close(nonce_r)
    os.close(result_w)
    nonce = os.urandom(16)  # made after the fork: the program's memory never held it
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    status, timed_out = _wait(program, limits["timeout_s"])
    seconds = time.monotonic() - start
    _kill_everything(pid_namespace, program)
    verdict = _read_available(result_r, 256)
    report = {
        "returncode": None
        if timed_out
        else (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)),
        "timed_out": timed_out,
        "finished": verdict == b"done " + nonce.hex().encode(),
        "stdout": _read_file(os.path.join(work, "stdout.txt"), limits["output_bytes"]),
        "stderr": _read_file(os.path.join(work, "stderr.txt"), 20_000),
        "seconds": seconds,
        "own_proc": proc,
    }
    if not pid_namespace:
        shutil.rmtree(work, ignore_errors=True)
    os.write(report_w, json.dumps(report).encode())
    os.close(report_w)
    os._exit(0)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    """(wait status, timed out) of the program, within `timeout` seconds of wall time."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status, not ready


def _kill_everything(pid_namespace: bool, program: int) -> None:
    """Every process the program left behind: the whole PID namespace (as its init), or every
    descendant that the subreaper inherited."""
    if pid_namespace:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    else:
        for _ in range(50):
            children = _children(os.getpid())
            if not children:
                break
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _read_available(fd: int, limit: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, limit)
    except BlockingIOError:
        return b""
    finally:
        os.close(fd)


def _read_file(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _program_process(
    request, held, work, uid, nonce_fd, result_fd, report_w, pid_namespace
) -> None:
    """Becomes the untrusted program: files, limits, identity, filters, then runner.run()."""
    code = 70
    try:
        os.close(report_w)
        os.chdir(work)
        if not pid_namespace:
            os.setsid()
        stdin = os.open("stdin.txt", os.O_RDONLY)
        stdout = os.open("stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        stderr = os.open("stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if uid is not None:
            os.fchown(stdout, uid, uid)
            os.fchown(stderr, uid, uid)
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
            os.close(fd)
        keep = {0, 1, 2, nonce_fd, result_fd}
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        limits = request["limits"]
        _rlimits(limits, uid)
        if os.geteuid() == 0:  # root (on the host or in the user namespace): keep nothing
            isolation.drop_bounding_set()
            isolation.become(uid, uid)
            isolation.clear_capabilities()
        isolation.no_new_privs()
        writable = ["/tmp", "/dev/shm"] if pid_namespace else [work]
        isolation.install_landlock(writable)
        isolation.install_seccomp()
        os.environ.clear()
        os.environ.update(
            {
                "PATH": PATH,
                "HOME": work,
                "TMPDIR": work,
                "LANG": "C.UTF-8",
                "PYTHONHASHSEED": "0",
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        code = runner.run(os.path.join(work, "program.py"), nonce_fd, result_fd, request["io"])
    except BaseException as exc:  # noqa: BLE001 - the sandbox could not be entered: fail closed
        with contextlib.suppress(OSError):
            os.write(2, f"sandbox: {exc}\n".encode())
    finally:
        os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def _rlimits(limits: dict, uid) -> None:
    cpu = max(1, int(limits["cpu_s"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = limits["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["output_bytes"], limits["output_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nproc = limits["max_processes"]
    if uid is None:  # the harness's own uid: count what it already runs
        nproc += _processes_of(os.getuid())
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


PROBE_LIMITS = {
    "timeout_s": 10,
    "cpu_s": 10,
    "memory_mb": 512,
    "output_bytes": 4096,
    "max_processes": 8,
    "open_files": 64,
    "tmp_mb": 16,
    "uid": 65534,
}


def main() -> None:
    config = receive() or {}
    held = setup(config)
    held["seccomp"] = _probe(isolation.seccomp_program)
    held["landlock"] = isolation.landlock_abi()
    probe = run_one(
        {
            "program": "pass",
            "stdin": "",
            "io": False,
            "limits": {**PROBE_LIMITS, **config.get("limits", {})},
        },
        held,
    )
    held["own_proc"] = bool(probe.get("own_proc"))
    held["probe"] = {"finished": probe.get("finished"), "stderr": probe.get("stderr", "")[-500:]}
    send(held)
    while (request := receive()) is not None:
        send(run_one(request, held))


def _probe(fn) -> bool:
    try:
        fn()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
