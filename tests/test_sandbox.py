"""Hostile programs are judged failed and the host stays unharmed: canary files absent, victim
process alive, host listener untouched, harness alive, nothing left running. Each case runs in
the namespace sandbox and in the fallback (no namespaces: uid, Landlock, seccomp, rlimits);
cases that need namespaces skip with the reason where the kernel refuses them."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from evaluation.sandbox import Limits, Sandbox
from tests.conftest import REPO_ROOT

LIMITS = Limits(timeout_s=3, cpu_s=3, memory_mb=512, output_bytes=64_000)
REIMPORT_CTYPES = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


@pytest.fixture(scope="module", params=["namespaces", "fallback"])
def sandbox(request):
    box = Sandbox(LIMITS, isolate=request.param == "namespaces")
    if request.param == "namespaces" and not box.namespaces:
        pytest.skip(f"the kernel refuses namespaces here: {box.isolation}")
    yield box
    box.close()


@pytest.fixture(scope="module", params=["namespaces", "fallback"])
def bare(request):
    """The kernel layers alone (no in-process guard or audit hook): ctypes reaches libc."""
    box = Sandbox(LIMITS, isolate=request.param == "namespaces", guards=False)
    if request.param == "namespaces" and not box.namespaces:
        pytest.skip(f"the kernel refuses namespaces here: {box.isolation}")
    yield box
    box.close()


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted = []

    def accept():
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    server.close()


@pytest.fixture
def victim():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def sandbox_processes() -> list[int]:
    """Host processes running as a sandbox uid (there must be none between runs)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid >= LIMITS.uid:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def assert_failed_and_host_fine(sandbox, result, statuses=("failed",)):
    assert not result.passed and result.status in statuses, (result.status, result.stderr[-400:])
    assert sandbox.run("print('still alive')").passed  # the harness and its server still work
    assert not sandbox_processes()


# ------------------------------------------------------------------ plain programs
def test_a_normal_program_passes_and_prints(sandbox):
    result = sandbox.run(
        "import sys\nx = int(sys.stdin.readline())\nprint(x * 2)\nassert x == 21", stdin="21\n"
    )
    assert result.passed and result.stdout == "42\n" and result.status == "passed"


def test_a_failing_assert_fails(sandbox):
    result = sandbox.run("assert 1 + 1 == 3")
    assert not result.passed and result.status == "failed" and "AssertionError" in result.stderr
    assert "runner.py" not in result.stderr  # the traceback is the program's own


def test_stdin_stdout_programs_may_exit_zero_after_their_answer(sandbox):
    assert sandbox.run("print(5)\nimport sys\nsys.exit(0)", io=True).passed
    assert not sandbox.run("print(5)\nimport sys\nsys.exit(3)", io=True).passed
    assert sandbox.run("print(5)\nexit()", io=True).stdout == "5\n"


# ----------------------------------------------------------- passes that are not passes
@pytest.mark.parametrize(
    "exit_call",
    ["import sys\nsys.exit(0)", "raise SystemExit", "exit()", "quit()", "import sys\nsys.exit()"],
)
def test_exiting_before_the_tests_is_a_failure(sandbox, exit_call):
    result = sandbox.run(f"def f():\n    return 1\n{exit_call}\nassert f() == 2\n")
    assert (
        not result.passed
        and result.status == "failed"
        and "exited before its tests finished" in result.stderr
    )


def test_the_nonce_is_not_in_the_environment_or_argv(sandbox):
    program = (
        "import os, sys\n"
        "env = open('/proc/self/environ', 'rb').read()\n"
        "cmd = open('/proc/self/cmdline', 'rb').read()\n"
        "print(env, cmd, sys.argv, dict(os.environ))\n"
        "for fd in range(3, 64):\n"
        "    for word in env.split(b'\\0') + cmd.split(b'\\0'):\n"
        "        try: os.write(fd, b'done ' + word)\n"
        "        except OSError: pass\n"
        "os._exit(0)\n"
        "assert False\n"
    )
    assert_failed_and_host_fine(sandbox, sandbox.run(program))


def test_the_nonce_is_not_reachable_from_frames_or_objects(sandbox):
    program = (
        "import os, sys, gc\n"
        "found = []\n"
        "try:\n    raise RuntimeError\nexcept RuntimeError as e:\n    f = e.__traceback__.tb_frame\n"
        "while f is not None:\n"
        "    found += [v for v in f.f_locals.values() if isinstance(v, (bytes, str))]\n"
        "    found += [c.cell_contents for fn in f.f_locals.values() if callable(fn) and getattr(fn, '__closure__', None) for c in fn.__closure__ if isinstance(c.cell_contents, (bytes, str))]\n"
        "    f = f.f_back\n"
        "import threading\n"
        "for t in threading.enumerate():\n"
        "    found += [a for a in (getattr(t, '_args', ()) or ()) if isinstance(a, (bytes, str))]\n"
        "for fn in (getattr(sys, '_current_frames', None), getattr(gc, 'get_objects', None)):\n"
        "    assert fn is None, 'walker left in place'\n"
        "for fd in range(3, 64):\n"
        "    for v in found:\n"
        "        v = v.hex() if isinstance(v, bytes) else v\n"
        "        try: os.write(fd, ('done ' + v).encode())\n"
        "        except OSError: pass\n"
        "os._exit(0)\n"
    )
    assert_failed_and_host_fine(sandbox, sandbox.run(program))


def test_an_atexit_hook_cannot_turn_a_failure_into_a_pass(sandbox):
    program = (
        "import atexit, os\n"
        "def forge():\n"
        "    for fd in range(3, 64):\n"
        "        try: os.write(fd, b'done 00000000000000000000000000000000')\n"
        "        except OSError: pass\n"
        "atexit.register(forge)\n"
        "assert 1 == 2\n"
    )
    assert_failed_and_host_fine(sandbox, sandbox.run(program))


def test_setting_the_verdict_event_early_is_detected(sandbox):
    program = (
        "import os, threading\n"
        "try:\n    raise RuntimeError\nexcept RuntimeError as e:\n    f = e.__traceback__.tb_frame\n"
        "while f is not None:\n"
        "    for v in list(f.f_locals.values()):\n"
        "        if isinstance(v, threading.Event):\n"
        "            v.set()\n"
        "    f = f.f_back\n"
        "import time\ntime.sleep(0.2)\n"
        "os._exit(0)\n"
    )
    assert_failed_and_host_fine(sandbox, sandbox.run(program))


# ------------------------------------------------------------------------ escapes
def test_remounting_root_read_write_fails_and_the_project_is_untouched(bare):
    sandbox = bare
    canary = REPO_ROOT / "sandbox-canary.txt"
    program = (
        REIMPORT_CTYPES
        + (
            "print('mount', libc.mount(b'none', b'/', None, 32, None), ctypes.get_errno())\n"  # MS_REMOUNT
            f"open({str(canary)!r}, 'w').write('escaped')\n"
        )
    )
    result = sandbox.run(program)
    assert not canary.exists()
    assert "mount -1" in result.stdout  # libc was reached; the kernel refused
    assert_failed_and_host_fine(sandbox, result)


def test_entering_other_namespaces_fails(bare, tmp_path, listener):
    sandbox = bare
    port, accepted = listener
    canary = Path("/tmp") / f"wmtp-canary-{os.getpid()}"
    program = REIMPORT_CTYPES + (
        "import os, posix, _socket\n"
        "entered = []\n"
        "for pid in ['1', 'self', *[p for p in os.listdir('/proc') if p.isdigit()]]:\n"
        "    for ns in ('mnt', 'net', 'pid', 'user'):\n"
        "        try:\n"
        "            fd = posix.open(f'/proc/{pid}/ns/{ns}', posix.O_RDONLY)\n"
        "            entered.append((pid, ns, libc.setns(fd, 0), ctypes.get_errno()))\n"
        "        except OSError:\n"
        "            pass\n"
        f"try:\n    open({str(canary)!r}, 'w').write('escaped')\nexcept OSError as e:\n    print(e)\n"
        f"s = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n"
    )
    result = sandbox.run(program)
    assert not canary.exists()
    time.sleep(0.3)
    assert accepted == []
    assert_failed_and_host_fine(sandbox, result)


def test_no_network_even_through_raw_sockets(sandbox, listener):
    port, accepted = listener
    for target in (f"('127.0.0.1', {port})", "('1.1.1.1', 53)"):
        result = sandbox.run(
            f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect({target})"
        )
        assert not result.passed
        assert any(m in result.stderr for m in ("Permission denied", "unreachable")), result.stderr[
            -300:
        ]
    time.sleep(0.3)
    assert accepted == []


def test_host_dev_shm_and_tmp_are_not_writable(sandbox):
    name = f"wmtp-canary-{os.getpid()}"
    result = sandbox.run(
        f"open('/dev/shm/{name}', 'w').write('x')\nopen('/tmp/{name}', 'w').write('x')\nprint('wrote')"
    )
    assert not Path(f"/dev/shm/{name}").exists() and not Path(f"/tmp/{name}").exists()
    if sandbox.namespaces:  # its own private /tmp and /dev/shm: allowed, and gone afterwards
        assert result.passed and "wrote" in result.stdout
    else:
        assert not result.passed


def test_the_harness_and_other_host_processes_cannot_be_signalled(sandbox, victim):
    program = (
        "import posix, os\n"
        f"for pid in ({os.getpid()}, {victim}, os.getppid(), 1):\n"
        "    try:\n        posix.kill(pid, 9)\n    except OSError as e:\n        print(pid, e)\n"
    )
    result = sandbox.run(program)
    assert Path(f"/proc/{victim}").exists() and os.waitpid(victim, os.WNOHANG) == (0, 0)
    assert result.status in ("passed", "failed")  # a verdict was recorded
    assert sandbox.run("print('still alive')").passed


def test_harness_secrets_are_not_readable(sandbox, monkeypatch):
    secret = "wmtp-fake-aws-secret-1234"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    program = (
        "import os\n"
        f"for pid in ('self', os.getppid(), 1, {os.getpid()}, *os.listdir('/proc')):\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n    except (OSError, ValueError):\n        pass\n"
        "print(os.listdir('/root'))\n"
    )
    result = Sandbox(LIMITS, isolate=sandbox.namespaces).run(program)
    assert secret not in result.stdout + result.stderr
    if sandbox.namespaces and os.geteuid() == 0:
        assert ".ssh" not in result.stdout and ".bash_history" not in result.stdout


def test_fork_bombs_are_bounded_and_reaped(sandbox):
    program = (
        "import posix, time\n"
        "n = 0\n"
        "for _ in range(80):\n"
        "    try:\n        pid = posix.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(30)\n        posix._exit(0)\n"
        "    n += 1\n"
        "print(n)\n"
    )
    result = sandbox.run(program)
    assert (
        result.stdout.strip() and int(result.stdout.strip().splitlines()[-1]) < LIMITS.max_processes
    )
    assert not sandbox_processes()


def test_a_double_forked_daemon_does_not_outlive_the_run(sandbox):
    program = (
        "import posix, time\n"
        "if posix.fork() == 0:\n"
        "    posix.setsid()\n"
        "    if posix.fork() == 0:\n"
        "        time.sleep(30)\n"
        "    posix._exit(0)\n"
        "time.sleep(0.2)\n"
    )
    sandbox.run(program)
    time.sleep(0.2)
    assert not sandbox_processes()


@pytest.mark.parametrize(
    "name, program, statuses",
    [
        ("fork bomb", "import os\nwhile True:\n    os.fork()", {"failed"}),
        ("fork bomb via ctypes", "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()", {"failed"}),
        ("fork via subprocess", "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])", {"failed"}),
        ("infinite loop", "while True:\n    pass", {"timeout", "killed"}),
        ("sleeping forever", "import time\ntime.sleep(1000)", {"timeout"}),
        ("memory bomb", "x = []\nwhile True:\n    x.append(bytearray(10**7))", {"failed", "killed"}),
        ("os._exit before the asserts", "import os\nos._exit(0)\nassert False", {"failed"}),
        ("huge output", "while True:\n    print('x' * 10000)", {"timeout", "killed"}),
        ("kill the parent", "import os\nos.kill(os.getppid(), 9)", {"failed"}),
    ],
)  # fmt: skip
def test_hostile_programs_are_contained(sandbox, name, program, statuses):
    start = time.perf_counter()
    result = sandbox.run(program)
    assert not result.passed, name
    assert result.status in statuses, (name, result.status, result.stderr[-300:])
    assert time.perf_counter() - start < 10
    assert len(result.stdout) <= 64_000
    assert sandbox.run("print('still alive')").passed


def test_deleting_or_overwriting_files_outside_fails_and_they_survive(sandbox, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for program in (f"import posix\nposix.unlink({str(victim)!r})", f"open({str(victim)!r}, 'w').write('gone')",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):  # fmt: skip
        assert not sandbox.run(program).passed
    assert victim.read_text() == "keep me"
    assert sandbox.run(
        "open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'"
    ).passed


def test_isolation_says_what_this_machine_granted(sandbox):
    assert "seccomp" in sandbox.isolation and "rlimits" in sandbox.isolation
    assert ("namespaces(" in sandbox.isolation) == sandbox.namespaces
    assert "PROBE-FAILED" not in sandbox.isolation
