"""The sandbox's side outside the scorer: builds the isolation, runs the program, reports.

``sandbox.run_python`` starts this file as a script (``python -I -S -B _sandbox_child.py FD``)
with a minimal environment, sends the request on its stdin (a JSON header line, then the
program's bytes) and reads the outcome on the status pipe FD. It imports only the standard
library: it must not load the scorer's packages, and it runs before any isolation exists.

Processes, in ``namespaces`` mode::

    launcher (host namespaces; writes the uid/gid maps, removes the scratch mount point)
      └─ unshared (new user, mount, PID, network, IPC, UTS, cgroup namespaces; uid 1000 inside)
           └─ init (PID 1 of the new PID namespace: builds the root, enforces the deadline)
                └─ program (no capabilities, rlimits, empty environment: the harness)

When init exits, on time or at the deadline, the kernel kills every process left in the PID
namespace, so nothing the program started can outlive the run. Every process of the chain
dies with its parent (PR_SET_PDEATHSIG), so killing the launcher kills the whole run.

In ``rlimits`` mode the launcher forks the program directly, as uid 65534 when it runs as
root, makes itself a child subreaper and kills every descendant when the program ends.

Status lines: ``error <message>`` (the sandbox could not be built), ``exit <wait status>``
or ``timeout``.
"""

import json
import os
import resource  # here: after dropping to uid 65534 the module's file may be out of reach
import signal
import sys

# The uid and gid the program has inside its user namespace, and the host ids they map to
# when the launcher runs as root (uid 65534 is "nobody" on most systems).
INSIDE_ID = 1000
HOST_ID_FOR_ROOT = 65534
WORKDIR = "/sandbox"

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "loongarch64": 219, "ppc64le": 271, "ppc64": 271,
              "s390x": 280, "i686": 288, "i386": 288, "armv7l": 311, "armv8l": 311}
KEYCTL_JOIN_SESSION_KEYRING = 1
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217,
                  "i686": 217, "i386": 217, "armv7l": 218, "armv8l": 218, "loongarch64": 41}
# Directories the dynamic loader and Python's extension modules read shared libraries from.
SYSTEM_LIB_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")

# Runs in the program's process, after the sandbox is in place: reads the run's token from
# stdin, keeps the real stdout for the token alone (the program's prints go to stderr),
# installs an audit hook that names the refused call (a convenience: the isolation does not
# depend on it), runs program.py as __main__ and, only when it ran to its end, writes the
# token and exits.
HARNESS = r'''
import os, sys
def _read_token():
    token = b""
    while True:
        chunk = os.read(0, 256)
        if not chunk:
            return token
        token += chunk
_token = _read_token()
try:
    _null = os.open(os.devnull, os.O_RDONLY)
except OSError:
    _r, _w = os.pipe(); os.close(_w); _null = _r
os.dup2(_null, 0); os.close(_null)
_result = os.dup(1)
os.dup2(2, 1)
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "os.forkpty", "pty.", "ctypes.", "winreg.", "urllib.", "http.", "ftplib.",
            "smtplib.", "webbrowser.")
def _guard(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_guard)
del _guard, _read_token
def _run(token, result):
    # runpy.run_path would do the same with 30 ms of imports (pkgutil, typing) on every answer.
    import types
    main = types.ModuleType("__main__")
    main.__file__ = "program.py"
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv[0] = "program.py"
    try:
        with open("program.py", "rb") as f:
            code = compile(f.read(), "program.py", "exec")
        exec(code, main.__dict__)
    finally:
        sys.stdout.flush()
    sys.stderr.flush()
    os.write(result, token)
    os._exit(0)
_run(_token, _result)
'''


class SetupError(Exception):
    """The sandbox could not be built; the message says which step failed."""


class _Deadline(Exception):
    pass


_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return _libc


def _check(ret, what):
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


def _b(path):
    return path.encode() if isinstance(path, str) else path


def mount(source, target, fstype, flags, data=None):
    _check(libc().mount(_b(source) if source else None, _b(target), _b(fstype) if fstype else None, flags,
                        _b(data) if data else None), f"mount {source or fstype} on {target}")


def prctl(option, arg2=0):
    return libc().prctl(option, arg2, 0, 0, 0)


def report(status_fd, kind, text=""):
    line = f"{kind} {text}".strip().replace("\n", " ")[:3000] + "\n"
    try:
        os.write(status_fd, line.encode("utf-8", "replace"))
    except OSError:
        pass


def die_with_parent(expected_parent):
    """SIGKILL this process when its parent dies (set after the last credential change, which clears it)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died before the request took effect


def wait_with_deadline(main_pid, timeout_s):
    """Reap children until ``main_pid`` exits; its wait status, or None at the deadline."""
    def on_alarm(signum, frame):
        raise _Deadline

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    status = None
    try:
        while True:
            try:
                pid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == main_pid:
                status = st
                break
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        pass
    return status


def apply_limits(limits, extra_processes):
    mem = limits["memory_mb"] * 2**20
    cpu = max(1, int(limits["timeout_s"] + 0.999))
    nproc = limits["processes"] + extra_processes
    for res, value in ((resource.RLIMIT_AS, (mem, mem)), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                       (resource.RLIMIT_FSIZE, (limits["file_mb"] * 2**20,) * 2),
                       (resource.RLIMIT_NOFILE, (limits["files"],) * 2), (resource.RLIMIT_NPROC, (nproc, nproc)),
                       (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_MEMLOCK, (0, 0)),
                       (resource.RLIMIT_MSGQUEUE, (0, 0))):
        resource.setrlimit(res, value)


def drop_privileges():
    """No capability can come back: empty bounding and ambient sets, no_new_privs."""
    import ctypes

    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(64):
        if prctl(PR_CAPBSET_DROP, cap) != 0:
            if ctypes.get_errno() == 22:  # EINVAL: past the last capability this kernel knows
                break
            _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    _check(prctl(PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")


def leave_session_keyring():
    """A new, empty session keyring: keys the scorer's session holds must not be the program's."""
    import ctypes

    number = SYS_KEYCTL.get(os.uname().machine)
    if number is None:
        raise SetupError(f"no keyctl syscall number for architecture {os.uname().machine}")
    if libc().syscall(ctypes.c_long(number), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None) < 0:
        err = ctypes.get_errno()
        if err not in (38, 1):  # ENOSYS, EPERM: no keyrings here (a seccomp filter or a kernel without them)
            raise SetupError(f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(err)} (errno {err})")


def exec_harness(request, workdir, status_fd):
    """In the program's process: stdin carries the token, then the harness replaces this process."""
    leave_session_keyring()
    read_end, write_end = os.pipe()
    os.write(write_end, request["token"].encode())
    os.close(write_end)
    os.dup2(read_end, 0)
    os.close(read_end)
    os.chdir(workdir)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    interpreter = request["interpreter"]
    try:
        os.execve(interpreter, [interpreter, "-I", "-S", "-B", "-c", HARNESS], env)
    except OSError as exc:
        raise SetupError(f"cannot run the interpreter {interpreter} as uid {os.getuid()} (that uid must be "
                         f"able to read the Python installation and enter every directory above it): {exc}") from exc


def make_private_dir():
    """A new 0700 directory under the system's temp dir (tempfile costs this short-lived process 30 ms)."""
    error = None
    for base in ("/tmp", "/var/tmp", "/dev/shm"):
        path = os.path.join(base, "torouter-sandbox-" + os.urandom(8).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            error = exc
    raise SetupError(f"no temp directory to work in: {error}")


def remove_tree(path):
    """Delete the work directory without following the links the program may have left in it."""
    for _top, dirs, files, top_fd in os.fwalk(path, topdown=False):
        for name in files:
            try:
                os.unlink(name, dir_fd=top_fd)
            except OSError:
                pass
        for name in dirs:
            try:
                os.rmdir(name, dir_fd=top_fd)
            except NotADirectoryError:
                os.unlink(name, dir_fd=top_fd)  # a symlink to a directory
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


# --------------------------------------------------------------------------- namespaces


def _mount_flags(path):
    """The per-mount flags a read-only remount has to keep (the kernel locks them in a user namespace)."""
    f = os.statvfs(path).f_flag
    flags = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            flags |= ms
    return flags


def _remount_read_only(path):
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _mount_flags(path))


def _submounts(path):
    """Mount points strictly below ``path`` in this mount namespace."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = line.split()[4]
            for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(esc, ch)
            if point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return found


def plan_view():
    """What the new root shows, decided in the host namespace, where every path can be read.

    Read-only binds of the interpreter's installation, of the directories holding the shared
    libraries this interpreter has loaded and of the system library directories; their
    symlinks (merged /usr) are recreated as symlinks. Nothing else of the host is visible.
    """
    interpreter = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    dirs = {os.path.dirname(os.path.dirname(interpreter)), os.path.realpath(sys.base_prefix),
            os.path.realpath(sys.base_exec_prefix)}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/") and ".so" in parts[5]:
                    dirs.add(os.path.dirname(os.path.realpath(parts[5].strip())))
    except OSError:
        pass
    links, binds = {}, set()
    for path in SYSTEM_LIB_DIRS:
        if os.path.islink(path):
            links[path] = os.readlink(path)
            dirs.add(os.path.realpath(path))
        elif os.path.isdir(path):
            binds.add(path)
    binds |= {d for d in dirs if os.path.isdir(d) and d != "/"}
    # An ancestor's bind already shows a directory below it.
    binds = sorted(b for b in binds if not any(b != o and b.startswith(o.rstrip("/") + "/") for o in binds))
    files = [p for p in ("/etc/ld.so.cache",) if os.path.isfile(p)]
    return interpreter, binds, links, files


def build_root(root, request, binds, links, files, fds):
    """Fill the tmpfs at ``root`` with the view, then make it this mount namespace's root."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the host
    try:  # no nested user namespaces, the kernel's widest door for the program (this namespace's limit)
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    except OSError:
        pass
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=0755")
    for path in binds:
        target = root + path
        os.makedirs(target, exist_ok=True)
        mount(f"/proc/self/fd/{fds[path]}", target, None, MS_BIND | MS_REC)
        _remount_read_only(target)
        for sub in _submounts(target):
            _remount_read_only(sub)
    for path, dest in links.items():
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        if not os.path.lexists(root + path):
            os.symlink(dest, root + path)
    for path in files:
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        open(root + path, "w").close()
        mount(f"/proc/self/fd/{fds[path]}", root + path, None, MS_BIND)
        _remount_read_only(root + path)
    for fd in fds.values():
        os.close(fd)  # host directories must not stay reachable through a descriptor
    os.makedirs(root + "/dev")
    for name in DEVICES:
        node = f"{root}/dev/{name}"
        open(node, "w").close()
        try:
            mount(f"/dev/{name}", node, None, MS_BIND)
        except SetupError:
            os.unlink(node)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(dest, f"{root}/dev/{name}")
    os.makedirs(root + "/proc")
    try:  # this PID namespace's own /proc: the host's processes are not in it
        mount("proc", root + "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        os.rmdir(root + "/proc")  # a container that masks parts of its /proc forbids this: go without
    limits = request["limits"]
    os.makedirs(root + WORKDIR)
    mount("tmpfs", root + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={limits['scratch_mb']}m,nr_inodes=4096,mode=0700,uid={INSIDE_ID},gid={INSIDE_ID}")
    with open(root + WORKDIR + "/program.py", "wb") as f:
        f.write(request["program"])
    os.symlink(WORKDIR, root + "/tmp")
    os.makedirs(root + "/.oldroot")
    os.chdir(root)
    machine = os.uname().machine
    if hasattr(libc(), "pivot_root"):
        _check(libc().pivot_root(b".", b".oldroot"), "pivot_root")
    elif machine in SYS_PIVOT_ROOT:
        _check(libc().syscall(SYS_PIVOT_ROOT[machine], b".", b".oldroot"), "pivot_root")
    else:
        raise SetupError(f"no pivot_root for architecture {machine}")
    os.chdir("/")
    _check(libc().umount2(b"/.oldroot", MNT_DETACH), "umount the host root")
    os.rmdir("/.oldroot")
    _remount_read_only("/")
    libc().sethostname(b"sandbox", 7)


def run_namespaced(request, status_fd):
    if not sys.platform.startswith("linux"):
        raise SetupError(f"namespaces exist only on Linux, not on {sys.platform}")
    interpreter, binds, links, files = plan_view()
    request["interpreter"] = interpreter
    root = make_private_dir()  # only a mount point: never written to
    try:
        _run_namespaced(request, status_fd, root, binds, links, files)
    finally:
        os.rmdir(root)


def _run_namespaced(request, status_fd, root, binds, links, files):
    euid, egid = os.geteuid(), os.getegid()
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    launcher = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(to_child_w)
        os.close(to_parent_r)
        try:
            if euid == 0:
                try:
                    os.setgroups([])  # root's supplementary groups would travel into the namespace
                except PermissionError:
                    pass  # setgroups is denied in this (outer) user namespace: the groups are fixed
            prctl(PR_SET_DUMPABLE, 1)  # an unprivileged launcher may write the maps of a dumpable child only
            _check(libc().unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                                  | CLONE_NEWUTS | CLONE_NEWCGROUP),
                   "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)")
            os.write(to_parent_w, b"u")
            if os.read(to_child_r, 1) != b"m":
                os._exit(1)  # the launcher could not write the id maps (it reported why)
            # Opened in the new mount namespace (a bind needs a source there) and with the
            # launcher's own file ids still in place: the installation may sit under a directory
            # that the sandbox's uid cannot enter (pyenv in /root).
            fds = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in list(binds) + files}
            os.setresgid(INSIDE_ID, INSIDE_ID, INSIDE_ID)
            os.setresuid(INSIDE_ID, INSIDE_ID, INSIDE_ID)
            prctl(PR_SET_DUMPABLE, 0)
            die_with_parent(launcher)
            os.chdir("/")
            unshared = os.getpid()
            init = os.fork()
            if init == 0:
                _init(request, status_fd, root, binds, links, files, fds, unshared)
            for fd in fds.values():
                os.close(fd)
            _, st = os.waitpid(init, 0)
            os._exit(0)
        except SetupError as exc:
            report(status_fd, "error", str(exc))
        except BaseException as exc:  # noqa: BLE001 - whatever broke, the scorer must hear it
            report(status_fd, "error", f"sandbox setup failed: {exc!r}")
        os._exit(1)
    os.close(to_child_r)
    os.close(to_parent_w)
    try:
        if os.read(to_parent_r, 1) == b"u":
            host_uid, host_gid = (HOST_ID_FOR_ROOT, HOST_ID_FOR_ROOT) if euid == 0 else (euid, egid)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{INSIDE_ID} {host_uid} 1"),
                               ("gid_map", f"{INSIDE_ID} {host_gid} 1")):
                with open(f"/proc/{child}/{name}", "w") as f:
                    f.write(text)
            os.write(to_child_w, b"m")
    except OSError as exc:
        report(status_fd, "error", f"cannot map the sandbox's user ids: {exc}")
    os.close(to_child_w)
    os.waitpid(child, 0)


def _init(request, status_fd, root, binds, links, files, fds, unshared):
    """PID 1 of the sandbox: build the root, run the program, enforce the deadline."""
    try:
        die_with_parent(None)
        if os.getppid() not in (0, unshared):
            os._exit(1)
        build_root(root, request, binds, links, files, fds)
        program = os.fork()
        if program == 0:
            try:
                apply_limits(request["limits"], extra_processes=2)  # this init and its parent count too
                drop_privileges()
                exec_harness(request, WORKDIR, status_fd)
            except SetupError as exc:
                report(status_fd, "error", str(exc))
            except BaseException as exc:  # noqa: BLE001
                report(status_fd, "error", f"sandbox setup failed: {exc!r}")
            os._exit(127)
        status = wait_with_deadline(program, request["limits"]["timeout_s"])
        report(status_fd, "timeout" if status is None else f"exit {status}")
    except SetupError as exc:
        report(status_fd, "error", str(exc))
    except BaseException as exc:  # noqa: BLE001
        report(status_fd, "error", f"sandbox setup failed: {exc!r}")
    os._exit(0)  # PID 1 exits: the kernel kills whatever the program left behind


# --------------------------------------------------------------------------- rlimits only


def _children():
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def kill_descendants(rounds=1000):
    """Kill every descendant: as a child subreaper, the orphans of killed children become ours."""
    for _ in range(rounds):
        children = _children()
        if not children:
            try:
                while os.waitpid(-1, os.WNOHANG)[0] != 0:
                    pass
            except ChildProcessError:
                return
            if not _children():
                return
            continue
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def tasks_of(uid):
    """Processes and threads the host already runs as ``uid``: RLIMIT_NPROC counts them too here."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if int(fields.get("Uid", "-1 0").split()[0]) == uid:
                count += int(fields.get("Threads", "1"))
    return count


def run_rlimited(request, status_fd):
    request["interpreter"] = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    workdir = make_private_dir()
    try:
        with open(os.path.join(workdir, "program.py"), "wb") as f:
            f.write(request["program"])
        as_root = os.geteuid() == 0
        if as_root:
            for path in (workdir, os.path.join(workdir, "program.py")):
                os.chown(path, HOST_ID_FOR_ROOT, HOST_ID_FOR_ROOT)
        launcher = os.getpid()
        others = tasks_of(HOST_ID_FOR_ROOT if as_root else os.getuid())  # the scorer's own threads included
        program = os.fork()
        if program == 0:
            try:
                os.setsid()
                if as_root:
                    os.setgroups([])
                    os.setresgid(HOST_ID_FOR_ROOT, HOST_ID_FOR_ROOT, HOST_ID_FOR_ROOT)
                    os.setresuid(HOST_ID_FOR_ROOT, HOST_ID_FOR_ROOT, HOST_ID_FOR_ROOT)
                die_with_parent(launcher)
                apply_limits(request["limits"], extra_processes=others)
                _check(prctl(PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")
                exec_harness(request, workdir, status_fd)
            except SetupError as exc:
                report(status_fd, "error", str(exc))
            except BaseException as exc:  # noqa: BLE001
                report(status_fd, "error", f"sandbox setup failed: {exc!r}")
            os._exit(127)
        status = wait_with_deadline(program, request["limits"]["timeout_s"])
        kill_descendants()
        report(status_fd, "timeout" if status is None else f"exit {status}")
    finally:
        remove_tree(workdir)


# --------------------------------------------------------------------------- entry


def main():
    status_fd = int(sys.argv[1])
    os.set_inheritable(status_fd, False)  # the program's exec closes it
    data = sys.stdin.buffer.read()
    header, _, program = data.partition(b"\n")
    request = json.loads(header)
    request["program"] = program
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        die_with_parent(request["parent"])
        prctl(PR_SET_DUMPABLE, 0)
        if request["mode"] == "namespaces":
            run_namespaced(request, status_fd)
        elif request["mode"] == "rlimits":
            run_rlimited(request, status_fd)
        else:
            raise SetupError(f"unknown sandbox mode {request['mode']!r}")
    except SetupError as exc:
        report(status_fd, "error", str(exc))
    except Exception as exc:  # noqa: BLE001
        report(status_fd, "error", f"sandbox setup failed: {exc!r}")


if __name__ == "__main__":
    main()
