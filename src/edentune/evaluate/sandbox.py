"""Run model-written Python in a sandboxed subprocess.

Layers, each covering a gap of the others:

- resource limits (`setrlimit` in the child): CPU seconds, address space, file size, process count;
- a Python audit hook installed before the snippet runs (`python -I -B -c WRAPPER`): blocks
  sockets, process creation (fork/exec/spawn/system/subprocess), ctypes, signals to other
  processes and any file write/delete outside the temp working dir. This is what stops a fork
  bomb when we run as root, where the kernel does not enforce RLIMIT_NPROC;
- a pids cgroup (v1 or v2) with a small `pids.max` when we may create one;
- a network namespace (`unshare -n`) when the kernel lets us create one;
- a wall-clock timeout that kills the whole process group;
- isolated mode (`-I`: no PYTHON* variables, no user site, no script dir on sys.path) and an
  environment with nothing inherited, so tokens and keys in our environment are not visible.

Outcomes: `pass` (exit 0), `fail` (an exception or non-zero exit), `timeout` (wall or CPU time),
`blocked` (the audit hook refused an operation, or a memory / file-size limit was hit).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

BLOCKED_MARK = "EDENTUNE_SANDBOX_BLOCKED"

# Runs inside the child before the snippet; audit hooks cannot be removed once added.
_WRAPPER = r"""
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_DENY = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
         "socket.gethostbyname", "socket.gethostbyaddr", "os.fork", "os.forkpty", "os.system",
         "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.kill", "os.killpg",
         "signal.pthread_kill", "os.setuid", "os.chroot"}
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
_violations = []

class SandboxViolation(Exception):
    pass

def _inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor: its open() was checked
    p = os.path.realpath(os.fsdecode(path))
    return p == _ROOT or p.startswith(_ROOT + os.sep) or p == os.devnull

def _deny(reason):
    # Recorded as well as raised: a snippet's `except Exception` must not hide the attempt.
    _violations.append(reason)
    raise SandboxViolation(reason)

def _hook(event, args):
    if event in _DENY:
        _deny(event + " is not allowed")
    if event == "open" and args[0] is not None:
        mode, flags = args[1] or "r", args[2] or 0
        writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        if writes and not _inside(args[0]):
            _deny("writing %r outside the sandbox directory" % (args[0],))
    elif event in _PATH_EVENTS and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        _deny(event + " outside the sandbox directory")
    elif event == "import" and args[0] == "_posixsubprocess":  # its fork_exec raises no audit event
        _deny("process creation (subprocess) is not allowed")
    elif event == "import" and args[0] in ("ctypes", "_ctypes"):
        # An ImportError (not a violation): libraries such as numpy import ctypes optionally.
        raise ImportError(args[0] + " is disabled in the sandbox")

_source = open("snippet.py", encoding="utf-8").read()
sys.addaudithook(_hook)
try:
    exec(compile(_source, "snippet.py", "exec"), {"__name__": "__main__"})
finally:
    if _violations:
        sys.stderr.write("MARK: %s\n" % _violations[0])
        sys.stderr.flush()
        os._exit(3)
""".replace("MARK", BLOCKED_MARK)


@dataclass
class RunResult:
    status: str  # pass | fail | timeout | blocked
    error: str = ""
    stdout: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 10 << 20
    processes: int = 32  # added to what this user already runs (RLIMIT_NPROC counts all of them)


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """`unshare -n` (root) or `unshare -rn` (user namespace) if this kernel allows either."""
    if not shutil.which("unshare"):
        return ()
    for prefix in (("unshare", "-n"), ("unshare", "-rn")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=5).returncode == 0:
                return prefix
    return ()


def _pids_cgroup_root() -> Path | None:
    v1, v2 = Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")
    if (v1 / "tasks").exists():
        return v1
    ctl = v2 / "cgroup.subtree_control"
    if ctl.exists() and "pids" in ctl.read_text().split():
        return v2
    return None


@contextlib.contextmanager
def _pids_cgroup(limit: int):
    """A fresh cgroup with `pids.max`; yields None where we may not create one (most non-root hosts)."""
    root = _pids_cgroup_root()
    path = root / f"edentune-sandbox-{uuid.uuid4().hex[:12]}" if root else None
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(limit))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            path.rmdir()
        yield None
        return
    try:
        yield path
    finally:
        for _ in range(50):  # the group empties once the killed processes are reaped
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def _user_tasks() -> int:
    uid = os.geteuid()
    n = 0
    for p in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if p.stat().st_uid == uid:
                n += len(os.listdir(p / "task"))
    return n


def _child_setup(limits: Limits, nproc: int, cgroup: Path | None):
    def setup() -> None:  # runs in the forked child before exec: keep it to syscalls
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return setup


def _classify(rc: int, stderr: str, limits: Limits) -> RunResult:
    if rc == 0:
        return RunResult("pass")
    tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {rc}"
    if BLOCKED_MARK in stderr:
        return RunResult("blocked", tail.replace(BLOCKED_MARK + ": ", ""))
    if rc in (-signal.SIGXCPU, -signal.SIGKILL) or "SIGXCPU" in stderr:
        return RunResult("timeout", f"CPU time limit ({limits.cpu_seconds} s)")
    if rc == -signal.SIGXFSZ or "MemoryError" in tail or "File too large" in tail:
        return RunResult("blocked", f"resource limit: {tail}")
    return RunResult("fail", tail)


def run_python(code: str, limits: Limits = Limits()) -> RunResult:
    """Run `code` in a fresh temp dir under the sandbox; never raises for anything the code does."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edentune-sandbox-") as tmp, _pids_cgroup(limits.processes) as cgroup:
        Path(tmp, "snippet.py").write_text(code, encoding="utf-8")
        cmd = [*_netns_prefix(), sys.executable, "-I", "-B", "-c", _WRAPPER]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_child_setup(limits, _user_tasks() + limits.processes, cgroup))
        try:
            out, err = proc.communicate(timeout=limits.wall_seconds)
            result = _classify(proc.returncode, err.decode(errors="replace"), limits)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            result = RunResult("timeout", f"wall-clock limit ({limits.wall_seconds:g} s)")
    result.stdout = out.decode(errors="replace")[-2000:]
    result.seconds = round(time.monotonic() - start, 3)
    return result
