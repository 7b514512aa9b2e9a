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
  landlock       (kernel ≥ 5.13, any user) writes only in the program's directory, no TCP bind or
                 connect (ABI ≥ 4), no signals or abstract sockets outside the sandbox (ABI ≥ 6)
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

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
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_DUMPABLE, PR_SET_PDEATHSIG = 38, 24, 4, 1
PR_SET_CHILD_SUBREAPER, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 36, 22, 2
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
    }, "socket": 41, "clone": 56, "clone3": 435},
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
    }, "socket": 198, "clone": 220, "clone3": 435},
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


def expose_to_others(paths: list[str]) -> list[str]:
    """Makes `paths` (the interpreter's directories) reachable by an unprivileged uid when an
    ancestor is closed (e.g. /root, 0700): a tmpfs covers that ancestor, which hides the rest
    of it, and a clone of each path is attached at the same place. Call in a private mount
    namespace before `read_only_tree`. Returns the ancestors covered."""
    by_ancestor: dict[str, list[str]] = {}
    for path in sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)}):
        ancestor = _closed_ancestor(path)
        if ancestor is not None and not any(
            path.startswith(q + "/") for q in by_ancestor.get(ancestor, [])
        ):
            by_ancestor.setdefault(ancestor, []).append(path)
    for ancestor, inside in by_ancestor.items():
        clones = []
        for path in inside:
            flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
            clones.append(
                (
                    path,
                    _check(libc.syscall(428, AT_FDCWD, path.encode(), flags), f"open_tree {path}"),
                )
            )
        mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for path, fd in clones:
            os.makedirs(path, exist_ok=True)
            _check(
                libc.syscall(429, fd, b"", AT_FDCWD, path.encode(), MOVE_MOUNT_F_EMPTY_PATH),
                f"move_mount {path}",
            )
            os.close(fd)
    return sorted(by_ancestor)


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


def private_mounts(tmp_size_mb: int) -> bool:
    """Fresh tmpfs on /tmp and /dev/shm, and a /proc of the current PID namespace when the
    kernel allows it (a container's masked /proc can forbid it in a user namespace; the PID
    namespace and the uid still hide and protect outside processes). True: own /proc."""
    for target in ("/tmp", "/dev/shm"):
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_size_mb}m,mode=1777")
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


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_program() -> bytes:
    """The filter: refused syscalls return EPERM (socket of a non-AF_UNIX family: EACCES;
    clone3: ENOSYS, so libc falls back to clone, whose namespace flags are refused)."""
    arch = ARCH.get(platform.machine())
    if arch is None:
        raise OSError(errno.ENOSYS, f"seccomp: no syscall table for {platform.machine()}")
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, RET|K
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    errno_ret = lambda e: 0x00050000 | e  # noqa: E731 - SECCOMP_RET_ERRNO
    prog = [_bpf(LD, 4), _bpf(JEQ, arch["audit"], 1, 0), _bpf(RET, KILL), _bpf(LD, 0)]
    if platform.machine() == "x86_64":  # the x32 ABI reuses numbers with bit 30 set
        prog += [_bpf(0x35, 0x40000000, 0, 1), _bpf(RET, errno_ret(errno.EPERM))]  # JGE
    for nr in sorted(set(arch["syscalls"].values())):
        prog += [_bpf(JEQ, nr, 0, 1), _bpf(RET, errno_ret(errno.EPERM))]
    prog += [_bpf(JEQ, arch["clone3"], 0, 1), _bpf(RET, errno_ret(errno.ENOSYS))]
    prog += [_bpf(JEQ, arch["clone"], 0, 3), _bpf(LD, 16), _bpf(JSET, NAMESPACE_FLAGS, 0, 1),
             _bpf(RET, errno_ret(errno.EPERM)), _bpf(LD, 0)]  # fmt: skip
    prog += [_bpf(JEQ, arch["socket"], 0, 3), _bpf(LD, 16), _bpf(JEQ, AF_UNIX, 1, 0),
             _bpf(RET, errno_ret(errno.EACCES))]  # fmt: skip
    prog += [_bpf(RET, ALLOW)]
    return b"".join(prog)


def install_seccomp() -> None:
    """Applies the filter to this thread and everything it starts (needs no_new_privs)."""
    program = seccomp_program()
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


def install_landlock(writable: list[str]) -> int:
    """Read/execute everywhere, write only under `writable` (and /dev/null); no TCP; no
    signals or abstract unix sockets beyond this domain. Returns the ABI used (0: none)."""
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
        rules = [("/", READ_ONLY), ("/dev/null", 2 | 4), *[(path, handled_fs) for path in writable]]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                allowed = (
                    access & handled_fs
                    if os.path.isdir(path)
                    else access & (1 | 2 | 4 | (1 << 14) | (1 << 15))
                )
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
