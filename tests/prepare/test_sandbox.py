"""The code scorer's sandbox against the attacks model-written code can make.

Every test runs hostile code through ``run_code_tests`` and checks, from the host where it
matters, that the attack did not reach anything outside the sandbox. Each one is bounded
in time: the attacks that try to outlive their run check the wall clock too.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from torouter.prepare.scorers import ScoreError, ScorerConfig, run_code_tests

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
    scorer = ("import sys\nfrom torouter.prepare.scorers import ScoreError, ScorerConfig, run_code_tests\n"
              "result = run_code_tests(sys.stdin.read(), 'assert found == [], found', timeout_s=8)\n"
              "print(result.passed, result.detail)")
    env = dict(os.environ, TOROUTER_PROBE_API_KEY=secret)
    run = subprocess.run([sys.executable, "-c", scorer], input=code, capture_output=True, text=True, env=env,
                         timeout=9)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("True"), run.stdout
    assert secret not in run.stdout


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="keyctl syscall numbers are x86_64's here")
def test_session_keyring_is_unreachable():
    # Keys in the scorer's session keyring (kerberos tickets, pam_keyinit logins) belong to
    # whoever possesses that keyring, and a child inherits it.
    code = BYPASS_HOOK + """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
found = libc.syscall(250, 10, -3, b"user", b"torouter-probe", 0)  # KEYCTL_SEARCH in the session keyring
listed = os.path.exists("/proc/keys") and "torouter-probe" in open("/proc/keys").read()
"""
    scorer = ("import ctypes, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
              "assert libc.syscall(250, 1, b'torouter-test') >= 0, 'join a session keyring'\n"
              "assert libc.syscall(248, b'user', b'torouter-probe', b's3cret', 6, -3) > 0, 'add a key'\n"
              "from torouter.prepare.scorers import run_code_tests\n"
              "result = run_code_tests(sys.stdin.read(), 'assert found < 0 and not listed, (found, listed)', 8)\n"
              "print(result.passed, result.detail)")
    run = subprocess.run([sys.executable, "-c", scorer], input=code, capture_output=True, text=True, timeout=9)
    if run.returncode != 0 and "keyring" in run.stderr:
        pytest.skip(f"this machine forbids keyrings: {run.stderr.strip()[-200:]}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("True"), run.stdout


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


# --------------------------------------------------------------------------- modes and failing closed

PREPARE_DIR = Path(__file__).resolve().parents[2] / "shared" / "torouter" / "prepare"


def test_unknown_mode_is_refused(monkeypatch):
    with pytest.raises(ScoreError, match="unknown sandbox 'docker'"):
        ScorerConfig("code", sandbox="docker")
    monkeypatch.setenv("TOROUTER_SANDBOX", "none")
    with pytest.raises(ScoreError, match="unknown sandbox TOROUTER_SANDBOX 'none'"):
        run_code_tests("x = 1", "", timeout_s=5)


def test_without_namespaces_the_scorer_fails_closed():
    """Where namespaces are forbidden (a nested user namespace allowed none here), nothing runs."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare to forbid namespaces for one process")
    script = ("import sys\n"
              "open('/proc/sys/user/max_user_namespaces', 'w').write('0')\n"
              "from torouter.prepare.scorers import ScoreError, run_code_tests\n"
              "try:\n"
              "    result = run_code_tests('import os\\nprint(os.getuid())', '', timeout_s=5)\n"
              "except ScoreError as exc:\n"
              "    print('REFUSED', exc)\n"
              "else:\n"
              "    print('RAN', result)\n")
    env = {k: v for k, v in os.environ.items() if k != "TOROUTER_SANDBOX"}
    run = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", script],
                         capture_output=True, text=True, env=env, timeout=9)
    if run.returncode != 0 and "unshare failed" in run.stderr:
        pytest.skip(f"this machine forbids user namespaces outright: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("REFUSED"), run.stdout
    assert "unshare" in run.stdout and "TOROUTER_SANDBOX=rlimits" in run.stdout


def _interpreter_for_rlimits_mode():
    """An interpreter the rlimits mode can run: as root it drops to uid 65534, which must reach it."""
    candidates = [os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable),
                  "/usr/local/bin/python3", "/usr/bin/python3"]
    for path in candidates:
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            continue
        if os.geteuid() != 0:
            return real
        parts = Path(real).parents
        if all(p.stat().st_mode & stat.S_IXOTH for p in parts) and os.stat(real).st_mode & stat.S_IXOTH:
            return real
    return None


def _run_rlimits(program: str, timeout_s: float) -> tuple[str, int, str]:
    """Runs sandbox.py on its own (it needs only the standard library) under that interpreter."""
    interpreter = _interpreter_for_rlimits_mode()
    if interpreter is None:
        pytest.skip("as root, the rlimits mode needs a Python that uid 65534 can run; none here")
    script = (f"import json, sys\nsys.path.insert(0, {str(PREPARE_DIR)!r})\nimport sandbox\n"
              f"r = sandbox.run_python(sys.stdin.read(), sandbox.Limits(timeout_s={timeout_s}), mode='rlimits')\n"
              "print(json.dumps([r.status, r.exit_code, r.stderr[-2000:]]))\n")
    run = subprocess.run([interpreter, "-I", "-c", script], input=program, capture_output=True, text=True,
                         timeout=9, env={"PATH": "/usr/bin:/bin", "TOROUTER_PROBE_API_KEY": "sk-probe"})
    assert run.returncode == 0, run.stderr
    return tuple(json.loads(run.stdout))


def test_rlimits_mode_runs_limited_and_needs_the_end():
    status, code, err = _run_rlimits("import os\nprint(sorted(os.environ), os.getuid())\nassert 1 + 1 == 2", 5)
    assert status == "finished" and code == 0, err
    assert "TOROUTER_PROBE_API_KEY" not in err
    if os.geteuid() == 0:
        assert err.split()[-1] == "65534"  # root drops to nobody
    status, code, err = _run_rlimits("import sys\nsys.exit(0)\nassert False", 5)
    assert status == "exited" and code == 0


def test_rlimits_mode_kills_every_descendant():
    marker = f"torouter-rlimits-{uuid.uuid4().hex}"
    # A daemon that leaves the session and closes its pipes, then the program finishes at once.
    program = BYPASS_HOOK + f"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in (0, 1, 2):
            os.close(fd)
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(20)  # {marker}"])
    os._exit(0)
os.wait()
"""
    status, code, err = _run_rlimits(program, 5)
    assert status == "finished", err
    _assert_no_process_with(marker)
    start = time.monotonic()
    status, _, err = _run_rlimits(BYPASS_HOOK + f"""
import os, time
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(20)  # {marker}"])
time.sleep(20)
""", 1)
    assert status == "timeout" and time.monotonic() - start < 5
    _assert_no_process_with(marker)


def test_rlimits_mode_bounds_processes():
    marker = f"torouter-rlimits-bomb-{uuid.uuid4().hex}"
    program = BYPASS_HOOK + f"""
import os
n = 0
try:
    while n < 40:
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(20)  # {marker}"])
        n += 1
except OSError:
    pass
assert n < 40, n
"""
    status, code, err = _run_rlimits(program, 5)
    _assert_no_process_with(marker)
    assert status == "finished", err
