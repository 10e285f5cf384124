"""The registry: one SQLite database with every round, step, run, event and live model.

A cycle workspace keeps one (`DIR/registry.sqlite`, written by `edentune cycle`); the standalone
`edentune deploy` records its deploys and rollbacks as events in one too (no rounds), so both
commands keep one kind of history.

Why SQLite (stdlib `sqlite3`) and not a JSON file: a round writes to it many times while `cycle
status` may read it from another process, and a killed process must never leave it half-written.
SQLite gives both with write-ahead logging (readers never block the writer, the writer never
blocks readers) and transactions: every public write method below is ONE transaction, so after a
crash the database holds either all of a call's rows or none of them.

Write transactions start with `BEGIN IMMEDIATE`: the write lock is taken up front, so two writers
wait for each other (`busy_timeout`) instead of failing with "database is locked" when a read
transaction tries to upgrade. JSON columns are strict JSON (no NaN/Infinity: a non-finite number
is stored as null, like comparison.json).

Schema changes go through `MIGRATIONS` (one entry per version, applied in order, recorded in the
`schema_version` table), so a workspace made by an older edentune opens in a newer one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdentuneError

REGISTRY_NAME = "registry.sqlite"  # its file name in a cycle workspace or a run's output_dir
BUSY_TIMEOUT_MS = 30_000
IMPORT_EVENT = "import"  # marks a history imported from elsewhere (import_events)
ROUND_STATUSES = ("running", "accepted", "refused", "failed")
RUN_FIELDS = ("status", "adapter_sha256", "metrics", "verdict", "reasons", "export_dir")
SHARED = "shared"  # the persona name of steps (and runs, in shared-adapter mode) common to all personas

MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE rounds (
        id          TEXT PRIMARY KEY,
        seq         INTEGER NOT NULL UNIQUE,
        created     TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('running', 'accepted', 'refused', 'failed')),
        finished    TEXT,
        config_json TEXT NOT NULL
    );
    CREATE TABLE runs (
        round_id       TEXT NOT NULL REFERENCES rounds(id),
        persona        TEXT NOT NULL,
        status         TEXT NOT NULL DEFAULT 'running',
        adapter_sha256 TEXT,
        metrics_json   TEXT NOT NULL DEFAULT '{}',
        verdict_json   TEXT,
        reasons_json   TEXT NOT NULL DEFAULT '[]',
        export_dir     TEXT,
        updated        TEXT NOT NULL,
        PRIMARY KEY (round_id, persona)
    );
    CREATE TABLE steps (
        round_id      TEXT NOT NULL REFERENCES rounds(id),
        persona       TEXT NOT NULL,
        step          TEXT NOT NULL,
        inputs_sha256 TEXT NOT NULL,
        outputs_json  TEXT NOT NULL,
        detail_json   TEXT NOT NULL,
        started       TEXT,
        finished      TEXT NOT NULL,
        PRIMARY KEY (round_id, persona, step)
    );
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        time        TEXT NOT NULL,
        kind        TEXT NOT NULL,
        round_id    TEXT REFERENCES rounds(id),
        persona     TEXT,
        model       TEXT,
        detail_json TEXT NOT NULL
    );
    CREATE TABLE live (
        persona  TEXT PRIMARY KEY,
        round_id TEXT NOT NULL REFERENCES rounds(id),
        model    TEXT NOT NULL,
        since    TEXT NOT NULL
    );
    """,
    # version 2: the human steps of `edentune review` (cycle/human.py). The review decision of each
    # cleaned conversation of a round (an edit is stored here, beside the original in clean.jsonl,
    # never instead of it) and the blind pairs of the live and the candidate model's answers: which
    # side the user saw each answer on is known only here, never sent to the browser.
    """
    CREATE TABLE review_decisions (
        round_id    TEXT NOT NULL REFERENCES rounds(id),
        conv_id     TEXT NOT NULL,
        decision    TEXT NOT NULL CHECK (decision IN ('pending', 'approved', 'rejected')),
        edited_json TEXT,
        updated     TEXT NOT NULL,
        PRIMARY KEY (round_id, conv_id)
    );
    CREATE TABLE blind_pairs (
        pair_id          TEXT PRIMARY KEY,
        round_id         TEXT NOT NULL REFERENCES rounds(id),
        unit             TEXT NOT NULL,
        seq              INTEGER NOT NULL,
        prompt_json      TEXT NOT NULL,
        first_side       TEXT NOT NULL CHECK (first_side IN ('live', 'candidate')),
        live_answer      TEXT NOT NULL,
        candidate_answer TEXT NOT NULL,
        detail_json      TEXT NOT NULL,
        pick             TEXT CHECK (pick IN ('a', 'b', 'tie', 'both_bad')),
        picked           TEXT,
        UNIQUE (round_id, unit, seq)
    );
    """,
]

REVIEW_DECISIONS = ("pending", "approved", "rejected")
BLIND_PICKS = ("a", "b", "tie", "both_bad")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _finite(obj: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN); containers are copied."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str:
    try:
        return json.dumps(_finite(obj), allow_nan=False, ensure_ascii=False, sort_keys=True)
    except TypeError as err:  # a Path or an object: a caller bug, named clearly
        raise TypeError(f"registry values must be JSON data: {err}") from None


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class StepRecord:
    inputs_sha256: str
    outputs: dict[str, str]  # output path -> sha256
    detail: dict
    started: str | None = None
    finished: str | None = None


@dataclass(frozen=True)
class StepRow:
    round_id: str
    persona: str
    step: str
    record: StepRecord


@dataclass(frozen=True)
class RoundRow:
    id: str
    seq: int
    created: str
    status: str
    finished: str | None
    config: dict


@dataclass(frozen=True)
class RunRow:
    round_id: str
    persona: str
    status: str
    adapter_sha256: str | None
    metrics: dict
    verdict: dict | None
    reasons: list
    export_dir: str | None
    updated: str


@dataclass(frozen=True)
class EventRow:
    id: int
    time: str
    kind: str
    round_id: str | None
    persona: str | None
    model: str | None
    detail: dict


@dataclass(frozen=True)
class ReviewRow:
    round_id: str
    conv_id: str
    decision: str
    edited: list | None  # the edited messages, when the user edited the conversation
    updated: str


@dataclass(frozen=True)
class BlindPair:
    pair_id: str  # opaque and random: all the browser ever gets
    round_id: str
    unit: str
    seq: int
    prompt: list  # the conversation up to the answer
    first_side: str  # live | candidate: the model shown as answer A
    live_answer: str
    candidate_answer: str
    detail: dict
    pick: str | None  # a | b | tie | both_bad, as the user saw them
    picked: str | None

    @property
    def winner(self) -> str | None:
        """live | candidate | tie | both_bad (None: not picked yet)."""
        if self.pick in ("a", "b"):
            second = "live" if self.first_side == "candidate" else "candidate"
            return self.first_side if self.pick == "a" else second
        return self.pick


@dataclass(frozen=True)
class LiveRow:
    persona: str
    round_id: str
    model: str
    since: str


# The tables of every schema version, read from the migrations so that a new version cannot leave
# its tables out (sqlite_sequence is SQLite's own, for AUTOINCREMENT).
OWN_TABLES = {"schema_version", "sqlite_sequence", *re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", "".join(MIGRATIONS))}


class Registry:
    """The registry of one workspace. Every write method is one transaction."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise EdentuneError(f"{self.path}: no registry here", hint="is this an edentune cycle workspace? create one with `edentune cycle init DIR`")
        try:
            if readonly:
                self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                             timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            else:
                if self.path.is_file() and self.path.stat().st_size:
                    self._check_before_writing()  # another program's database must not even be switched to WAL
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            if not readonly:
                self._conn.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit survives a power cut too, not only a killed process.
                self._conn.execute("PRAGMA synchronous = FULL")
                self._migrate()
            else:
                self._check_version(self._version())
        except sqlite3.DatabaseError as err:
            raise EdentuneError(f"{self.path}: cannot open the registry ({err})",
                                hint="the file is not an edentune registry, or it is damaged; restore it from a backup") from None

    # -- plumbing ----------------------------------------------------------------------------
    def _check_before_writing(self) -> None:
        """Read-only, before any write or pragma: the existing file is an edentune registry (of a
        schema version this edentune can use), else an error that leaves it byte for byte as it was."""
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            foreign = sorted(tables - OWN_TABLES)
            if tables and (foreign or "schema_version" not in tables):
                names = foreign or sorted(tables)
                shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
                raise EdentuneError(f"{self.path}: not an edentune registry (a database of another program, with the "
                                    f"table(s) {shown}); it was not changed",
                                    hint="give --registry a new file, a cycle workspace or an edentune registry.sqlite")
            if tables:
                self._check_version(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
        finally:
            conn.close()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise EdentuneError(f"{self.path}: the registry was opened read-only")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _version(self) -> int:
        exists = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
        if not exists:
            return 0
        return self._conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]

    def _check_version(self, version: int) -> None:
        if version > len(MIGRATIONS):
            raise EdentuneError(f"{self.path}: registry schema version {version} is newer than this edentune knows ({len(MIGRATIONS)})",
                                hint="upgrade edentune")
        if self.readonly and version < len(MIGRATIONS):
            raise EdentuneError(f"{self.path}: registry schema version {version} is older than this edentune's ({len(MIGRATIONS)})",
                                hint="run any writing `edentune cycle` command (or `edentune deploy`) once: it upgrades the registry")

    def _migrate(self) -> None:
        with self._tx() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)")
            version = self._version()
            self._check_version(version)
            for v, sql in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)", (v, now()))

    def _round_status(self, conn, round_id: str) -> str:
        row = conn.execute("SELECT status FROM rounds WHERE id = ?", (round_id,)).fetchone()
        if row is None:
            raise EdentuneError(f"no round {round_id!r} in {self.path}", hint="`edentune cycle status DIR` lists the rounds")
        return row[0]

    # -- rounds ------------------------------------------------------------------------------
    def begin_round(self, round_id: str, config: dict) -> int:
        """Start a round (or resume a running one, updating its config); returns its seq."""
        with self._tx() as conn:
            row = conn.execute("SELECT seq, status FROM rounds WHERE id = ?", (round_id,)).fetchone()
            if row is not None:
                if row["status"] != "running":
                    raise EdentuneError(f"round {round_id!r} is already finished ({row['status']})",
                                        hint="start a new round (the default id is this month's, with .2, .3 … for more) or pass --round NAME")
                conn.execute("UPDATE rounds SET config_json = ? WHERE id = ?", (_dumps(config), round_id))
                return row["seq"]
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM rounds").fetchone()[0]
            conn.execute("INSERT INTO rounds (id, seq, created, status, config_json) VALUES (?, ?, ?, 'running', ?)",
                         (round_id, seq, now(), _dumps(config)))
            return seq

    def finish_round(self, round_id: str, status: str) -> None:
        if status not in ROUND_STATUSES[1:]:
            raise ValueError(f"finish_round: status must be one of {ROUND_STATUSES[1:]}, got {status!r}")
        with self._tx() as conn:
            self._round_status(conn, round_id)
            conn.execute("UPDATE rounds SET status = ?, finished = ? WHERE id = ?", (status, now(), round_id))

    def next_round_id(self, base: str | None = None) -> str:
        """`base` (default: this month, YYYY-MM) if unused, else base.2, base.3, …"""
        base = base or dt.date.today().strftime("%Y-%m")
        taken = {r[0] for r in self._conn.execute("SELECT id FROM rounds")}
        if base not in taken:
            return base
        n = 2
        while f"{base}.{n}" in taken:
            n += 1
        return f"{base}.{n}"

    def round(self, round_id: str) -> RoundRow | None:
        row = self._conn.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
        return None if row is None else self._round_row(row)

    def rounds(self) -> list[RoundRow]:
        return [self._round_row(r) for r in self._conn.execute("SELECT * FROM rounds ORDER BY seq")]

    @staticmethod
    def _round_row(r: sqlite3.Row) -> RoundRow:
        return RoundRow(id=r["id"], seq=r["seq"], created=r["created"], status=r["status"], finished=r["finished"],
                        config=_loads(r["config_json"]))

    # -- steps -------------------------------------------------------------------------------
    def step(self, round_id: str, persona: str, step: str) -> StepRecord | None:
        row = self._conn.execute("SELECT * FROM steps WHERE round_id = ? AND persona = ? AND step = ?",
                                 (round_id, persona, step)).fetchone()
        return None if row is None else self._step_row(row).record

    def record_step(self, round_id: str, persona: str, step: str, *, inputs_sha256: str, outputs: dict[str, str],
                    detail: dict, started: str | None = None) -> None:
        """A finished step (replacing an earlier record of the same step)."""
        with self._tx() as conn:
            self._round_status(conn, round_id)
            # DELETE + INSERT (not UPDATE) so the step moves to the end of the recording order
            # that forget_steps relies on.
            conn.execute("DELETE FROM steps WHERE round_id = ? AND persona = ? AND step = ?", (round_id, persona, step))
            conn.execute("INSERT INTO steps (round_id, persona, step, inputs_sha256, outputs_json, detail_json, started, finished) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (round_id, persona, step, inputs_sha256, _dumps(dict(outputs)), _dumps(detail), started, now()))

    def forget_steps(self, round_id: str, persona: str, from_step: str) -> None:
        """Invalidate `from_step` and every step of (round, persona) recorded after it."""
        with self._tx() as conn:
            row = conn.execute("SELECT rowid FROM steps WHERE round_id = ? AND persona = ? AND step = ?",
                               (round_id, persona, from_step)).fetchone()
            if row is not None:
                conn.execute("DELETE FROM steps WHERE round_id = ? AND persona = ? AND rowid >= ?", (round_id, persona, row[0]))

    def list_steps(self, round_id: str | None = None, persona: str | None = None) -> list[StepRow]:
        """Recorded steps in the order they were recorded."""
        sql, args = "SELECT * FROM steps WHERE 1", []
        if round_id is not None:
            sql, args = sql + " AND round_id = ?", args + [round_id]
        if persona is not None:
            sql, args = sql + " AND persona = ?", args + [persona]
        return [self._step_row(r) for r in self._conn.execute(sql + " ORDER BY rowid", args)]

    @staticmethod
    def _step_row(r: sqlite3.Row) -> StepRow:
        return StepRow(r["round_id"], r["persona"], r["step"],
                       StepRecord(r["inputs_sha256"], _loads(r["outputs_json"]), _loads(r["detail_json"]), r["started"], r["finished"]))

    # -- runs (one per round and persona) ------------------------------------------------------
    def set_run(self, round_id: str, persona: str, **fields: Any) -> None:
        """Create or update a run. `metrics` is merged into the stored metrics; other fields replace."""
        unknown = set(fields) - set(RUN_FIELDS)
        if unknown:
            raise TypeError(f"set_run: unknown field(s) {sorted(unknown)}; allowed: {RUN_FIELDS}")
        with self._tx() as conn:
            self._round_status(conn, round_id)
            row = conn.execute("SELECT metrics_json FROM runs WHERE round_id = ? AND persona = ?", (round_id, persona)).fetchone()
            if row is None:
                conn.execute("INSERT INTO runs (round_id, persona, updated) VALUES (?, ?, ?)", (round_id, persona, now()))
            cols = {"updated": now()}
            for key, value in fields.items():
                if key == "metrics":
                    cols["metrics_json"] = _dumps({**(_loads(row["metrics_json"]) if row else {}), **(value or {})})
                elif key in ("verdict", "reasons"):
                    cols[f"{key}_json"] = _dumps(value if value is not None or key == "verdict" else [])
                elif key == "export_dir":
                    cols[key] = None if value is None else str(value)
                else:
                    cols[key] = value
            conn.execute(f"UPDATE runs SET {', '.join(f'{c} = ?' for c in cols)} WHERE round_id = ? AND persona = ?",
                         (*cols.values(), round_id, persona))

    def run(self, round_id: str, persona: str) -> RunRow | None:
        row = self._conn.execute("SELECT * FROM runs WHERE round_id = ? AND persona = ?", (round_id, persona)).fetchone()
        return None if row is None else self._run_row(row)

    def runs(self, round_id: str | None = None) -> list[RunRow]:
        sql = ("SELECT runs.* FROM runs JOIN rounds ON rounds.id = runs.round_id"
               + (" WHERE runs.round_id = ?" if round_id is not None else "") + " ORDER BY rounds.seq, runs.persona")
        return [self._run_row(r) for r in self._conn.execute(sql, () if round_id is None else (round_id,))]

    @staticmethod
    def _run_row(r: sqlite3.Row) -> RunRow:
        return RunRow(round_id=r["round_id"], persona=r["persona"], status=r["status"], adapter_sha256=r["adapter_sha256"],
                      metrics=_loads(r["metrics_json"]), verdict=_loads(r["verdict_json"]), reasons=_loads(r["reasons_json"]),
                      export_dir=r["export_dir"], updated=r["updated"])

    # -- events and the live model ---------------------------------------------------------------
    def record_event(self, kind: str, *, round_id: str | None = None, persona: str | None = None,
                     model: str | None = None, detail: dict | None = None) -> None:
        self.record_events([{"kind": kind, "round_id": round_id, "persona": persona, "model": model, "detail": detail}])

    def record_events(self, events: list[dict]) -> None:
        """Several events at once (dicts of record_event's keyword arguments plus `kind` and an
        optional `time`, default now), e.g. one per model of a deploy: all of them or, after a
        crash, none."""
        with self._tx() as conn:
            self._insert_events(conn, events)

    def import_events(self, events: list[dict], *, source: str, sha256: str) -> int | None:
        """Events recorded elsewhere (dicts as for record_events, with their own `time`) and an
        "import" event naming their source, in one transaction. A source is identified by the
        sha256 of its content: importing the same content again adds nothing and returns None;
        otherwise returns the number of events imported."""
        with self._tx() as conn:
            for row in conn.execute("SELECT detail_json FROM events WHERE kind = ?", (IMPORT_EVENT,)):
                if _loads(row[0]).get("sha256") == sha256:
                    return None
            self._insert_events(conn, events)
            self._insert_event(conn, IMPORT_EVENT, None, None, None, {"source": source, "sha256": sha256, "events": len(events)})
            return len(events)

    @classmethod
    def _insert_events(cls, conn, events: list[dict]) -> None:
        for e in events:
            cls._insert_event(conn, e["kind"], e.get("round_id"), e.get("persona"), e.get("model"), e.get("detail"), time=e.get("time"))

    @staticmethod
    def _insert_event(conn, kind, round_id, persona, model, detail, *, time: str | None = None) -> None:
        conn.execute("INSERT INTO events (time, kind, round_id, persona, model, detail_json) VALUES (?, ?, ?, ?, ?, ?)",
                     (time or now(), kind, round_id, persona, model, _dumps(detail or {})))

    def set_live(self, persona: str, round_id: str, model: str, *, event: str = "deploy", detail: dict | None = None) -> None:
        """Mark `round_id` live for `persona` and record the event, in one transaction."""
        with self._tx() as conn:
            self._round_status(conn, round_id)
            conn.execute("INSERT INTO live (persona, round_id, model, since) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(persona) DO UPDATE SET round_id = excluded.round_id, model = excluded.model, since = excluded.since",
                         (persona, round_id, model, now()))
            self._insert_event(conn, event, round_id, persona, model, detail)

    def live(self, persona: str) -> LiveRow | None:
        row = self._conn.execute("SELECT * FROM live WHERE persona = ?", (persona,)).fetchone()
        return None if row is None else LiveRow(row["persona"], row["round_id"], row["model"], row["since"])

    def live_rows(self) -> list[LiveRow]:
        return [LiveRow(r["persona"], r["round_id"], r["model"], r["since"])
                for r in self._conn.execute("SELECT * FROM live ORDER BY persona")]

    def events(self, round_id: str | None = None) -> list[EventRow]:
        sql = "SELECT * FROM events" + (" WHERE round_id = ?" if round_id is not None else "") + " ORDER BY id"
        return [EventRow(r["id"], r["time"], r["kind"], r["round_id"], r["persona"], r["model"], _loads(r["detail_json"]))
                for r in self._conn.execute(sql, () if round_id is None else (round_id,))]

    # -- human review (edentune review) ------------------------------------------------------------
    def set_review(self, round_id: str, conv_ids: list[str], *, decision: str | None = None,
                   edited: list | None = None, clear_edit: bool = False) -> None:
        """Record a decision (and/or an edit) for conversations of a round, in one transaction."""
        if decision is not None and decision not in REVIEW_DECISIONS:
            raise ValueError(f"set_review: decision must be one of {REVIEW_DECISIONS}, got {decision!r}")
        with self._tx() as conn:
            self._round_status(conn, round_id)
            for conv_id in conv_ids:
                row = conn.execute("SELECT decision, edited_json FROM review_decisions WHERE round_id = ? AND conv_id = ?",
                                   (round_id, conv_id)).fetchone()
                new_decision = decision or (row["decision"] if row else "pending")
                new_edit = None if clear_edit else (_dumps(edited) if edited is not None else (row["edited_json"] if row else None))
                conn.execute("INSERT INTO review_decisions (round_id, conv_id, decision, edited_json, updated) VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT(round_id, conv_id) DO UPDATE SET decision = excluded.decision, "
                             "edited_json = excluded.edited_json, updated = excluded.updated",
                             (round_id, conv_id, new_decision, new_edit, now()))

    def reviews(self, round_id: str) -> dict[str, ReviewRow]:
        return {r["conv_id"]: ReviewRow(r["round_id"], r["conv_id"], r["decision"], _loads(r["edited_json"]), r["updated"])
                for r in self._conn.execute("SELECT * FROM review_decisions WHERE round_id = ? ORDER BY conv_id", (round_id,))}

    def add_blind_pairs(self, round_id: str, unit: str, pairs: list[dict]) -> None:
        """Replace the round and unit's blind pairs (dicts of BlindPair's fields but pick/picked)."""
        with self._tx() as conn:
            self._round_status(conn, round_id)
            conn.execute("DELETE FROM blind_pairs WHERE round_id = ? AND unit = ?", (round_id, unit))
            for p in pairs:
                conn.execute("INSERT INTO blind_pairs (pair_id, round_id, unit, seq, prompt_json, first_side, live_answer, "
                             "candidate_answer, detail_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (p["pair_id"], round_id, unit, p["seq"], _dumps(p["prompt"]), p["first_side"], p["live_answer"],
                              p["candidate_answer"], _dumps(p.get("detail") or {})))

    def blind_pairs(self, round_id: str | None = None, unit: str | None = None) -> list[BlindPair]:
        sql, args = "SELECT blind_pairs.* FROM blind_pairs JOIN rounds ON rounds.id = blind_pairs.round_id WHERE 1", []
        if round_id is not None:
            sql, args = sql + " AND round_id = ?", args + [round_id]
        if unit is not None:
            sql, args = sql + " AND unit = ?", args + [unit]
        return [BlindPair(r["pair_id"], r["round_id"], r["unit"], r["seq"], _loads(r["prompt_json"]), r["first_side"],
                          r["live_answer"], r["candidate_answer"], _loads(r["detail_json"]), r["pick"], r["picked"])
                for r in self._conn.execute(sql + " ORDER BY rounds.seq, unit, seq", args)]

    def set_pick(self, pair_id: str, pick: str) -> bool:
        """Record the user's pick for a pair; False when there is no such pair."""
        if pick not in BLIND_PICKS:
            raise ValueError(f"set_pick: pick must be one of {BLIND_PICKS}, got {pick!r}")
        with self._tx() as conn:
            cur = conn.execute("UPDATE blind_pairs SET pick = ?, picked = ? WHERE pair_id = ?", (pick, now(), pair_id))
            return cur.rowcount == 1
