"""The replay buffer: earlier months' training data, kept by the tool, mixed into each new round.

Rebuilt (not appended to) from the new training records of every ACCEPTED run
(`rounds/<r>/<p>/data/new.jsonl`), so a refused or failed month never enters it and the buffer
is a pure function of the registry, the round folders, the fixed sets and the seed.

Selection, per category (the record's `category` field, else the topic rules) up to the quota:
records are ranked by a keyed hash of (seed, dedup key) and the lowest ranks are kept. Unlike
shuffling the concatenated pool, this ranking does not depend on file order or on how many rounds
came before: a record kept last month stays kept unless a newer record outranks it, so the buffer
changes no more than the new data requires, and the kept set is a uniform sample of all accepted
months. Records never entering the buffer: anything whose dedup key (data.clean.dedup_key) is in
the fixed validation or forgetting sets, or whose user turn is a question of the evaluation suite
(the test set must stay unseen), and repeats of a record already taken from an earlier round.

Each record carries its provenance as a top-level `replay_source: {"round", "persona"}` (the data
validator keeps extra keys, so the buffer stays valid ChatML for `data mix` and `train`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, Field

from ..data.clean import dedup_key, normalise
from ..data.topics import category
from ..data.validate import load_valid
from ..io import file_sha256, write_jsonl_atomic
from ..registry import Registry
from .workspace import Workspace

PROVENANCE_KEY = "replay_source"


class CategoryCount(BaseModel):
    quota: int
    available: int
    kept: int


class BufferReport(BaseModel):
    path: str
    sha256: str
    records: int
    seed: int
    categories: dict[str, CategoryCount]
    sources: dict[str, int] = Field(description="'round/persona' -> records kept from it")
    unassigned: dict[str, int] = Field(default_factory=dict, description="categories without a quota -> records left out")
    excluded_fixed: int = 0  # in the validation/forgetting sets or asked by the suite
    duplicates: int = 0  # already taken from an earlier round
    missing: list[str] = Field(default_factory=list, description="accepted runs whose new.jsonl is gone")


def _rank(seed: int, key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=16, key=str(seed).encode()).digest()


def _fixed_paths(ws: Workspace) -> list[Path]:
    """The frozen fixed sets, or (before the first round froze them) the files they will be made from."""
    out = []
    for frozen, sources in ((ws.validation_path, ws.validation_sources()), (ws.forgetting_path, ws.forgetting_sources())):
        out += [frozen] if frozen.is_file() else [p for p in sources if p.is_file()]
    return out


def _suite_questions(ws: Workspace) -> set[str]:
    from ..evaluate.suite import load_suite

    return {normalise(case.question) for case in load_suite(ws.suite_ref()).cases}


def _asks_suite(record: dict, questions: set[str]) -> bool:
    return any(m.get("role") == "user" and normalise(m.get("content") or "") in questions for m in record["messages"])


def accepted_sources(ws: Workspace, registry: Registry) -> list[tuple[str, str]]:
    """(round, persona) of every accepted run, oldest round first."""
    return [(run.round_id, run.persona) for run in registry.runs() if run.status == "accepted"]


def build_buffer(ws: Workspace, registry: Registry) -> tuple[list[dict], BufferReport]:
    """The buffer's records and report; writes nothing."""
    policy = ws.config.replay
    fixed = {dedup_key(r) for r in load_valid(_fixed_paths(ws))}
    questions = _suite_questions(ws)
    seen: set[bytes] = set()
    pools: dict[str, list[tuple[bytes, dict]]] = {}
    excluded = duplicates = 0
    missing = []
    for round_id, persona in accepted_sources(ws, registry):
        path = ws.new_data_path(round_id, persona)
        if not path.is_file():
            missing.append(f"{round_id}/{persona}")
            continue
        for rec in load_valid([path]):
            key = dedup_key(rec)
            if key in fixed or _asks_suite(rec, questions):
                excluded += 1
                continue
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rec = {k: v for k, v in rec.items() if k != PROVENANCE_KEY} | {PROVENANCE_KEY: {"round": round_id, "persona": persona}}
            pools.setdefault(category(rec), []).append((_rank(policy.seed, key), rec))
    records, cats = [], {}
    for cat, quota in policy.quotas.items():
        pool = sorted(pools.get(cat, []), key=lambda item: item[0])
        kept = [rec for _, rec in pool[:quota]]
        records += kept
        cats[cat] = CategoryCount(quota=quota, available=len(pool), kept=len(kept))
    sources = Counter(f"{r[PROVENANCE_KEY]['round']}/{r[PROVENANCE_KEY]['persona']}" for r in records)
    unassigned = {c: len(p) for c, p in sorted(pools.items()) if c not in policy.quotas}
    report = BufferReport(path=str(ws.buffer_path), sha256="", records=len(records), seed=policy.seed, categories=cats,
                          sources=dict(sorted(sources.items())), unassigned=unassigned, excluded_fixed=excluded,
                          duplicates=duplicates, missing=missing)
    return records, report


def update_buffer(ws: Workspace, registry: Registry) -> BufferReport:
    """Rebuild DIR/replay/buffer.jsonl atomically from the accepted rounds; returns what it holds."""
    records, report = build_buffer(ws, registry)
    write_jsonl_atomic(ws.buffer_path, records)
    report.sha256 = file_sha256(ws.buffer_path)
    return report
