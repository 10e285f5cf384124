"""User-facing errors.

Anything a user can cause (bad config, malformed file, missing model) raises `EdentuneError`.
The CLI prints its message without a traceback and exits with `exit_code`; programming errors
still raise normally so they are not hidden (the CLI's last-resort handler logs them to a file).
"""

from __future__ import annotations

import errno
import os


class EdentuneError(Exception):
    """A problem the user can fix. The message must say what is wrong and what to do."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:  # message plus the remedy, one place for formatting
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class ConfigError(EdentuneError):
    """The run configuration is invalid."""


class DataError(EdentuneError):
    """Input data cannot be used."""


# errno -> (what happened, what to do). Each is something about the user's files or machine,
# not a bug, so it is reported like any EdentuneError (exit code 2) instead of as a traceback.
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.EACCES: ("permission denied", "choose a path you may write to (or read from), or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you may write to, e.g. under your home folder"),
    errno.EROFS: ("read-only file system", "write the output to a writable folder"),
    errno.EISDIR: ("is a directory, but a file is needed there", "name a file path, not a folder"),
    errno.ENOTDIR: ("a part of this path is a file, but a folder is needed there",
                    "choose another path, or move the file that is in the way"),
    errno.EEXIST: ("already exists", "choose another path, or remove what is there if you no longer need it"),
    errno.ENOENT: ("no such file or directory", "check the path; outputs need a folder that can hold files"),
    errno.ENOSPC: ("no space left on device", "free disk space or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free disk space or write to another disk"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links", "check the symbolic links in this path"),
    errno.ENOTEMPTY: ("directory not empty", "choose a new folder, or empty it first"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n) or close other programs"),
}


def os_error(err: OSError) -> EdentuneError:
    """An `EdentuneError` for an OSError that reached the CLI: what failed, on which path, what to do.

    Errors without an errno (libraries raise bare `OSError("...")` for e.g. a missing model) keep
    their own message.
    """
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(paths)
    known = _OS_ERRORS.get(err.errno) if err.errno is not None else None
    if err.errno == errno.EEXIST and err.filename is not None and os.path.isfile(err.filename):
        # mkdir onto a file: the usual case of an output folder given as an existing file's path
        known = ("is a file, but a folder is needed there", "choose a new folder path, or move the file that is in the way")
    if known is not None:
        what, hint = known
        return EdentuneError(f"{where}: {what}" if where else f"{what} ({err.strerror or err})", hint=hint)
    if err.errno is not None and err.strerror:
        return EdentuneError(f"{where}: {err.strerror}" if where else err.strerror)
    return EdentuneError(str(err) or type(err).__name__)
