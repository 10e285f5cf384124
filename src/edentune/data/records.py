"""Robust JSONL reading and the bookkeeping every data stage shares.

Each input line ends in exactly one bucket, so a stage can prove it lost nothing:

    lines = kept + repaired + quarantined + blank

- kept: written unchanged; repaired: written after a fix (BOM/CRLF stripped, content parts joined,
  secrets redacted); quarantined: not written, copied verbatim to the quarantine file with the
  reason; blank: empty or whitespace-only lines, skipped silently (nothing to quarantine) but
  counted so the sum still holds.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from edentune.errors import DataError
from edentune.io import write_jsonl_atomic

PathLike = str | os.PathLike
MAX_LINE_BYTES = 1_000_000
BOM = b"\xef\xbb\xbf"


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
            # The parser ran off the end (an open string can only end there): a cut-off line.
            truncated = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
            item.error = Rejected("truncated JSON" if truncated else "invalid JSON",
                                  detail=None if truncated else f"{e.msg} at column {e.colno}")
        else:
            if isinstance(obj, dict):
                item.record = obj
            else:
                item.error = Rejected("not a JSON object", detail=type(obj).__name__)
    return item


def read_lines(path: PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Item]:
    """Yield one Item per physical line: parsed record, blank, or `error` set with the reason."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}", hint="check the path") from None
    with fh:
        for n, line in enumerate(fh, 1):
            yield _parse(line[:-1] if line.endswith(b"\n") else line, f"{path}:{n}", max_line_bytes)


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
            if item.error is None:
                try:
                    item.record, fixes = transform(item.record)
                    item.repairs += fixes
                except Rejected as e:
                    item.error = e
            if item.error is not None:
                report.reject(item, item.error)
            else:
                items.append(item)
    return items


def write_outputs(report: Report, records: list[dict], write: PathLike | None = None,
                  quarantine: PathLike | None = None) -> None:
    """Write the kept records and the quarantine file (each atomically) when paths are given."""
    if write is not None:
        write_jsonl_atomic(write, records)
    if quarantine is not None:
        write_jsonl_atomic(quarantine, report.quarantine)

