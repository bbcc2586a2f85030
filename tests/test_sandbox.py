"""The code scorer's sandbox against the attacks model-written code can make.

Every test runs hostile code through ``run_code_tests`` and checks, from the host where it
matters, that the attack did not reach anything outside the sandbox. Each one is bounded
in time: the attacks that try to outlive their run check the wall clock too.
"""

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from torouter.prepare.scorers import run_code_tests

# Switches the in-process audit hook off: walks the frames up to the harness and clears the
# list of blocked events. The hook is a convenience that names the refused call; the sandbox
# has to hold without it.
BYPASS_HOOK = """
import sys
_frame = sys._getframe()
while _frame is not None:
    if "_BLOCKED" in _frame.f_globals:
        _frame.f_globals["_BLOCKED"] = ()
    _frame = _frame.f_back
"""


def _world_dir(mode=0o755) -> Path:
    """A host directory any uid could read (and, with 0o777, write): only a private view hides it."""
    path = Path(tempfile.mkdtemp(prefix="torouter-host-"))
    path.chmod(mode)
    return path


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def _assert_no_process_with(marker: str):
    leftover = _processes_with(marker)
    for pid in leftover:  # do not leave them behind when the assertion fails
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert leftover == [], f"sandboxed processes outlived their run: {leftover}"


def test_host_files_are_not_readable():
    shared = _world_dir()
    secret = shared / "notes.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    home_probe = Path.home() / f".torouter-sandbox-probe-{uuid.uuid4().hex}"
    home_probe.write_text("home secret")
    home_probe.chmod(0o644)
    paths = ["/etc/passwd", "/etc/hostname", str(secret), str(home_probe), os.path.abspath(__file__),
             str(Path.home())]
    code = f"""
import os
leaks = []
for path in {paths!r}:
    try:
        if path == {str(Path.home())!r}:
            if any(name.startswith(".torouter-sandbox-probe") for name in os.listdir(path)):
                leaks.append(path)
            continue
        with open(path, "rb") as f:
            f.read(1)
        leaks.append(path)
    except OSError:
        pass
"""
    try:
        result = run_code_tests(code, "assert leaks == [], leaks", timeout_s=8)
    finally:
        home_probe.unlink()
        secret.unlink()
        shared.rmdir()
    assert result.passed, result.detail


def test_writes_stay_inside_the_sandbox(monkeypatch):
    open_dir = _world_dir(0o777)
    monkeypatch.chdir(open_dir)
    name = f"written-{uuid.uuid4().hex}"
    targets = [str(open_dir / name), f"/tmp/{name}", str(Path.home() / name)]
    code = f"""
import os
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("x")
    except OSError:
        pass
open("scratch.txt", "w").write("the work dir stays writable")
"""
    try:
        result = run_code_tests(code, "assert open('scratch.txt').read().startswith('the work')", timeout_s=8)
        escaped = [t for t in targets if os.path.exists(t)]
    finally:
        for t in targets:
            if os.path.exists(t):
                os.unlink(t)
        monkeypatch.undo()
        open_dir.rmdir()
    assert result.passed, result.detail
    assert escaped == []


def test_scorer_working_directory_is_unreachable_through_proc(monkeypatch):
    workdir = _world_dir(0o777)
    precious = workdir / "precious.txt"
    precious.write_text("the scorer's own file")
    precious.chmod(0o666)
    monkeypatch.chdir(workdir)
    code = """
import os
pids = [str(os.getppid())]
try:
    pids += [p for p in os.listdir("/proc") if p.isdigit()]
except OSError:
    pass
for pid in pids:
    cwd = f"/proc/{pid}/cwd"
    try:
        if "precious.txt" in os.listdir(cwd):
            os.remove(os.path.join(cwd, "precious.txt"))
    except OSError:
        pass
"""
    try:
        result = run_code_tests(code, "", timeout_s=8)
        survived = precious.exists()
    finally:
        monkeypatch.undo()
        if precious.exists():
            precious.unlink()
        workdir.rmdir()
    assert result.passed, result.detail
    assert survived, "the sandboxed code deleted a file in the scorer's working directory"


def test_parent_environment_is_unreachable():
    # /proc/<pid>/environ shows the environment a process started with, so the key has to be in
    # the scorer's environment from its start, as an API key exported in a shell would be.
    secret = "sk-" + uuid.uuid4().hex
    code = """
import os
found = [k for k in os.environ if k == "TOROUTER_PROBE_API_KEY"]
pids = [str(os.getppid())]
try:
    pids += [p for p in os.listdir("/proc") if p.isdigit()]
except OSError:
    pass
for pid in pids:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if b"TOROUTER_PROBE_API_KEY=" in f.read():
                found.append(pid)
    except OSError:
        pass
"""
    scorer = ("import sys\nfrom torouter.prepare.scorers import run_code_tests\n"
              "result = run_code_tests(sys.stdin.read(), 'assert found == [], found', timeout_s=8)\n"
              "print(result.passed, result.detail)")
    env = dict(os.environ, TOROUTER_PROBE_API_KEY=secret)
    run = subprocess.run([sys.executable, "-c", scorer], input=code, capture_output=True, text=True, env=env,
                         timeout=9)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("True"), run.stdout
    assert secret not in run.stdout


def test_audit_hook_bypass_leaves_an_unprivileged_limited_process():
    code = BYPASS_HOOK + """
import os, resource, subprocess, sys
child = subprocess.run([sys.executable, "-c", "import os; print(os.getuid(), os.geteuid())"],
                       capture_output=True, text=True, timeout=5)
ids = [int(x) for x in child.stdout.split()]
soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
caps = None
if os.path.exists("/proc/self/status"):
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
"""
    tests = ("assert len(ids) == 2, 'the hook is off, so the spawn itself must work'\n"
             "assert ids[0] != 0 and ids[1] != 0, ids\n"
             "assert os.getuid() != 0 and os.geteuid() != 0\n"
             "assert soft != resource.RLIM_INFINITY and hard != resource.RLIM_INFINITY\n"
             "assert caps in (None, 0), hex(caps)")
    result = run_code_tests(code, tests, timeout_s=8)
    assert result.passed, result.detail


def test_fork_bomb_is_bounded():
    marker = f"torouter-forkbomb-{uuid.uuid4().hex}"
    # Sleepers exec a command line the host can find; 40 is far above the sandbox's process limit
    # and keeps the attack small where no limit holds.
    code = BYPASS_HOOK + f"""
import os
n = 0
try:
    while n < 40:
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(20)  # {marker}"])
        n += 1
except OSError:
    pass
"""
    start = time.monotonic()
    result = run_code_tests(code, "assert n < 40, n", timeout_s=5)
    elapsed = time.monotonic() - start
    _assert_no_process_with(marker)
    assert result.passed, result.detail
    assert elapsed < 9


def test_memory_bomb_is_bounded():
    code = """
chunks = []
try:
    while len(chunks) < 64:   # 1 GiB in 16 MiB chunks
        chunks.append(bytearray(16 * 2**20))
except MemoryError:
    pass
held = len(chunks) * 16
del chunks
written = 0
try:
    i = 0
    while written < 256:      # MiB of files in the scratch directory
        with open(f"fill-{i}.bin", "wb") as f:
            for _ in range(8):
                f.write(b"x" * 2**20)
                written += 1
        i += 1
except OSError:
    pass
"""
    start = time.monotonic()
    result = run_code_tests(code, "assert held < 256, held\nassert written < 256, written", timeout_s=8,
                            memory_mb=256)
    assert result.passed, result.detail
    assert time.monotonic() - start < 9


def test_setsid_child_does_not_outlive_the_timeout():
    marker = f"torouter-setsid-{uuid.uuid4().hex}"
    code = BYPASS_HOOK + f"""
import os, time
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(20)  # {marker}"])
time.sleep(20)
"""
    start = time.monotonic()
    result = run_code_tests(code, "", timeout_s=1)
    elapsed = time.monotonic() - start
    _assert_no_process_with(marker)
    assert result.status == "timeout" and not result.passed
    assert elapsed < 5, f"a 1 s timeout took {elapsed:.1f} s"


@pytest.mark.parametrize("code, tests", [
    ("import sys\nsys.exit(0)\ndef f():\n    return 1", "assert f() == 2"),
    ("import os\nos._exit(0)\ndef f():\n    return 1", "assert f() == 2"),
    ("raise SystemExit\ndef f():\n    return 1", "assert f() == 2"),
    ("def f():\n    return 1", "assert f() == 1\nimport sys\nsys.exit(0)\nassert f() == 2"),
    ("import atexit, os\natexit.register(lambda: os._exit(0))\ndef f():\n    return 1", "assert f() == 2"),
])
def test_exit_before_the_tests_end_is_not_a_pass(code, tests):
    result = run_code_tests(code, tests, timeout_s=8)
    assert not result.passed and result.status == "failed", result


def test_passing_program_may_print_anything():
    code = "import sys\nprint('x' * 100000)\nsys.stdout.write('no newline')\ndef f():\n    return 1"
    assert run_code_tests(code, "assert f() == 1", timeout_s=8).passed
    failing = run_code_tests("print('before')\ndef f():\n    return 1", "assert f() == 2, 'wrong'", timeout_s=8)
    assert not failing.passed and failing.detail == "AssertionError: wrong"
