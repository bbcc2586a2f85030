"""Run untrusted Python (a model's answer and its tests) isolated from the machine that scores it.

Two modes, chosen by ``mode=``, else the ``TOROUTER_SANDBOX`` environment variable, else
``namespaces``:

``namespaces``  the default. Linux user, mount, PID, network, IPC and UTS namespaces: the
                program runs as an unprivileged uid with no capabilities, sees a read-only
                root that holds only the Python installation and system libraries, a private
                tmpfs work directory and its own /proc, has no network, and dies with every
                process it started at the deadline. When the kernel or a container forbids
                namespaces the run fails with :class:`SandboxError` (fail closed).
``rlimits``     resource limits, an empty environment, uid 65534 when the scorer runs as
                root, a temp work directory and a kill of every descendant, but the host's
                world-readable files and network stay reachable. Only for a scorer that
                already runs inside a disposable container with nothing secret in it.

Both modes count a run as finished only when the harness reached the end of the program:
it then writes a per-run random token that the program never sees on any channel it is
given, so exiting early (``sys.exit(0)``, ``os._exit(0)``) is not a pass. SECURITY.md
states what is and is not guaranteed.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

MODES = ("namespaces", "rlimits")
DEFAULT_MODE = "namespaces"
MODE_ENV = "TOROUTER_SANDBOX"
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
# Time the launcher may take to build the sandbox on top of the program's own limit before
# the scorer kills it; the program's deadline is enforced inside the sandbox.
SETUP_GRACE_S = 5.0
_STDOUT_CAP = 4096
_STDERR_CAP = 64 * 1024

_GUIDANCE = (
    "The code sandbox needs Linux user, mount, PID and network namespaces (unprivileged user "
    "namespaces, or a scorer running as root). Inside a container, allow them (for Docker: "
    "--security-opt seccomp=unconfined --security-opt apparmor=unconfined), or, if the container "
    "itself is the isolation (no secrets, no network, disposable), opt into the weaker mode with "
    f"{MODE_ENV}=rlimits or --sandbox rlimits. See SECURITY.md, 'Code scorer sandbox'.")


class SandboxError(RuntimeError):
    """The sandbox could not be built, so nothing was run."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0    # wall clock of the program and everything it starts
    memory_mb: int = 1024      # address space of each process (RLIMIT_AS)
    processes: int = 16        # processes and threads the program may have at once (RLIMIT_NPROC)
    files: int = 64            # open file descriptors per process (RLIMIT_NOFILE)
    file_mb: int = 16          # largest file it may write (RLIMIT_FSIZE)
    scratch_mb: int = 64       # size of its tmpfs work directory (namespaces mode)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {value!r}")


@dataclass
class RunResult:
    status: str            # "finished" (ran to its end), "exited" (stopped early or failed), "timeout"
    exit_code: int | None  # the program's exit status; negative: killed by that signal
    stderr: str            # the last 64 KiB of what it printed (stdout and stderr both)

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def resolve_mode(mode: str | None = None) -> str:
    chosen = mode or os.environ.get(MODE_ENV) or DEFAULT_MODE
    if chosen not in MODES:
        source = "mode" if mode else MODE_ENV
        raise SandboxError(f"unknown sandbox {source} {chosen!r}; choose one of {', '.join(MODES)}")
    return chosen


def run_python(program: str, limits: Limits = Limits(), mode: str | None = None) -> RunResult:
    """Run ``program`` (Python source) in the sandbox and say how it ended."""
    mode = resolve_mode(mode)
    token = secrets.token_hex(16)
    header = {"mode": mode, "token": token, "parent": os.getpid(), "limits": asdict(limits)}
    request = json.dumps(header).encode() + b"\n" + program.encode("utf-8", "replace")
    status_r, status_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", _CHILD, str(status_w)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,), cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
    finally:
        os.close(status_w)
    try:
        try:
            assert proc.stdin is not None  # stdin=PIPE
            proc.stdin.write(request)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the launcher stopped early; its status says why
        deadline = time.monotonic() + limits.timeout_s + SETUP_GRACE_S
        out, err, status, killed = _collect(proc, status_r, deadline)
    finally:
        os.close(status_r)
        if proc.poll() is None:
            _kill(proc)
    return _result(mode, token, out, err, status, killed, proc.returncode)


def _kill(proc: subprocess.Popen) -> None:
    # The launcher's descendants die with it (PR_SET_PDEATHSIG) and, in namespaces mode, with
    # the PID namespace's init; its process group goes too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _collect(proc, status_r, deadline):
    """Read stdout (token), stderr (tail) and status until all close, never past ``deadline``."""
    out, err, status = bytearray(), bytearray(), bytearray()
    sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status}
    sel = selectors.DefaultSelector()
    for fd in sinks:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    killed = False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                if killed:
                    break  # something kept a pipe open past the kill: stop reading
                _kill(proc)
                killed = True
                deadline = time.monotonic() + 1.0
                continue
            for key, _ in sel.select(left):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                sink = sinks[key.fd]
                sink += chunk
                if key.fd == proc.stderr.fileno() and len(sink) > _STDERR_CAP:
                    del sink[:len(sink) - _STDERR_CAP]
                elif key.fd != proc.stderr.fileno() and len(sink) > _STDOUT_CAP:
                    del sink[_STDOUT_CAP:]
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    if not killed:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(proc)
            killed = True
    return bytes(out), bytes(err), bytes(status).decode("utf-8", "replace"), killed


def _result(mode, token, out, err, status, killed, launcher_rc) -> RunResult:
    stderr = err.decode("utf-8", "replace")
    lines = status.splitlines()
    errors = [line[6:] for line in lines if line.startswith("error ")]
    if errors:
        raise SandboxError(f"{mode} sandbox: {errors[0]}" + (f". {_GUIDANCE}" if mode == "namespaces" else ""))
    for line in lines:
        if line == "timeout":
            return RunResult("timeout", None, stderr)
        if line.startswith("exit "):
            code = os.waitstatus_to_exitcode(int(line[5:]))
            finished = code == 0 and out == token.encode()
            return RunResult("finished" if finished else "exited", code, stderr)
    if killed:
        return RunResult("timeout", None, stderr)
    raise SandboxError(f"{mode} sandbox: the launcher ended without a result (exit status {launcher_rc}): "
                       f"{stderr.strip()[-500:]}")
