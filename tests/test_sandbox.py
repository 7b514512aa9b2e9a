"""Hostile programs are contained, scored as failures, and the harness keeps working."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from evaluation.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout_s=3, cpu_s=3, memory_mb=512, output_bytes=64_000))


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


def test_a_normal_program_passes_and_prints(sandbox):
    result = sandbox.run(
        "import sys\nx = int(sys.stdin.readline())\nprint(x * 2)\nassert x == 21", stdin="21\n"
    )
    assert result.passed and result.stdout == "42\n" and result.status == "passed"


def test_a_failing_assert_fails(sandbox):
    result = sandbox.run("assert 1 + 1 == 3")
    assert not result.passed and result.status == "failed" and "AssertionError" in result.stderr


@pytest.mark.parametrize(
    "name, program, statuses",
    [
        ("fork bomb", "import os\nwhile True:\n    os.fork()", {"failed"}),
        (
            "fork bomb via ctypes",
            "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()",
            {"failed"},
        ),
        (
            "fork via subprocess",
            "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])",
            {"failed"},
        ),
        ("infinite loop", "while True:\n    pass", {"timeout", "killed"}),
        ("sleeping forever", "import time\ntime.sleep(1000)", {"timeout"}),
        (
            "memory bomb",
            "x = []\nwhile True:\n    x.append(bytearray(10**7))",
            {"failed", "killed"},
        ),
        ("os._exit before the asserts", "import os\nos._exit(0)\nassert False", {"failed"}),
        ("huge output", "while True:\n    print('x' * 10000)", {"failed", "killed"}),
        ("kill the parent", "import os\nos.kill(os.getppid(), 9)", {"failed"}),
    ],
)
def test_hostile_programs_are_contained(sandbox, name, program, statuses):
    start = time.perf_counter()
    result = sandbox.run(program)
    assert not result.passed, name
    assert result.status in statuses, (name, result.status, result.stderr[-300:])
    assert time.perf_counter() - start < 10
    assert len(result.stdout) <= 64_000
    assert sandbox.run("print('still alive')").passed  # the harness is unharmed


def test_deleting_files_outside_its_dir_fails_and_the_file_survives(sandbox, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for program in (
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
    ):
        assert not sandbox.run(program).passed
    assert victim.read_text() == "keep me"


def test_overwriting_files_outside_its_dir_is_blocked_with_namespaces(sandbox, tmp_path):
    if sandbox.isolation != "namespaces":
        pytest.skip("mount namespaces are not permitted on this machine (guard-only isolation)")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    result = sandbox.run(f"open({str(victim)!r}, 'w').write('gone')")
    assert not result.passed and "Read-only file system" in result.stderr
    assert victim.read_text() == "keep me"
    assert sandbox.run(
        "open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'"
    ).passed


def test_opening_a_socket_fails(sandbox, listener):
    port, accepted = listener
    result = sandbox.run(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))")
    assert not result.passed
    if sandbox.isolation == "namespaces":
        raw = sandbox.run(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))")
        assert not raw.passed and "unreachable" in raw.stderr
    time.sleep(0.3)
    assert accepted == []


def test_sys_exit_zero_after_output_counts_as_finished(sandbox):
    assert sandbox.run("print(5)\nimport sys\nsys.exit(0)").passed
    assert not sandbox.run("import sys\nsys.exit(3)").passed
