"""Deterministic train/validation split by content hash.

A record goes to validation when sha256 of the canonical JSON of its messages, read as a number
in [0, 1), is below the fraction. The decision depends on the record alone, so appending new data
never moves an old record between train and validation (no leakage across monthly cycles), and
identical conversations always land on the same side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from edentune.data.records import MAX_LINE_BYTES, PathLike
from edentune.data.validate import load_valid
from edentune.errors import DataError
from edentune.io import atomic_outputs, check_outputs


def bucket(record: dict) -> float:
    canonical = json.dumps(record["messages"], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") / 2**64


def split_records(records: Iterable[dict], val_fraction: float = 0.05) -> tuple[list[dict], list[dict]]:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction {val_fraction} is out of range", hint="use a value in [0, 1)")
    train, val = [], []
    for rec in records:
        (val if bucket(rec) < val_fraction else train).append(rec)
    return train, val


def split(paths: Iterable[PathLike], train_path: PathLike, val_path: PathLike, val_fraction: float = 0.05,
          max_line_bytes: int = MAX_LINE_BYTES) -> tuple[int, int]:
    """Split valid JSONL files into train and validation files (both or neither is written);
    returns their sizes."""
    paths = list(paths)
    check_outputs(paths, [train_path, val_path])
    train, val = split_records(load_valid(paths, max_line_bytes), val_fraction)
    with atomic_outputs(inputs=paths, outputs=[train_path, val_path]) as txn:
        txn.write_jsonl(train_path, train)
        txn.write_jsonl(val_path, val)
    return len(train), len(val)
