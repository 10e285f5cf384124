"""Clean validated conversations: scrub secrets, enforce lengths, drop broken turns, language
mismatches, exact and near duplicates. Every removed record is quarantined with its reason.

Checks run in that order, so a duplicate is judged on redacted text and a record dropped for an
earlier reason never suppresses a later copy of itself. Duplicates compare the user/assistant/tool
turns only: a shared system prompt would otherwise make every short conversation look alike.
The first occurrence is kept. When scrubbing is on, quarantined lines are redacted too: clean
never writes a secret it found, anywhere.
"""

from __future__ import annotations

import hashlib
import unicodedata
import zlib
from collections.abc import Callable, Iterable

from datasketch import MinHash, MinHashLSH

from edentune.config import CleanConfig
from edentune.data.lang import detect
from edentune.data.records import MAX_LINE_BYTES, Item, PathLike, Rejected, Report, load, write_outputs
from edentune.data.scrub import scrub_record, scrub_text
from edentune.data.validate import validate_record
from edentune.io import check_outputs


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dedup_text(record: dict) -> str:
    return "\n".join(f"{m['role']}: {normalise(m.get('content') or '')}"
                     for m in record["messages"] if m["role"] != "system")


def dedup_key(record: dict) -> bytes:
    return hashlib.blake2b(dedup_text(record).encode(), digest_size=16).digest()


def apply_check(items: list[Item], report: Report, check: Callable[[Item], None]) -> list[Item]:
    """Items that pass `check`; the rest go to the report's quarantine with the Rejected reason."""
    kept = []
    for item in items:
        try:
            check(item)
        except Rejected as e:
            report.reject(item, e)
        else:
            kept.append(item)
    return kept


def redact_quarantine(report: Report) -> None:
    """Quarantined lines are kept verbatim except for secrets: no output repeats one that was found."""
    for q in report.quarantine:
        q["raw"] = scrub_text(q["raw"])[0]


def scrubber(report: Report, mode: str) -> Callable[[Item], None]:
    """A check that redacts secrets/personal data (or rejects the item when mode is 'drop')."""
    def check(item: Item) -> None:
        found = scrub_record(item.record)
        report.findings += [{"kind": k, "source": item.source, "message": i} for i, k in found]
        kinds = sorted({k for _, k in found})
        if kinds and mode == "drop":
            raise Rejected("contains secrets or personal data", detail=", ".join(kinds))
        item.repairs += [f"redacted {k}" for k in kinds]
    return check


def _lengths(min_chars: int, max_chars: int, max_turn_chars: int) -> Callable[[Item], None]:
    def check(item: Item) -> None:
        sizes = [len(m.get("content") or "") for m in item.record["messages"]]
        total = sum(n for m, n in zip(item.record["messages"], sizes) if m["role"] != "system")
        if total < min_chars:
            raise Rejected("too short", detail=f"{total} < {min_chars} chars")
        if total > max_chars:
            raise Rejected("too long", detail=f"{total} > {max_chars} chars")
        for i, n in enumerate(sizes):
            if n > max_turn_chars:
                raise Rejected("turn too long", at=i, detail=f"{n} > {max_turn_chars} chars")
    return check


def check_broken(item: Item) -> None:
    # U+FFFD marks text that was decoded wrongly somewhere upstream (mojibake).
    for i, m in enumerate(item.record["messages"]):
        if "\ufffd" in (m.get("content") or ""):
            raise Rejected("broken text", at=i, detail="U+FFFD replacement character")


def check_language(item: Item) -> None:
    """A Korean question answered in English (or the reverse) teaches the wrong habit."""
    msgs = item.record["messages"]
    a = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    u = max((i for i, m in enumerate(msgs[:a]) if m["role"] == "user"), default=None)
    if u is None:
        return
    asked, answered = detect(msgs[u]["content"]), detect(msgs[a].get("content") or "")
    if {asked, answered} == {"ko", "en"}:
        raise Rejected("language mismatch", at=a, detail=f"user {asked}, assistant {answered}")


def _exact_dups() -> Callable[[Item], None]:
    seen: dict[bytes, str] = {}

    def check(item: Item) -> None:
        first = seen.setdefault(dedup_key(item.record), item.source)
        if first != item.source:
            raise Rejected("exact duplicate", detail=f"of {first}")
    return check


def _near_dups(threshold: float, num_perm: int) -> Callable[[Item], None]:
    """MinHash over word 3-gram shingles with an LSH index; LSH candidates are confirmed by their
    estimated Jaccard similarity, so a band collision alone never drops a record."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    perms = MinHash(num_perm=num_perm, seed=1).permutations  # build once, not per record
    signatures: dict[str, object] = {}

    def check(item: Item) -> None:
        words = dedup_text(item.record).split()
        shingles = {" ".join(words[i:i + 3]).encode() for i in range(max(1, len(words) - 2))}
        m = MinHash(num_perm=num_perm, hashfunc=zlib.crc32, permutations=perms, scheme="affine32")
        m.update_batch(shingles)
        for other in lsh.query(m):
            similarity = float((signatures[other] == m.hashvalues).mean())
            if similarity >= threshold:
                raise Rejected("near duplicate", detail=f"of {other}, jaccard ~{similarity:.2f}")
        lsh.insert(item.source, m)
        signatures[item.source] = m.hashvalues
    return check


def clean(paths: Iterable[PathLike], write: PathLike | None = None, quarantine: PathLike | None = None,
          config: CleanConfig | None = None, *, report_path: PathLike | None = None, num_perm: int = 128,
          max_line_bytes: int = MAX_LINE_BYTES) -> tuple[list[dict], Report]:
    """Validate then clean JSONL files with the settings of `config` (default: CleanConfig()).
    Kept records go to `write`, removed lines to `quarantine`, the report as JSON to
    `report_path`: all or none of them, never over an input."""
    cfg = config or CleanConfig()
    paths = list(paths)
    check_outputs(paths, [write, quarantine, report_path])
    report = Report()
    items = load(paths, validate_record, report, max_line_bytes)
    checks = [_lengths(cfg.min_chars, cfg.max_chars, cfg.max_turn_chars), check_broken]
    if cfg.scrub != "off":
        checks.insert(0, scrubber(report, cfg.scrub))
    if cfg.language_mismatch:
        checks.append(check_language)
    checks.append(_exact_dups())
    if cfg.near_duplicate_threshold < 1.0:
        checks.append(_near_dups(cfg.near_duplicate_threshold, num_perm))
    for check in checks:
        items = apply_check(items, report, check)
    if cfg.scrub != "off":
        redact_quarantine(report)
    records = report.finish(items)
    write_outputs(paths, report, records, write, quarantine, report_path)
    return records, report
