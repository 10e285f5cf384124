"""Robust JSONL reading and the bookkeeping every data stage shares.

Each input line ends in exactly one bucket, so a stage can prove it lost nothing:

    lines = kept + repaired + quarantined + blank

- kept: written unchanged; repaired: written after a fix (BOM/CRLF stripped, content parts joined,
  secrets redacted); quarantined: not written, copied verbatim to the quarantine file with the
  reason; blank: empty or whitespace-only lines, skipped silently (nothing to quarantine) but
  counted so the sum still holds.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from edentune.errors import DataError
from edentune.io import atomic_outputs

PathLike = str | os.PathLike
MAX_LINE_BYTES = 1_000_000
BOM = b"\xef\xbb\xbf"
# Deeper records are rejected: nothing in a chat record nests this deep, and Python's recursive
# JSON code (parser, encoder, validators downstream) fails with RecursionError near 1000 levels.
MAX_DEPTH = 64
# A \uD800-\uDFFF escape: json.loads turns a lone one into a str that cannot be written as UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Files that are not UTF-8 text, by their first bytes: one clear error instead of one "invalid
# UTF-8" per line. UTF-32 before UTF-16: its little-endian BOM starts with UTF-16's.
ENCODINGS = (
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"), (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"), (b"\xfe\xff", "UTF-16 (big-endian)"),
    (b"PK\x03\x04", "a zip archive"), (b"BZh", "bzip2-compressed"), (b"\xfd7zXZ\x00", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
)
GZIP_MAGIC = b"\x1f\x8b"


class Rejected(Exception):
    """A record cannot be used. `reason` is stable (reports count by it); `at` is a message index."""

    def __init__(self, reason: str, *, at: int | None = None, detail: str | None = None):
        super().__init__(reason)
        self.reason, self.at, self.detail = reason, at, detail

    def __str__(self) -> str:
        where = f"message {self.at}: " if self.at is not None else ""
        return f"{where}{self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Item:
    """One input line on its way through a stage; `raw` is kept so quarantine stays verbatim."""

    source: str  # "file:line"
    raw: str
    record: dict | None = None
    repairs: list[str] = field(default_factory=list)
    error: Rejected | None = None
    blank: bool = False


class Report(BaseModel):
    """Counts for one stage run; `balanced` is the invariant from the module docstring."""

    lines: int = 0
    kept: int = 0
    repaired: int = 0
    quarantined: int = 0
    blank: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)  # quarantine reason -> count
    repairs: dict[str, int] = Field(default_factory=dict)  # repair -> count
    problems: list[str] = Field(default_factory=list)  # "file:line: reason", input order
    findings: list[dict] = Field(default_factory=list)  # scrub findings, never the secret itself
    quarantine: list[dict] = Field(default_factory=list, exclude=True)

    @property
    def balanced(self) -> bool:
        return self.lines == self.kept + self.repaired + self.quarantined + self.blank

    def reject(self, item: Item, err: Rejected) -> None:
        self.quarantined += 1
        self.reasons[err.reason] = self.reasons.get(err.reason, 0) + 1
        self.problems.append(f"{item.source}: {err}")
        self.quarantine.append({"source": item.source, "reason": str(err), "raw": item.raw})

    def finish(self, items: list[Item]) -> list[dict]:
        """Count the survivors as kept or repaired and return their records."""
        fixes = Counter(r for it in items for r in it.repairs)
        for k, v in fixes.items():
            self.repairs[k] = self.repairs.get(k, 0) + v
        self.repaired = sum(1 for it in items if it.repairs)
        self.kept = len(items) - self.repaired
        assert self.balanced, self  # a stage that loses lines is a bug, never silently accepted
        return [it.record for it in items]

    def summary(self) -> str:
        return (f"{self.lines} lines = {self.kept} kept + {self.repaired} repaired + "
                f"{self.quarantined} quarantined + {self.blank} blank")


def _parse(raw: bytes, source: str, max_line_bytes: int) -> Item:
    repairs = []
    if raw.endswith(b"\r"):  # CRLF file: the \n is already gone
        raw, repairs = raw[:-1], ["stripped CRLF"]
    if raw.startswith(BOM):
        raw, repairs = raw[len(BOM):], repairs + ["stripped BOM"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # JSON cannot hold invalid bytes; the quarantined copy escapes them as \xNN.
        return Item(source, raw.decode("utf-8", "backslashreplace"),
                    error=Rejected("invalid UTF-8", detail=f"byte {e.start}"))
    item = Item(source, text, repairs=repairs)
    if not text.strip():
        item.blank = True
    elif len(raw) > max_line_bytes:
        item.error = Rejected("line too long", detail=f"{len(raw)} bytes > {max_line_bytes}")
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            # Some of the parser's messages end in "at" ("Invalid control character at"): not "at at column".
            # The parser ran off the end (an open string can only end there): a cut-off line.
            truncated = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
            item.error = Rejected("truncated JSON" if truncated else "invalid JSON",
                                  detail=None if truncated else f"{e.msg.removesuffix(' at')} at column {e.colno}")
        except RecursionError:
            item.error = Rejected("nested too deeply", detail=f"more than {MAX_DEPTH} levels")
        except ValueError as e:  # a number past Python's int-conversion limit (4300 digits)
            item.error = Rejected("invalid JSON", detail=str(e).split(";")[0])
        else:
            if not isinstance(obj, dict):
                item.error = Rejected("not a JSON object", detail=type(obj).__name__)
            else:
                item.error = _structure_problem(obj, check_strings=bool(_SURROGATE_ESCAPE.search(text)))
                item.record = obj if item.error is None else None
    return item


def _structure_problem(obj: dict, check_strings: bool) -> Rejected | None:
    """Depth beyond MAX_DEPTH, or (when the line has surrogate escapes) a lone surrogate, which
    no UTF-8 output (file, tokenizer) can hold. Iterative: the point is to avoid deep recursion."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return Rejected("nested too deeply", detail=f"more than {MAX_DEPTH} levels")
        children = list(node.items()) if isinstance(node, dict) else node
        for child in children:
            if isinstance(node, dict):
                key, child = child
                if check_strings and _lone_surrogate(key):
                    return Rejected("lone surrogate", detail=f"\\u escape in key {key!r} is half a character")
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif check_strings and isinstance(child, str) and _lone_surrogate(child):
                return Rejected("lone surrogate", detail="a \\uD800-\\uDFFF escape that is half a character")
    return None


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _open_text_lines(path: Path):
    """Binary line iterator over a UTF-8 JSONL file, or a gzip-compressed one (read transparently:
    logs are often shipped as .jsonl.gz). Other encodings and archives raise one DataError."""
    try:
        fh = open(path, "rb")
        head = fh.read(8)
        fh.seek(0)
    except OSError as e:  # includes a directory given as input
        raise DataError(f"cannot read {path}: {e.strerror}", hint="check the path") from None
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=fh, mode="rb"), fh
    for magic, name in ENCODINGS:
        if head.startswith(magic):
            fh.close()
            hint = (f"convert it to UTF-8, e.g. `iconv -f {name.split()[0]} -t UTF-8 IN > OUT`" if name.startswith("UTF")
                    else "extract the JSONL file first")
            raise DataError(f"{path} is {name}, not UTF-8 JSONL", hint=hint)
    if len(head) >= 4 and head[1:4:2] == b"\x00\x00" and head[0:4:2] != b"\x00\x00":
        fh.close()  # "{\0"\0": UTF-16 without a byte-order mark
        raise DataError(f"{path} looks like UTF-16 (little-endian, no byte-order mark), not UTF-8 JSONL",
                        hint="convert it to UTF-8, e.g. `iconv -f UTF-16LE -t UTF-8 IN > OUT`")
    if b"\x00" in head:  # JSON text never holds a raw NUL byte
        fh.close()
        raise DataError(f"{path} is binary data (NUL bytes), not UTF-8 JSONL", hint="give the JSONL file itself")
    return fh, fh


def read_lines(path: PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Item]:
    """Yield one Item per physical line: parsed record, blank, or `error` set with the reason."""
    path = Path(path)
    lines, raw_file = _open_text_lines(path)
    with raw_file, lines:
        try:
            for n, line in enumerate(lines, 1):
                yield _parse(line[:-1] if line.endswith(b"\n") else line, f"{path}:{n}", max_line_bytes)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})",
                            hint="re-create or re-download the file; `gzip -t FILE` checks it") from None
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}", hint="check the path") from None


Transform = Callable[[dict], tuple[dict, list[str]]]  # record -> (record, repairs); raises Rejected


def load(paths: Iterable[PathLike], transform: Transform, report: Report,
         max_line_bytes: int = MAX_LINE_BYTES) -> list[Item]:
    """Read every line of `paths`, apply `transform`; problems go to `report`, survivors return."""
    items = []
    for path in paths:
        for item in read_lines(path, max_line_bytes):
            report.lines += 1
            if item.blank:
                report.blank += 1
                continue
            items.append(item)
    return apply_transform(items, transform, report)


def apply_transform(items: Iterable[Item], transform: Transform, report: Report) -> list[Item]:
    """`transform` each readable item (its repairs counted); rejected and unreadable ones go to `report`."""
    kept = []
    for item in items:
        if item.error is None:
            try:
                item.record, fixes = transform(item.record)
                item.repairs += fixes
            except Rejected as e:
                item.error = e
        if item.error is not None:
            report.reject(item, item.error)
        else:
            kept.append(item)
    return kept


def write_outputs(paths: Iterable[PathLike], report: Report, records: list[dict], write: PathLike | None = None,
                  quarantine: PathLike | None = None, report_path: PathLike | None = None) -> None:
    """Write the kept records, the quarantine file and the JSON report (those given) as one unit:
    all appear or none does, and none may be one of the input `paths` or another output."""
    with atomic_outputs(inputs=paths, outputs=[write, quarantine, report_path]) as txn:
        if write is not None:
            txn.write_jsonl(write, records)
        if quarantine is not None:
            txn.write_jsonl(quarantine, report.quarantine)
        if report_path is not None:
            txn.write_json(report_path, report.model_dump())
