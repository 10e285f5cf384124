"""One writer per workspace: an exclusive lock held by every command that changes a workspace.

`cycle run`, `cycle rollback` and `cycle init --force` (and any later command that writes a
workspace) run inside `workspace_lock(DIR, "cycle run")`; a second one is refused at once with a
message naming the holder (PID, command, start time). `cycle status` only reads the registry
(read-only SQLite, WAL) and never takes the lock, so it works while a round runs.

The lock is `fcntl.flock` on DIR/.edentune-lock: the kernel drops it when the holder's last file
descriptor closes, so a process killed with SIGKILL (or a crash, or a reboot) never leaves a lock
behind, only the file, and the next command simply takes it over. What the file holds (the
holder's PID, command and start time, written after the lock is taken) is only for the message;
a holder recorded there whose PID is gone is reported as such. A clean exit removes the file. flock is advisory and per open file description:
the descriptor is opened close-on-exec (Python's default), so programs the holder starts do not
inherit the lock. Where the file system has no flock (some network mounts), locking is refused
with that reason rather than silently skipped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..errors import EdentuneError
from ..io import WORKSPACE_CONFIG

LOCK_NAME = ".edentune-lock"
F = TypeVar("F", bound=Callable)

try:  # POSIX; on Windows the cycle runs unlocked (documented in docs/security.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def read_holder(ws_dir: str | Path) -> dict | None:
    """What the lock file says about its (last) holder: pid, command, started; None when unreadable."""
    try:
        holder = json.loads((Path(ws_dir) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _holder_text(holder: dict | None) -> str:
    if not holder or not isinstance(holder.get("pid"), int):
        return "another edentune process (it has not written its name yet)"
    pid = holder["pid"]
    text = f"`{holder.get('command') or 'edentune'}` (PID {pid}, started {holder.get('started') or '?'})"
    if not _pid_alive(pid):  # the lock is held, so a process it started still has the file open
        text += f"; PID {pid} is gone, but a process it started still holds the lock"
    return text


def _open_locked(path: Path, ws_dir, command: str) -> int:
    """A descriptor of the lock file holding the flock; refused at once when another process holds it."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise EdentuneError(f"cannot open the workspace lock {path}: {err.strerror}",
                                hint="check the workspace folder's permissions; nothing was changed") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise EdentuneError(f"cannot lock the workspace {ws_dir} ({err.strerror}): the file system may not support locks",
                                    hint="keep the workspace on a local disk; nothing was changed") from None
            raise EdentuneError(f"the workspace {ws_dir} is in use by {_holder_text(read_holder(ws_dir))}; "
                                f"refusing to start `{command}` beside it",
                                hint="wait for it to finish (`edentune cycle status DIR` shows its progress), "
                                     "or stop that process; nothing was changed") from None
        # The holder before us removes the file when it lets go: locked an unlinked file, try the new one.
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise EdentuneError(f"cannot take the lock of the workspace {ws_dir}: it keeps changing hands", hint="try again")


@contextlib.contextmanager
def workspace_lock(ws_dir: str | Path, command: str) -> Iterator[None]:
    """Hold the workspace's exclusive lock for the block; refused at once if another process holds
    it. The lock file exists only while it is held (removed before the lock is let go), so a
    command leaves the workspace as it found it."""
    path = Path(ws_dir) / LOCK_NAME
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = _open_locked(path, ws_dir, command)
    try:
        holder = {"pid": os.getpid(), "command": command,
                  "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
        # Written in place (not atomically replaced): the lock belongs to this very inode.
        os.pwrite(fd, (json.dumps(holder, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still holding it: whoever opened this inode meanwhile sees it is gone and retries
        os.close(fd)  # releases the flock


def holds_workspace_lock(command: str) -> Callable[[F], F]:
    """Decorator for API functions whose first argument is a workspace folder: run them under
    `workspace_lock`. A folder that is not a workspace gets no lock file: the function reports that."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def locked(ws_dir, *args, **kwargs):
            folder = Path(ws_dir).expanduser()
            if not (folder / WORKSPACE_CONFIG).is_file():
                return fn(ws_dir, *args, **kwargs)
            with workspace_lock(folder, command):
                return fn(ws_dir, *args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap
