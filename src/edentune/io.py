"""Safe output writes shared by every stage (outputs, checkpoints, exports, registries).

Three guarantees, one mechanism:
- a crash or kill at any moment leaves either the old file or the complete new one, never a
  half-written file: each output is written to a temporary sibling, fsynced, then `os.replace`d
  (atomic on POSIX and Windows when source and target are on the same filesystem);
- a command's outputs never destroy its inputs or each other (`check_outputs`), and a command with
  several outputs moves them all into place or none (`atomic_outputs`);
- only regular files are ever replaced (a device such as /dev/full, a fifo or a socket would
  otherwise become a plain file), only folders edentune wrote are ever replaced (`atomic_dir`
  with a marker), and what is created gets the user's umask, not mkstemp's private 0600/0700.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import EdentuneError

PathLike = str | os.PathLike
_UMASK_LOCK = threading.Lock()


# -- permissions -------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux >= 4.7 reports it in
    /proc/self/status); elsewhere set-and-restore under a lock, the only portable way."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _file_mode(target: Path) -> int:
    """A replaced file keeps its mode (a user who restricted it keeps that); a new one gets the umask's."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


# -- checks ------------------------------------------------------------------------------------
def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_target(path: Path) -> None:
    """`path` may be written as a regular file: absent or a regular file, in a folder (or a folder to be made)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None  # a parent is a file: reported below
    except OSError as e:
        raise EdentuneError(f"cannot write {path}: {e.strerror}", hint="choose another output path") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise EdentuneError(f"output {path} is a directory, but a file is written there",
                            hint="give a file path, e.g. inside that directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise EdentuneError(f"output {path} is not a regular file (a device, fifo or socket); refusing to replace it",
                            hint="give the path of a file to create or replace")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise EdentuneError(f"cannot write {path}: {parent} is a file, not a directory",
                                    hint="choose another output path")
            break


# Folders whose files belong to edentune, never to be written by a command's user-named output
# (`user_paths=True`): a cycle workspace (cycle.yaml + registry.sqlite; its managed parts below),
# an export folder (holds EXPORT_MARKER) and a PEFT adapter folder. Names kept here, not imported
# from the stages, because io sits below them all.
WORKSPACE_CONFIG, WORKSPACE_REGISTRY = "cycle.yaml", "registry.sqlite"
WORKSPACE_MANAGED = ("fixed", "replay", "rounds")  # subfolders; plus its cycle.yaml*, registry.sqlite*, .edentune-*
EXPORT_MARKER = ".edentune-export"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def managed_owner(path: PathLike, *, folder: bool = False) -> str | None:
    """What owns `path` (a file, or with `folder` a folder to be written) if it lies in a folder
    edentune manages, as words for a message; else None."""
    real = Path(os.path.realpath(path))
    parent = real.parent
    if (parent / EXPORT_MARKER).is_file():
        return f"the export folder {parent}"
    for adapter in ([parent, real] if folder else [parent]):
        if any((adapter / name).is_file() for name in ADAPTER_FILES):
            return f"the adapter folder {adapter}"
    for ws in real.parents:
        if (ws / WORKSPACE_CONFIG).is_file() and (ws / WORKSPACE_REGISTRY).is_file():
            rel = real.relative_to(ws).parts
            top = rel[0]
            if ((folder or len(rel) > 1) and top in WORKSPACE_MANAGED) or top.startswith((WORKSPACE_CONFIG, WORKSPACE_REGISTRY, ".edentune")):
                return f"the cycle workspace {ws} ({top})"
            return None
    return None


def check_outputs(inputs: Iterable[PathLike | None], outputs: Iterable[PathLike | None], *, user_paths: bool = False) -> None:
    """Refuse outputs that would destroy data: an output that is (by resolved path or by inode,
    so symlinks and hard links count) one of the inputs or another output, an existing directory
    where a file is written, an empty path, or a non-regular file. `None` entries (an option not
    given) are skipped. With `user_paths` (outputs a user named on the command line), also any
    file that belongs to a workspace, export or adapter folder (`managed_owner`): only the stage
    that made those folders writes in them."""
    outputs = list(outputs)
    for out in outputs:
        if out is not None and not str(out).strip():
            raise EdentuneError("an output path is empty", hint="give a file path")
    ins = [Path(p) for p in inputs if p is not None]
    in_real = {os.path.realpath(p): p for p in ins}
    in_ids = {i: p for p in ins if (i := _identity(p)) is not None}
    seen_real: dict[str, Path] = {}
    seen_ids: dict[tuple[int, int], Path] = {}
    for out in (Path(p) for p in outputs if p is not None):
        real, ident = os.path.realpath(out), _identity(out)
        clash = in_real.get(real) or (in_ids.get(ident) if ident else None)
        if clash is not None:
            raise EdentuneError(f"output {out} is the input {clash}: writing it would destroy the input",
                                hint="write to a new file; replace the input yourself once you have checked the result")
        other = seen_real.get(real) or (seen_ids.get(ident) if ident else None)
        if other is not None:
            raise EdentuneError(f"outputs {other} and {out} are the same file: one would overwrite the other",
                                hint="give each output its own path")
        _check_target(out)
        if user_paths and (owner := managed_owner(out)) is not None:
            raise EdentuneError(f"output {out} is inside {owner}, whose files edentune manages; writing it would damage them",
                                hint="write the output somewhere else, e.g. beside that folder")
        seen_real[real] = out
        if ident:
            seen_ids[ident] = out


# -- files -------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not supported on every platform (e.g. Windows).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Transaction:
    """Outputs of one command: each is written to a temporary sibling; `atomic_outputs` moves them
    all into place when the block succeeds and removes them all when it fails."""

    def __init__(self, inputs: Iterable[PathLike | None] = ()):
        self.inputs = [p for p in inputs if p is not None]
        self._temps: dict[Path, Path] = {}  # target -> temporary sibling, in write order

    @contextlib.contextmanager
    def open(self, path: PathLike, mode: str = "w", encoding: str | None = "utf-8",
             errors: str | None = None) -> Iterator[IO]:
        path = Path(path)
        check_outputs(self.inputs, [*self._temps, path])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise EdentuneError(f"cannot write {path}: {e.strerror}", hint="choose a writable output location") from None
        self._temps[path] = Path(tmp)
        os.chmod(tmp, _file_mode(path))
        binary = "b" in mode
        with os.fdopen(fd, mode, encoding=None if binary else encoding, errors=None if binary else errors,
                       newline=None if binary else "\n") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())

    def write_text(self, path: PathLike, text: str) -> None:
        with self.open(path) as fh:
            fh.write(text)

    # JSON writers: a lone surrogate (a file name with undecodable bytes, held by Python as
    # surrogate escapes) becomes the JSON escape "\udcXX", still valid JSON and valid UTF-8.
    def write_json(self, path: PathLike, obj: Any) -> None:
        with self.open(path, errors="backslashreplace") as fh:
            json.dump(obj, fh, ensure_ascii=False, indent=2)
            fh.write("\n")

    def write_jsonl(self, path: PathLike, records: Iterable[Any]) -> int:
        """One JSON object per line; returns the number of lines written."""
        n = 0
        with self.open(path, errors="backslashreplace") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False))
                fh.write("\n")
                n += 1
        return n

    def _commit(self) -> None:
        for target in self._temps:  # checked again: something may have appeared since the write began
            _check_target(target)
        # Keep a hard link to each old file until every rename succeeded, so a failure halfway can
        # put the old files back (all or none). Where links are unsupported that file has no undo.
        done: list[tuple[Path, bool, Path | None]] = []  # (target, existed before, hard link to the old file)
        try:
            for target, tmp in self._temps.items():
                existed, backup = target.exists(), None
                if existed:
                    backup = tmp.with_suffix(".old")
                    try:
                        os.link(target, backup)
                    except OSError:
                        backup = None
                try:
                    os.replace(tmp, target)
                except BaseException:
                    if backup is not None:
                        os.unlink(backup)
                    raise
                done.append((target, existed, backup))
        except BaseException:
            for target, existed, backup in done:
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, target)
                    elif not existed:
                        os.unlink(target)
            raise
        finally:
            for _, _, backup in done:
                if backup is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(backup)
        for parent in {t.parent for t in self._temps}:
            _fsync_dir(parent)

    def _abort(self) -> None:
        for tmp in self._temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_outputs(inputs: Iterable[PathLike | None] = (), outputs: Iterable[PathLike | None] = ()) -> Iterator[Transaction]:
    """Write several outputs of one command as a unit:

        with atomic_outputs(inputs=files, outputs=[out, report]) as txn:
            txn.write_jsonl(out, records)
            txn.write_json(report, summary)

    The declared outputs are checked (`check_outputs`) before anything is written; every file
    written through `txn` is checked too. All appear when the block ends, or none does.
    """
    inputs = list(inputs)
    check_outputs(inputs, outputs)
    txn = Transaction(inputs)
    try:
        yield txn
        txn._commit()
    except BaseException:
        txn._abort()
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to `path`; on clean exit it replaces `path` atomically."""
    with atomic_outputs(outputs=[path]) as txn, txn.open(path, mode, encoding) as fh:
        yield fh


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_outputs(outputs=[path]) as txn:
        txn.write_text(path, text)


def write_json_atomic(path: PathLike, obj: Any) -> None:
    with atomic_outputs(outputs=[path]) as txn:
        txn.write_json(path, obj)


def write_jsonl_atomic(path: PathLike, records: Iterable[Any]) -> int:
    """Write one JSON object per line; returns the number of lines written."""
    with atomic_outputs(outputs=[path]) as txn:
        return txn.write_jsonl(path, records)


# -- directories -------------------------------------------------------------------------------
def ensure_dir(path: PathLike) -> Path:
    """Create a folder (and its parents) if missing; an existing file there, or one that cannot be
    created, is an EdentuneError naming the path instead of a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise EdentuneError(f"{path} exists and is not a folder", hint="give a folder path, or move that file away") from None
    except OSError as e:
        raise EdentuneError(f"cannot create folder {path}: {e.strerror}", hint="choose a writable location") from None
    return path


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _marker_files(marker: Path) -> set[str] | None:
    """The files a previous output folder was written with (listed in its marker), or None for a
    marker of an older edentune, which lists nothing."""
    try:
        last = marker.read_text(encoding="utf-8").splitlines()[-1]
        listed = json.loads(last)["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError):
        return None
    return {str(f) for f in listed} if isinstance(listed, list) else None


def foreign_entries(folder: Path, marker: str) -> list[str]:
    """Files and folders in a previous output `folder` that its own write did not put there."""
    listed = _marker_files(folder / marker)
    if listed is None:
        return []
    parents = {str(Path(f).parent) for f in listed} | {str(p) for f in listed for p in Path(f).parents}
    out = []
    for entry in sorted(folder.rglob("*")):
        rel = str(entry.relative_to(folder))
        if rel == marker or rel in listed or (entry.is_dir() and rel in parents):
            continue
        if any(rel.startswith(o + os.sep) for o in out):
            continue  # inside a folder already named
        out.append(rel)
    return out


def check_output_dir(path: PathLike, *, marker: str | None = None, inputs: Iterable[PathLike | None] = (),
                     user_paths: bool = False) -> Path:
    """Refuse an output folder that would destroy data; returns its resolved path.

    Refused: an empty path, the current folder or one above it, an input folder, a folder inside
    an input or containing one, an existing non-folder, (with `marker`) a non-empty folder
    without the marker file, i.e. anything but an empty folder or a previous output of the same
    kind, and a previous output holding files it was not written with (named in the message).
    With `user_paths` (a folder named on the command line), also a folder inside a workspace's
    managed parts or an adapter folder (`managed_owner`).
    """
    if not str(path).strip():
        raise EdentuneError("the output folder path is empty", hint="give a folder path, e.g. -o export")
    real = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    if _is_within(cwd, real):
        raise EdentuneError(f"output folder {path} is the current folder or contains it; it would be replaced",
                            hint="give a new folder, e.g. -o export")
    for inp in (p for p in inputs if p is not None):
        inp_real = os.path.realpath(inp)
        if _is_within(inp_real, real) or _is_within(real, inp_real):
            raise EdentuneError(f"output folder {path} overlaps the input {inp} (same folder, inside it, or containing it)",
                                hint="write the output to a separate new folder")
    p = Path(real)
    if p.exists() and not p.is_dir():
        raise EdentuneError(f"output folder {path} exists and is not a folder", hint="give a new folder path")
    if marker is not None and p.is_dir() and any(p.iterdir()) and not (p / marker).is_file():
        raise EdentuneError(f"output folder {path} is not empty and was not written by edentune (no {marker}); "
                            "refusing to replace it",
                            hint="give a new or empty folder, or remove this one yourself if it holds nothing you need")
    if marker is not None and p.is_dir() and (p / marker).is_file() and (foreign := foreign_entries(p, marker)):
        raise EdentuneError(f"output folder {path} holds files its earlier write did not put there: "
                            f"{', '.join(foreign[:5])}{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}; "
                            "replacing the folder would delete them",
                            hint="move those files out, or give a new folder")
    if user_paths and (owner := managed_owner(p, folder=True)) is not None:
        raise EdentuneError(f"output folder {path} is inside {owner}, whose files edentune manages",
                            hint="give a folder outside it")
    return p


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, marker: str | None = None, inputs: Iterable[PathLike | None] = ()) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it into place when the block succeeds.

    Used for checkpoints and exports: a reader never sees a partly written directory. An existing
    directory at `path` is replaced (moved aside first, deleted after the rename). With `marker`,
    only an empty folder or one holding that marker file (a previous output) is replaced, and the
    new folder gets the marker; see `check_output_dir` for what else is refused.
    """
    path = check_output_dir(path, marker=marker, inputs=inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise EdentuneError(f"cannot create {path}: {e.strerror}", hint="choose a writable output location") from None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        if marker is not None:
            (tmp / marker).write_text("Written by edentune; the next run writing here replaces this folder.\n")
        yield tmp
        if marker is not None:  # what this write put there: the next one refuses to delete anything else
            written = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file() and f.name != marker)
            with open(tmp / marker, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"files": written}, ensure_ascii=False) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        aside = None
        if path.exists():
            # A fresh unique name: renaming onto an empty directory is allowed, and no existing
            # folder of the user's (say ".export.old") is ever removed.
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, aside)
        try:
            os.replace(tmp, path)
        except BaseException:
            if aside is not None:
                os.replace(aside, path)
            raise
        _fsync_dir(path.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
