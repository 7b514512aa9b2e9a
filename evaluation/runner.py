"""Runs inside the sandbox process: `python -I runner.py PROGRAM RESULT`.

Takes the completion nonce out of the environment, disables dangerous functions, runs the
program as __main__, and only then writes "done <nonce>" to RESULT. Kept dependency-free.
"""

import builtins
import faulthandler
import os
import shutil
import sys


def guard() -> None:
    """Removes process, signal, file-deletion and network functions (defence in depth)."""
    faulthandler.disable()
    for name in (
        "fork",
        "forkpty",
        "kill",
        "killpg",
        "system",
        "execv",
        "execve",
        "execvp",
        "execvpe",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "spawnv",
        "spawnve",
        "spawnvp",
        "spawnvpe",
        "spawnl",
        "spawnle",
        "spawnlp",
        "spawnlpe",
        "posix_spawn",
        "posix_spawnp",
        "popen",
        "remove",
        "unlink",
        "rmdir",
        "removedirs",
        "rename",
        "renames",
        "replace",
        "truncate",
        "ftruncate",
        "setsid",
        "setpgid",
        "setuid",
        "putenv",
        "chmod",
        "chown",
        "fchmod",
        "fchown",
        "lchown",
        "link",
        "symlink",
        "chroot",
        "fchdir",
        "chdir",
        "unshare",
    ):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    import socket
    import subprocess

    subprocess.Popen = None
    socket.socket = socket.create_connection = socket.socketpair = None
    for module in (
        "ctypes",
        "_ctypes",
        "_posixsubprocess",
        "multiprocessing",
        "resource",
        "psutil",
        "pty",
    ):
        sys.modules[module] = None
    builtins.help = None


def main() -> None:
    program, result = sys.argv[1], os.path.abspath(sys.argv[2])
    nonce = os.environ.pop("WMTP_NONCE", "")
    with open(program) as f:
        source = f.read()
    sys.argv = [program]
    write = open  # keep a reference the program cannot take away from this frame
    guard()
    code = compile(source, program, "exec")
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:  # sys.exit()/exit() at the end of a stdin/stdout solution is normal
        if exc.code not in (None, 0):
            raise
    sys.stdout.flush()
    with write(result, "w") as f:
        f.write(f"done {nonce}\n")


if __name__ == "__main__":
    main()
