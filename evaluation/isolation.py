"""Linux isolation primitives for the execution sandbox, through libc (ctypes) and raw syscalls.

Kept free of project imports: the fork server (evaluation/forkserver.py) loads it as a sibling
module in a bare `python -I` interpreter. Each layer is a function that either succeeds or
raises OSError; the fork server records which ones held (`Sandbox.isolation`).

Layers:
  namespaces     net (no network at all), IPC, UTS and mount (the whole tree read-only, private
                 tmpfs on /tmp and /dev/shm, a /proc of the program's own PID namespace); a PID
                 namespace per program whose init kills everything left at the end; a user
                 namespace first when not root
  identity       an unprivileged uid/gid, no supplementary groups, every capability dropped from
                 the bounding, permitted, effective and inheritable sets, no_new_privs
  seccomp        a BPF filter refusing mount, umount2, pivot_root, chroot, setns, unshare,
                 ptrace, process_vm_*, kexec_*, reboot, bpf, perf_event_open, userfaultfd, keyring
                 and module calls, namespace flags to clone, clone3, and every socket family but
                 AF_UNIX
  landlock       (kernel ≥ 5.13, any user) reads only the interpreter, its libraries and the
                 program's directory; writes only in the program's directory; no TCP bind or
                 connect (ABI ≥ 4), no signals or abstract sockets outside the sandbox (ABI ≥ 6)
  cgroups        a leaf per worker (v2, or v1 memory and pids hierarchies) that every program
                 process joins: memory and tasks counted for the whole program tree
  readable copy  (no namespaces) the standard library copied where the sandbox uid can read it
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import platform
import shutil
import stat
import struct
import sys
import tempfile

libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_NEWCGROUP, CLONE_NEWTIME = 0x02000000, 0x00000080
NAMESPACE_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWCGROUP
    | CLONE_NEWTIME
)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, AT_RECURSIVE, AT_FDCWD = 0x1, 0x8000, -100
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_PDEATHSIG = 38, 24, 1
PR_SET_CHILD_SUBREAPER, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 36, 22, 2
PR_SET_DUMPABLE = 4
AF_UNIX = 1

ARCH = {
    "x86_64": {"audit": 0xC000003E, "mount_setattr": 442, "seccomp": 317, "syscalls": {
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "setns": 308, "unshare": 272,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kexec_load": 246,
        "kexec_file_load": 320, "reboot": 169, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "swapon": 167, "swapoff": 168,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "move_mount": 429, "open_tree": 428,
        "fsopen": 430, "fsmount": 432, "fsconfig": 431, "fspick": 433, "mount_setattr": 442,
        "settimeofday": 164, "clock_settime": 227, "sethostname": 170, "setdomainname": 171,
        "acct": 163, "iopl": 172, "ioperm": 173, "quotactl": 179, "lookup_dcookie": 212,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    }, "socket": 41, "clone": 56, "clone3": 435, "sysv_ipc": {"shmget": 29, "semget": 64, "msgget": 68}},
    "aarch64": {"audit": 0xC00000B7, "mount_setattr": 442, "seccomp": 277, "syscalls": {
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "setns": 268, "unshare": 97,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kexec_load": 104,
        "kexec_file_load": 294, "reboot": 142, "bpf": 280, "perf_event_open": 241,
        "userfaultfd": 282, "keyctl": 219, "add_key": 217, "request_key": 218, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "swapon": 224, "swapoff": 225,
        "open_by_handle_at": 265, "name_to_handle_at": 264, "move_mount": 429, "open_tree": 428,
        "fsopen": 430, "fsmount": 432, "fsconfig": 431, "fspick": 433, "mount_setattr": 442,
        "settimeofday": 170, "clock_settime": 112, "sethostname": 161, "setdomainname": 162,
        "acct": 89, "quotactl": 60, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    }, "socket": 198, "clone": 220, "clone3": 435, "sysv_ipc": {"shmget": 194, "semget": 190, "msgget": 186}},
}  # fmt: skip


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(libc.unshare(flags), "unshare")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def write_id_maps(uid: int, gid: int) -> None:
    """In a fresh user namespace: map root inside to the caller's uid/gid outside."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = 1, 0o2000000, 0x4


def _closed_ancestor(path: str) -> str | None:
    """The first directory on the way to `path` that other users cannot traverse (o+x)."""
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        if os.path.isdir(current) and not os.stat(current).st_mode & 0o001:
            return current
    return None


def cover(hide: list[str], keep: list[str]) -> list[str]:
    """Covers each directory in `hide` (and every closed ancestor of a `keep` path, e.g. /root
    0700 above a pyenv) with an empty tmpfs, then attaches a clone of each `keep` path inside
    it at the same place. Call in a private mount namespace before `read_only_tree`. Returns the
    directories covered."""
    kept = sorted({os.path.realpath(p) for p in keep if os.path.isdir(p)})
    targets = {os.path.realpath(p) for p in hide if os.path.isdir(p)}
    targets |= {a for p in kept if (a := _closed_ancestor(p)) is not None}
    targets = {
        t for t in targets if t != "/" and not any(k == t or t.startswith(k + "/") for k in kept)
    }
    targets = {t for t in targets if not any(t.startswith(o + "/") for o in targets)}
    for target in sorted(targets):
        inside = [p for p in kept if p.startswith(target + "/")]
        inside = [p for p in inside if not any(p.startswith(q + "/") for q in inside)]
        clones = []
        for path in inside:
            flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
            fd = _check(libc.syscall(428, AT_FDCWD, path.encode(), flags), f"open_tree {path}")
            clones.append((path, fd))
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for path, fd in clones:
            os.makedirs(path, exist_ok=True)
            _check(
                libc.syscall(429, fd, b"", AT_FDCWD, path.encode(), MOVE_MOUNT_F_EMPTY_PATH),
                f"move_mount {path}",
            )
            os.close(fd)
    return sorted(targets)


def read_only_tree() -> None:
    """Every mount of this (private) mount namespace read-only, recursively."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    arch = ARCH.get(platform.machine())
    if arch is None:
        raise OSError(errno.ENOSYS, "mount_setattr: unknown architecture")
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr)
    _check(
        libc.syscall(arch["mount_setattr"], AT_FDCWD, b"/", AT_RECURSIVE, buf, len(attr)),
        "mount_setattr /",
    )


def private_mounts(tmp_size_mb: int, proc: bool = True) -> bool:
    """Fresh tmpfs on /tmp and /dev/shm, and (`proc`) a /proc of the current PID namespace when
    the kernel allows it (a container's masked /proc can forbid it in a user namespace; the PID
    namespace and the uid still hide and protect outside processes). True: own /proc."""
    for target in ("/tmp", "/dev/shm"):
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_size_mb}m,mode=1777")
    if not proc:
        return False
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        return False
    return True


def drop_bounding_set() -> None:
    """Empties the capability bounding set (needs CAP_SETPCAP: call while still root)."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break


def clear_capabilities() -> None:
    """Empties the permitted, effective and inheritable capability sets."""
    header = struct.pack("II", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)  # two empty cap_user_data structs
    _check(libc.capset(ctypes.create_string_buffer(header), data), "capset")


def become(uid: int | None, gid: int | None) -> None:
    """Drops to `uid`/`gid` with no supplementary groups (root only; None keeps the identity)."""
    if uid is None:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def no_new_privs() -> None:
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


def not_dumpable() -> None:
    """No core dumps, and /proc/self/mem, /proc/self/fd and ptrace closed even to the same uid."""
    _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(SET_DUMPABLE)")


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_program(refuse_sysv_ipc: bool = False) -> bytes:
    """The filter: refused syscalls return EPERM (socket of a non-AF_UNIX family: EACCES;
    clone3: ENOSYS, so libc falls back to clone, whose namespace flags are refused).
    `refuse_sysv_ipc`: also shmget, semget and msgget (without a private IPC namespace, System V
    objects would outlive the program and be shared with the next)."""
    arch = ARCH.get(platform.machine())
    if arch is None:
        raise OSError(errno.ENOSYS, f"seccomp: no syscall table for {platform.machine()}")
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, RET|K
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    errno_ret = lambda e: 0x00050000 | e  # noqa: E731 - SECCOMP_RET_ERRNO
    prog = [_bpf(LD, 4), _bpf(JEQ, arch["audit"], 1, 0), _bpf(RET, KILL), _bpf(LD, 0)]
    if platform.machine() == "x86_64":  # the x32 ABI reuses numbers with bit 30 set
        prog += [_bpf(0x35, 0x40000000, 0, 1), _bpf(RET, errno_ret(errno.EPERM))]  # JGE
    refused = {*arch["syscalls"].values(), *(arch["sysv_ipc"].values() if refuse_sysv_ipc else ())}
    for nr in sorted(refused):
        prog += [_bpf(JEQ, nr, 0, 1), _bpf(RET, errno_ret(errno.EPERM))]
    prog += [_bpf(JEQ, arch["clone3"], 0, 1), _bpf(RET, errno_ret(errno.ENOSYS))]
    prog += [_bpf(JEQ, arch["clone"], 0, 3), _bpf(LD, 16), _bpf(JSET, NAMESPACE_FLAGS, 0, 1),
             _bpf(RET, errno_ret(errno.EPERM)), _bpf(LD, 0)]  # fmt: skip
    prog += [_bpf(JEQ, arch["socket"], 0, 3), _bpf(LD, 16), _bpf(JEQ, AF_UNIX, 1, 0),
             _bpf(RET, errno_ret(errno.EACCES))]  # fmt: skip
    prog += [_bpf(RET, ALLOW)]
    return b"".join(prog)


def install_seccomp(refuse_sysv_ipc: bool = False) -> None:
    """Applies the filter to this thread and everything it starts (needs no_new_privs)."""
    program = seccomp_program(refuse_sysv_ipc)
    filters = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(filters))
    _check(
        libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.create_string_buffer(fprog), 0, 0),
        "seccomp",
    )


LANDLOCK_FS = [1 << i for i in range(16)]  # EXECUTE … IOCTL_DEV, by ABI below
FS_RIGHTS_BY_ABI = {1: 13, 2: 14, 3: 15, 5: 16}  # how many FS rights each ABI knows
READ_ONLY = 1 | 4 | 8  # EXECUTE | READ_FILE | READ_DIR


def landlock_abi() -> int:
    """Landlock's ABI version (0 when the kernel has none)."""
    version = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
    return max(version, 0)


def install_landlock(readable: list[str], writable: list[str]) -> int:
    """Reads only under `readable` (directories or files), writes only under `writable` (and
    /dev/null); no TCP; no signals or abstract unix sockets beyond this domain. Returns the ABI
    used (0: the kernel has no Landlock)."""
    abi = landlock_abi()
    if abi == 0:
        return 0
    n_fs = max(v for k, v in FS_RIGHTS_BY_ABI.items() if k <= abi)
    handled_fs = sum(LANDLOCK_FS[:n_fs])
    handled_net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP
    scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack("QQQ", handled_fs, handled_net, scoped)[
        : 8 if abi < 4 else 16 if abi < 6 else 24
    ]
    ruleset = _check(
        libc.syscall(444, ctypes.create_string_buffer(attr), len(attr), 0),
        "landlock_create_ruleset",
    )
    try:
        rules = [*[(p, READ_ONLY) for p in readable], ("/dev/null", 2 | 4 | (1 << 14))]
        rules += [(path, handled_fs) for path in writable]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except (FileNotFoundError, PermissionError):  # absent, or closed to this uid anyway
                continue
            try:
                allowed = access & handled_fs
                if not os.path.isdir(path):
                    allowed &= 1 | 2 | 4 | (1 << 14) | (1 << 15)  # the rights a file can have
                rule = struct.pack("=Qi", allowed, fd)
                _check(
                    libc.syscall(445, ruleset, 1, ctypes.create_string_buffer(rule), 0),
                    f"landlock_add_rule {path}",
                )
            finally:
                os.close(fd)
        _check(libc.syscall(446, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


SYSTEM_READABLE = (
    "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo",
    "/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group", "/dev/zero",
    "/dev/urandom", "/dev/random",
)  # fmt: skip  # shared libraries the stdlib's extension modules load, time zones, devices


def interpreter_paths() -> list[str]:
    """What a program may read of this interpreter: the executable, the standard library with
    its extension modules, and the site-packages on sys.path (never the project tree, which
    an editable install or `-m` puts on sys.path too)."""
    lib_roots = {os.path.join(os.path.realpath(p), "lib") for p in (sys.base_prefix, sys.prefix)}
    keep = [
        p
        for p in map(os.path.realpath, filter(None, sys.path))
        if os.path.isdir(p) and any(p.startswith(root + os.sep) for root in lib_roots)
    ]
    return sorted({*keep, os.path.realpath(sys.executable)})


# ------------------------------------------------------------------ per-program accounting
class ProgramCgroup:
    """A cgroup leaf for one worker's programs (run one at a time): `memory.max`/`pids.max`
    (v2) or the v1 memory and pids hierarchies. The fork server creates it and moves itself in
    once, before its mount namespace turns /sys read-only (moving each program in would cost a
    cgroup migration, milliseconds, per program); its supervisors and programs are born inside.
    The server's own memory stays charged where it was, so the leaf counts what the program
    tree allocates. Every program process volunteers to the OOM killer first
    (`oom_score_adj` +1000; the server asks for -1000 where it may), and any OOM kill in the
    leaf during a program makes its verdict `killed` (memory)."""

    def __init__(
        self,
        version: int,
        leaves: list[tuple[int, str]],
        procs: list[int],
        events: int,
        granted: list[str],
    ):
        self.version, self.leaves, self.procs, self.events = version, leaves, procs, events
        self.granted = granted

    @classmethod
    def open(cls, memory_bytes: int, max_tasks: int) -> ProgramCgroup | None:
        """The leaf, or None where this process may not create one (not root, no delegation)."""
        name = f"wmtp-sandbox-{os.getpid()}"
        max_tasks += TRUSTED_TASKS
        for make in (cls._open_v2, cls._open_v1):
            try:
                found = make(name, memory_bytes, max_tasks)
            except OSError:
                found = None
            if found is not None:
                return found
        return None

    @classmethod
    def _open_v2(cls, name, memory_bytes, max_tasks):
        own = _own_cgroups().get("")
        mount = _cgroup_mounts().get("cgroup2")
        if own is None or mount is None:
            return None
        parent = _join_mount(mount, own)
        if not {"memory", "pids"} <= set(
            _read(os.path.join(parent, "cgroup.subtree_control")).split()
        ):
            return None
        parent_fd = os.open(parent, os.O_DIRECTORY | os.O_CLOEXEC)
        leaf = _make_leaf(parent_fd, name)
        settings = [("memory.max", memory_bytes), ("memory.swap.max", 0), ("pids.max", max_tasks)]
        _write_settings(parent_fd, name, settings)
        procs = os.open(f"{name}/cgroup.procs", os.O_WRONLY, dir_fd=parent_fd)
        events = os.open(f"{name}/memory.events", os.O_RDONLY, dir_fd=parent_fd)
        return cls(2, [(parent_fd, leaf)], [procs], events, ["memory", "pids"])

    @classmethod
    def _open_v1(cls, name, memory_bytes, max_tasks):
        own, mounts = _own_cgroups(), _cgroup_mounts()
        if "memory" not in own or "memory" not in mounts:
            return None
        leaves, procs, granted = [], [], []
        parent_fd = os.open(
            _join_mount(mounts["memory"], own["memory"]), os.O_DIRECTORY | os.O_CLOEXEC
        )
        leaves.append((parent_fd, _make_leaf(parent_fd, name)))
        _write_settings(parent_fd, name, [("memory.limit_in_bytes", memory_bytes)])
        _write_settings(
            parent_fd, name, [("memory.memsw.limit_in_bytes", memory_bytes)], optional=True
        )
        procs.append(os.open(f"{name}/cgroup.procs", os.O_WRONLY, dir_fd=parent_fd))
        events = os.open(f"{name}/memory.oom_control", os.O_RDONLY, dir_fd=parent_fd)
        granted.append("memory")
        if "pids" in own and "pids" in mounts:
            try:
                pids_fd = os.open(
                    _join_mount(mounts["pids"], own["pids"]), os.O_DIRECTORY | os.O_CLOEXEC
                )
                leaves.append((pids_fd, _make_leaf(pids_fd, name)))
                _write_settings(pids_fd, name, [("pids.max", max_tasks)])
                procs.append(os.open(f"{name}/cgroup.procs", os.O_WRONLY, dir_fd=pids_fd))
                granted.append("pids")
            except OSError:
                pass
        return cls(1, leaves, procs, events, granted)

    def join(self) -> None:
        """Moves the calling process into the leaf; its children are born there."""
        for fd in self.procs:
            os.write(fd, b"0")

    def oom_kills(self) -> int:
        """How many processes the kernel has killed for memory in this leaf so far."""
        for line in os.pread(self.events, 4096, 0).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self) -> None:
        """Moves the caller back to the parent cgroup and removes the (now empty) leaf."""
        for fd in [*self.procs, self.events]:
            os.close(fd)
        for parent_fd, name in self.leaves:
            try:
                back = os.open("cgroup.procs", os.O_WRONLY, dir_fd=parent_fd)
                try:
                    os.write(back, b"0")
                finally:
                    os.close(back)
                os.rmdir(name, dir_fd=parent_fd)
            except OSError:
                pass  # the next fork server removes leaves whose server is gone
            os.close(parent_fd)


TRUSTED_TASKS = 3  # the fork server, the per-program child and the supervisor share the leaf


def oom_score_adj(value: int) -> bool:
    """-1000: never chosen by the OOM killer (needs CAP_SYS_RESOURCE); 1000: chosen first.
    False where the kernel refuses."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        return False
    return True


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _own_cgroups() -> dict[str, str]:
    """controller → this process's cgroup path ("" for the v2 hierarchy)."""
    found = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """ "cgroup2" or a v1 controller → (mount point, the cgroup path it shows as its root)."""
    found = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, (fstype, _source, options) = left.split(), right.split()[:3]
        if fstype == "cgroup2":
            found.setdefault("cgroup2", (fields[4], fields[3]))
        elif fstype == "cgroup":
            for option in options.split(","):
                found.setdefault(option, (fields[4], fields[3]))
    return found


def _join_mount(mount: tuple[str, str], path: str) -> str:
    point, root = mount
    if root != "/" and not (path == root or path.startswith(root + "/")):
        raise OSError(errno.ENOENT, f"cgroup {path} is not under the mount's root {root}")
    relative = path[len(root) :] if root != "/" else path
    return os.path.join(point, relative.lstrip("/"))


def _make_leaf(parent_fd: int, name: str) -> str:
    for entry in os.listdir(parent_fd):  # leaves of fork servers that died without cleaning up
        if entry.startswith("wmtp-sandbox-") and entry != name:
            pid = entry.rsplit("-", 1)[-1]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                with contextlib.suppress(OSError):
                    os.rmdir(entry, dir_fd=parent_fd)
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    return name


def _write_settings(parent_fd: int, name: str, settings: list, optional: bool = False) -> None:
    for key, value in settings:
        try:
            fd = os.open(f"{name}/{key}", os.O_WRONLY, dir_fd=parent_fd)
        except FileNotFoundError:
            if optional or key == "memory.swap.max":
                continue
            raise
        try:
            os.write(fd, str(value).encode())
        except OSError:
            if not optional:
                raise
        finally:
            os.close(fd)


# ------------------------------------------------------------------ fallback: a readable stdlib
COPY_SKIP = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "site-packages",
    "dist-packages",
)


def readable_copies(paths: list[str], under: str) -> dict[str, str]:
    """For each directory in `paths` that other users cannot reach (a closed ancestor such as
    /root 0700 above a pyenv), a copy under `under` that they can read, made once per machine
    (content-addressed; owned by this uid and not writable by others). Returns original → copy."""
    closed = [os.path.realpath(p) for p in paths if _closed_ancestor(os.path.realpath(p))]
    if not closed:
        return {}
    key = hashlib.sha256(
        repr([sys.version, *[(p, os.stat(p).st_mtime_ns) for p in closed]]).encode()
    )
    target = os.path.join(under, f"wmtp-stdlib-{os.geteuid()}-{key.hexdigest()[:16]}")
    if not _trusted_copy(target):
        staging = tempfile.mkdtemp(prefix=".wmtp-stdlib-", dir=under)
        try:
            for i, path in enumerate(closed):
                shutil.copytree(
                    path,
                    os.path.join(staging, str(i)),
                    ignore=shutil.ignore_patterns(*COPY_SKIP),
                    symlinks=True,
                )
            for root, _dirs, files in os.walk(staging):
                os.chmod(root, 0o755)
                for name in files:
                    path = os.path.join(root, name)
                    if not os.path.islink(path):
                        executable = os.stat(path).st_mode & 0o111
                        os.chmod(path, 0o755 if executable else 0o644)
            open(os.path.join(staging, ".complete"), "w").close()
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not _trusted_copy(target):  # another fork server won the race, or it failed
                raise
    return {path: os.path.join(target, str(i)) for i, path in enumerate(closed)}


def _trusted_copy(path: str) -> bool:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & 0o022
        and os.path.exists(os.path.join(path, ".complete"))
    )
