"""Garden of Eden V3's own database -> edentune chat records, ratings and personas.

The desktop app (github.com/wannahappyaroundme/Garden_of_Eden_V3) keeps everything in one plain
SQLite file (`<data dir>/garden-of-eden-v3/data.db`; the Electron prototype's `eden.db` has the
same chat tables). docs/eden-app.md maps its tables and columns to what this module writes.

What is read, and how:
- a consistent snapshot, taken with SQLite's online backup API from a read-only (`mode=ro`)
  connection into memory: the app may be running and writing, and the file is never written,
  copied to disk or locked for longer than the copy. A WAL-mode file whose `-wal` is absent is
  opened `immutable`, because a read-only connection would otherwise create empty `-wal`/`-shm`
  files next to it (the file's size and mtime are compared afterwards and the read is redone
  normally if the app wrote meanwhile); with a `-wal`, `-shm` is opened read-only
  (`readonly_shm`), so not even the read marks of the wal-index change;
- only the tables below are queried: `conversations`, `messages`, `feedback`, `persona_settings`,
  `onboarding_state`. Never `oauth_tokens`, `webhooks` or any settings table (they hold tokens);
- columns are introspected: only conversations and messages are required (most other tables
  changed between app versions without migrations).

What is written (each through the data stage's validation, scrubbing and quarantine):
- one ChatML record per assistant reply: the user message that precedes it and the reply, the
  user's raw text (the app sends every request single-turn, so no earlier turn is included), with
  `meta` (conversation id and title, message ids, timestamps). The layout the app prompts with is
  applied at training time, not here;
- ratings in the format `edentune data feedback` reads, each with `meta.attribution`: `exact`
  (`messages.satisfaction`, Electron-era databases) or `by_time` (a `feedback` row, which names
  only the conversation: it is attached to the latest assistant reply at or before its time);
- personas: the latest `persona_settings` row rendered by edentune's own wording, and the
  onboarding survey's `custom_prompt` when present.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sqlite3
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from edentune.data.clean import apply_check, check_broken, redact_quarantine, scrubber
from edentune.data.records import Item, Rejected, Report, apply_transform
from edentune.data.scrub import scrub_text
from edentune.data.validate import validate_record
from edentune.errors import DataError
from edentune.io import atomic_outputs, check_outputs

APP_FOLDER = "garden-of-eden-v3"
DB_NAME = "data.db"
SOURCE = "garden-of-eden-v3"
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 10.0
# A rating's time is taken by the front end, the reply's by the back end when the stream ended: a
# few seconds of slack attach a click on a reply whose row landed just after it.
RATING_SLACK_MS = 5_000
SCREEN_CONTEXT = "[Screen Context]"
# The app fills the input box with this block (application, optional language and workspace,
# then a description); the user may type the question after it. The block ends at the first
# blank line, or with the message.
SCREEN_BLOCK = re.compile(r"\[Screen Context\].*?(?:\n[ \t]*\n|\Z)", re.S)
ScreenMode = Literal["keep", "strip", "drop"]
ScrubMode = Literal["redact", "drop", "off"]

# The only tables ever queried (`_select` refuses any other): tokens live in the same file.
READ_TABLES = ("conversations", "messages", "feedback", "persona_settings", "onboarding_state")
REQUIRED = {"conversations": ("id",), "messages": ("id", "conversation_id", "role", "content", "timestamp")}

# persona_settings, 10-value layout (app v3.3+): column -> the app's default (0-100).
PERSONA_DEFAULTS = {"formality": 50, "verbosity": 50, "humor": 30, "emoji_usage": 20, "empathy": 60,
                    "creativity": 50, "proactiveness": 40, "technical_depth": 50, "code_examples": 70,
                    "questioning": 40}
# Columns only the older 17-value layout has (the app's own migration tests for these), and how
# that migration maps it: renamed columns, and the values the two new columns get.
OLD_LAYOUT_ONLY = ("enthusiasm", "directness", "patience", "encouragement", "formality_honorifics",
                   "reasoning_depth", "context_awareness")
OLD_RENAMED = {"proactiveness": "proactivity", "technical_depth": "technicality"}
OLD_FIXED = {"code_examples": 70, "questioning": 40}
# The older layout's own column defaults (the values the mapping reads), to spot an untouched row.
OLD_DEFAULTS = {"formality": 50, "humor": 40, "verbosity": 50, "emoji_usage": 30, "empathy": 70, "technicality": 50,
                "creativity": 50, "proactivity": 40}


# -- where the database is -----------------------------------------------------------------
def default_db_path(platform: str | None = None, env: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """The app's database on this OS: Rust's `dirs::data_dir()` joined with garden-of-eden-v3/data.db."""
    platform = platform or sys.platform
    env = os.environ if env is None else env
    home = home or Path.home()
    if platform == "darwin":
        base = home / "Library" / "Application Support"
    elif platform.startswith("win"):
        base = Path(env["APPDATA"]) if env.get("APPDATA") else home / "AppData" / "Roaming"
    else:
        base = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME", "").startswith("/") else home / ".local" / "share"
    return base / APP_FOLDER / DB_NAME


# -- a consistent snapshot -----------------------------------------------------------------
def _fingerprint(path: Path) -> tuple:
    out = []
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-journal")):
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def _backup(path: Path, wal_mode: bool, immutable: bool, timeout: float) -> sqlite3.Connection:
    uri = f"{path.as_uri()}?mode=ro"
    if immutable:
        uri += "&immutable=1"
    elif wal_mode and Path(f"{path}-shm").exists():
        # Readers of a WAL database write their read marks into -shm; with readonly_shm (unix
        # VFS) the index is read into private memory instead, so -shm keeps its bytes too.
        uri += "&readonly_shm=1"
    src = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    try:
        # Take the read lock first, within the busy timeout: Python's backup() retries a busy
        # source forever. Holding it, the copy below is one consistent state of the file.
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        mem = sqlite3.connect(":memory:")
        src.backup(mem)
        src.execute("COMMIT")
    finally:
        src.close()
    return mem


def open_snapshot(path: str | Path, *, timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """An in-memory copy of the database at `path`, never writing to it. Raises one DataError
    naming the path for a missing, locked, corrupt, encrypted or non-SQLite file."""
    path = Path(path).expanduser().resolve()
    hint = "give the app's data.db (or the Electron prototype's eden.db): `edentune data import-eden PATH`"
    if not path.is_file():
        raise DataError(f"{path}: no such database file", hint=hint + "; the app creates it at its first start")
    try:
        with open(path, "rb") as fh:
            header = fh.read(100)
    except OSError as e:
        raise DataError(f"{path}: cannot read the database: {e.strerror}", hint="check its permissions") from None
    if not header.startswith(SQLITE_MAGIC):
        raise DataError(f"{path}: not a SQLite database (encrypted, or another kind of file)",
                        hint=hint if header else "the file is empty; " + hint)
    # Header bytes 18-19 are 2 in WAL mode. Without a -wal file there is no un-checkpointed data.
    wal_mode = len(header) >= 20 and header[18] == 2
    immutable = wal_mode and not Path(f"{path}-wal").exists()
    try:
        before = _fingerprint(path)
        mem = _backup(path, wal_mode, immutable, timeout)
        if immutable and _fingerprint(path) != before:  # the app wrote during the copy
            mem.close()
            mem = _backup(path, wal_mode, False, timeout)
        problems = [r[0] for r in mem.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as e:
        name = getattr(e, "sqlite_errorname", "")
        if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            raise DataError(f"{path}: the database is locked by another program (waited {timeout:g}s)",
                            hint="try again in a moment, or quit Garden of Eden first") from None
        if name == "SQLITE_NOTADB":
            raise DataError(f"{path}: not a SQLite database (encrypted, or another kind of file)", hint=hint) from None
        if name == "SQLITE_CORRUPT":
            raise DataError(f"{path}: the database is damaged or truncated ({e})",
                            hint="restore it from a backup; `sqlite3 FILE .recover` can salvage a damaged one") from None
        raise DataError(f"{path}: cannot read the database ({e})", hint=hint) from None
    if problems != ["ok"]:
        mem.close()
        raise DataError(f"{path}: the database is damaged or truncated ({problems[0]})",
                        hint="restore it from a backup; `sqlite3 FILE .recover` can salvage a damaged one")
    return mem


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _select(conn: sqlite3.Connection, table: str, wanted: list[str], tail: str = "") -> list[dict]:
    """Rows of `table` with the `wanted` columns that exist (missing ones read as None)."""
    if table not in READ_TABLES:  # a guard for future edits: tokens live in this file too
        raise ValueError(f"{table} is not read by import-eden")
    have = set(_columns(conn, table))
    cols = [c for c in wanted if c in have]
    rows = conn.execute(f"SELECT rowid AS _rowid, {', '.join(cols)} FROM {table} {tail}").fetchall()
    return [{"_rowid": r[0], **{c: None for c in wanted}, **dict(zip(cols, r[1:]))} for r in rows]


@dataclass
class Tables:
    """What was read, column layout included (for the report)."""

    conversations: dict[str, dict]
    messages: list[dict]
    feedback: list[dict]
    persona: dict | None
    persona_layout: str | None
    persona_untouched: bool
    custom_prompt: str | None
    layout: dict[str, list[str]]


def read_tables(conn: sqlite3.Connection, path: Path) -> Tables:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    layout = {t: _columns(conn, t) for t in READ_TABLES if t in tables}
    for table, needed in REQUIRED.items():
        if table not in tables:
            raise DataError(f"{path}: no {table} table: not a Garden of Eden database",
                            hint="give the app's data.db (or the Electron prototype's eden.db)")
        missing = [c for c in needed if c not in layout[table]]
        if missing:
            raise DataError(f"{path}: table {table} lacks column(s) {', '.join(missing)}: an app version this import does not know",
                            hint="report the app version; docs/eden-app.md lists the tested ones")
    convs = {str(r["id"]): r for r in _select(conn, "conversations", ["id", "title", "mode", "created_at", "updated_at"])}
    msgs = _select(conn, "messages", ["id", "conversation_id", "role", "content", "timestamp", "satisfaction"],
                   "ORDER BY timestamp, rowid")
    feedback = (_select(conn, "feedback", ["id", "conversation_id", "satisfaction", "timestamp"], "ORDER BY timestamp, rowid")
                if "feedback" in tables else [])
    persona, persona_layout, untouched = None, None, False
    if "persona_settings" in tables:
        cols = layout["persona_settings"]
        old = any(c in cols for c in OLD_LAYOUT_ONLY)
        wanted = [*PERSONA_DEFAULTS, *OLD_RENAMED.values()]
        order = "ORDER BY id DESC" if "id" in cols else "ORDER BY rowid DESC"
        rows = _select(conn, "persona_settings", wanted, order + " LIMIT 1")
        if rows:
            persona, persona_layout = _persona_values(rows[0], old), "17-value" if old else "10-value"
            untouched = persona == (_persona_values(OLD_DEFAULTS, True) if old else PERSONA_DEFAULTS)
    custom = None
    if "onboarding_state" in tables and "custom_prompt" in layout["onboarding_state"]:
        rows = _select(conn, "onboarding_state", ["custom_prompt"], "ORDER BY rowid DESC LIMIT 1")
        text = rows[0]["custom_prompt"] if rows else None
        custom = text.strip() if isinstance(text, str) and text.strip() else None
    return Tables(convs, msgs, feedback, persona, persona_layout, untouched, custom, layout)


def _persona_values(row: dict, old: bool) -> dict[str, int]:
    """The 10 values the app works with; the older layout is mapped as the app's migration does."""
    out = {}
    for key, default in PERSONA_DEFAULTS.items():
        if old and key in OLD_FIXED:
            value = OLD_FIXED[key]
        else:
            value = row.get(OLD_RENAMED[key]) if old and key in OLD_RENAMED else row.get(key)
        try:
            out[key] = max(0, min(100, int(value)))
        except (TypeError, ValueError):
            out[key] = default
    return out


# -- personas ------------------------------------------------------------------------------
# edentune's own wording: one sentence per value and band (0-24, 25-49, 50-74, 75-100).
PERSONA_PHRASES: dict[str, tuple[str, str, str, str]] = {
    "formality": ("Talk casually, like a friend.", "Keep a relaxed but polite tone.",
                  "Keep a polite, professional tone.", "Be formal and courteous throughout."),
    "verbosity": ("Answer in a sentence or two.", "Keep answers short and to the point.",
                  "Explain with enough detail to be useful.", "Give thorough, complete explanations."),
    "humor": ("Stay serious.", "Allow a light touch of humor now and then.",
              "Use humor where it fits.", "Be playful and funny."),
    "emoji_usage": ("Do not use emoji.", "Use an emoji only rarely.", "Use emoji now and then.", "Use emoji freely."),
    "empathy": ("Stick to the facts.", "Acknowledge feelings briefly.",
                "Respond warmly to how the user feels.", "Put the user's feelings first and be very supportive."),
    "creativity": ("Prefer conventional, proven answers.", "Mostly conventional, with an occasional new idea.",
                   "Offer creative ideas and alternatives.", "Be inventive and think unconventionally."),
    "proactiveness": ("Answer only what was asked.", "Add a suggestion only when it clearly helps.",
                      "Suggest next steps and related ideas.", "Anticipate needs and propose what to do next."),
    "technical_depth": ("Avoid jargon; explain in plain words.", "Use simple terms, with a little technical detail.",
                        "Go into technical detail where useful.", "Be precise and deeply technical."),
    "code_examples": ("Describe solutions in words rather than code.", "Show code only when asked.",
                      "Include short code examples when they help.", "Illustrate with working code examples."),
    "questioning": ("Do not ask follow-up questions.", "Ask a question only when the request is unclear.",
                    "Ask clarifying questions when useful.", "Ask questions to understand the user's goal."),
}
ASSISTANT_NAME = "Adam"


def render_persona(values: Mapping[str, int]) -> str:
    """A system prompt from the app's 10 persona values (0-100), in edentune's own words."""
    lines = [f"You are {ASSISTANT_NAME}, the user's personal assistant in Garden of Eden."]
    for key, phrases in PERSONA_PHRASES.items():
        lines.append(phrases[min(3, int(values.get(key, PERSONA_DEFAULTS[key])) // 25)])
    return " ".join(lines)


def personas_from(tables: Tables, scrub: bool) -> tuple[list[dict], list[str]]:
    """edentune personas (cycle.yaml `personas:` entries) and the warnings about them."""
    personas, warnings = [], []
    if tables.persona is not None:
        personas.append({"name": "settings", "system_prompt": render_persona(tables.persona)})
        if tables.persona_untouched:
            warnings.append("persona_settings holds the app's untouched defaults: the 'settings' persona says nothing "
                            "about this user (change the persona in the app, or use the onboarding one)")
    if tables.custom_prompt:
        personas.append({"name": "onboarding",
                         "system_prompt": scrub_text(tables.custom_prompt)[0] if scrub else tables.custom_prompt})
    if not personas:
        warnings.append("no persona_settings row and no onboarding custom_prompt: no persona written")
    return personas, warnings


# -- chat records --------------------------------------------------------------------------
@dataclass
class Pair:
    user: dict | None  # the messages row
    reply: dict
    conversation: dict | None


def _role(m: dict) -> str:
    return m["role"] if m["role"] in ("user", "assistant", "system") else "other"


def _pairs(tables: Tables) -> tuple[list[Pair], list[dict]]:
    """Each assistant reply with the latest user message before it in its conversation, and the
    user messages no reply followed (orphans: the app stores the question before asking Ollama)."""
    by_conv: dict[str, list[dict]] = {}
    for m in tables.messages:
        by_conv.setdefault(str(m["conversation_id"]), []).append(m)
    pairs, orphans = [], []
    for conv_id, msgs in by_conv.items():
        question, answered = None, False
        for m in msgs:  # already in (timestamp, rowid) order
            if m["role"] == "user":
                if question is not None and not answered:
                    orphans.append(question)
                question, answered = m, False
            elif m["role"] == "assistant":
                pairs.append(Pair(question, m, tables.conversations.get(conv_id)))
                answered = question is not None or answered
        if question is not None and not answered:
            orphans.append(question)
    return pairs, orphans


def _ms_iso(ms: object) -> str | None:
    try:
        return dt.datetime.fromtimestamp(int(ms) / 1000, dt.timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _meta(pair: Pair) -> dict:
    conv = pair.conversation or {}
    user = pair.user or {}
    return {"source": SOURCE, "conversation_id": str(pair.reply["conversation_id"]), "title": conv.get("title"),
            "mode": conv.get("mode"), "user_message_id": user.get("id"), "assistant_message_id": pair.reply["id"],
            "user_timestamp": user.get("timestamp"), "assistant_timestamp": pair.reply["timestamp"],
            "time": _ms_iso(pair.reply["timestamp"])}


def _screen(text: str, mode: ScreenMode) -> tuple[str, int]:
    blocks = len(SCREEN_BLOCK.findall(text)) if SCREEN_CONTEXT in text else 0
    if blocks and mode == "strip":
        text = SCREEN_BLOCK.sub("", text).strip()
    return text, blocks


def _to_item(pair: Pair, db: Path, screen: ScreenMode, counts: Counter) -> Item:
    meta = _meta(pair)
    user_text = pair.user["content"] if pair.user else None
    blocks = 0
    if isinstance(user_text, str):
        user_text, blocks = _screen(user_text, screen)
    counts["screen_context_blocks"] += blocks
    record = {"messages": [{"role": "user", "content": user_text}, {"role": "assistant", "content": pair.reply["content"]}],
              "meta": {**meta, "screen_context": blocks > 0}}
    item = Item(f"{db}:{meta['conversation_id']}/{meta['assistant_message_id']}",
                json.dumps(record, ensure_ascii=False, default=str), record=record)
    if pair.user is None:
        item.error = Rejected("reply without a user message", detail="no user message before it in its conversation")
    elif blocks and screen == "drop":
        item.error = Rejected("screen context (--screen-context drop)")
    return item


def _process(items: list[Item], report: Report, scrub: ScrubMode) -> list[Item]:
    """The data stage's checks, in `clean`'s order: validation, scrubbing, broken text."""
    report.lines += len(items)
    ok = apply_transform(items, validate_record, report)
    if scrub != "off":
        ok = apply_check(ok, report, scrubber(report, scrub))
        for item in ok:  # the title is usually the first message's start: same data, same care
            if isinstance(item.record["meta"].get("title"), str):
                item.record["meta"]["title"] = scrub_text(item.record["meta"]["title"])[0]
    ok = apply_check(ok, report, check_broken)
    if scrub != "off":
        redact_quarantine(report)
    return ok


# -- ratings -------------------------------------------------------------------------------
def _label(value: object) -> bool | None:
    """messages.satisfaction ('positive'/'negative') or feedback.satisfaction (1.0 up, 0.0 down, 0.5 neutral)."""
    if isinstance(value, str):
        v = value.strip().lower()
        return True if v == "positive" else False if v == "negative" else None
    if isinstance(value, (int, float)):
        return True if value > 0.5 else False if value < 0.5 else None
    return None


def _ratings(pairs: list[Pair], feedback: list[dict], conversations: dict, since_ms: int | None,
             dropped: Counter) -> dict[str, tuple[bool, str, dict]]:
    """assistant message id -> (label, attribution, provenance). Exact labels first; a feedback
    row is attached to the latest reply at or before its time (+ slack); the latest click wins."""
    out: dict[str, tuple[bool, str, dict]] = {}
    for p in pairs:
        label = _label(p.reply.get("satisfaction"))
        if label is not None and (since_ms is None or int(p.reply["timestamp"]) > since_ms):
            out[str(p.reply["id"])] = (label, "exact", {"column": "messages.satisfaction"})
    replies: dict[str, list[Pair]] = {}
    for p in pairs:
        replies.setdefault(str(p.reply["conversation_id"]), []).append(p)
    clicks: dict[str, dict] = {}
    for row in feedback:  # in (timestamp, rowid) order: a later click replaces an earlier one
        if since_ms is not None and _int(row["timestamp"]) <= since_ms:
            continue
        conv = str(row["conversation_id"])
        if conv == "unknown":
            dropped["conversation 'unknown'"] += 1
            continue
        if conv not in conversations:
            dropped["conversation not in the database"] += 1
            continue
        t = _int(row["timestamp"])
        # The slack admits a reply stored just after the click (still streaming when rated), but
        # never one whose question came after the click: that answer was not on screen yet.
        rated = [p.reply for p in replies.get(conv, []) if _int(p.reply["timestamp"]) <= t + RATING_SLACK_MS
                 and (p.user is None or _int(p.user["timestamp"]) <= t)]
        if not rated:
            dropped["no reply at or before the rating"] += 1
            continue
        reply_id = str(rated[-1]["id"])
        if reply_id in clicks:
            dropped["superseded by a later click"] += 1
        clicks[reply_id] = row
    for reply_id, row in clicks.items():
        label = _label(row["satisfaction"])
        if label is None:
            dropped["neutral or unreadable satisfaction"] += 1
        elif reply_id in out:
            dropped["reply already has an exact rating"] += 1
        else:
            out[reply_id] = (label, "by_time", {"feedback_id": row["id"], "feedback_time": _ms_iso(row["timestamp"]),
                                                "slack_ms": RATING_SLACK_MS})
    return out


def _int(value: object) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


# -- the import ----------------------------------------------------------------------------
@dataclass
class EdenImport:
    """What `import_eden` read and wrote; `counts` add up as documented in `balance`."""

    db: Path
    counts: dict[str, int]
    report: Report
    ratings: dict = field(default_factory=dict)
    personas: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    watermark_ms: int | None = None  # newest message timestamp in the snapshot
    since_ms: int | None = None
    layout: dict[str, list[str]] = field(default_factory=dict)
    persona_layout: str | None = None

    def to_json(self) -> dict:
        return {"database": str(self.db), "since_ms": self.since_ms, "since": _ms_iso(self.since_ms),
                "watermark_ms": self.watermark_ms, "watermark": _ms_iso(self.watermark_ms), "counts": self.counts,
                "records": self.report.model_dump(), "ratings": self.ratings, "personas": [p["name"] for p in self.personas],
                "persona_layout": self.persona_layout, "tables_read": self.layout, "warnings": self.warnings}


def parse_since(text: str | None) -> int | None:
    """--since: an ISO date or date-time (local time unless it names a zone) -> epoch ms."""
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise DataError(f"--since {text!r} is not a date", hint="write e.g. 2026-01-01 or 2026-01-01T09:30") from None
    if when.tzinfo is None:
        when = when.astimezone()  # naive: the user's local time
    return int(when.timestamp() * 1000)


def import_eden(db: str | Path | None = None, out: str | Path | None = None, *, feedback: str | Path | None = None,
                report_path: str | Path | None = None, personas_path: str | Path | None = None,
                quarantine: str | Path | None = None, since_ms: int | None = None, screen_context: ScreenMode = "keep",
                scrub: ScrubMode = "redact", timeout: float = BUSY_TIMEOUT_S) -> EdenImport:
    """Read the app's database (default: its path on this OS) and write the outputs given, all
    or none of them. Raises DataError (naming the path) when the database cannot be read."""
    if screen_context not in ("keep", "strip", "drop"):
        raise DataError(f"--screen-context {screen_context!r}: expected keep, strip or drop")
    if scrub not in ("redact", "drop", "off"):
        raise DataError(f"--scrub {scrub!r}: expected redact, drop or off")
    path = Path(db).expanduser().resolve() if db is not None else default_db_path()
    outputs = [out, feedback, report_path, personas_path, quarantine]
    db_files = [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")]
    check_outputs(db_files, outputs)
    conn = open_snapshot(path, timeout=timeout)
    try:
        tables = read_tables(conn, path)
    finally:
        conn.close()

    pairs, orphans = _pairs(tables)
    recent = (lambda ts: True) if since_ms is None else (lambda ts: _int(ts) > since_ms)
    # The window is cut by turn: a reply after --since brings its question along (asked just
    # before the cut), an orphan and a system row count by their own time.
    window = [p for p in pairs if recent(p.reply["timestamp"])]
    window_orphans = [m for m in orphans if recent(m["timestamp"])]
    answered = list({id(p.user): p.user for p in window if p.user is not None}.values())
    window_msgs = ([p.reply for p in window] + answered + window_orphans
                   + [m for m in tables.messages if _role(m) in ("system", "other") and recent(m["timestamp"])])
    counts: Counter = Counter()
    report = Report()
    items = [_to_item(p, path, screen_context, counts) for p in window]
    kept = _process(items, report, scrub)
    records = report.finish(kept)

    # Ratings: on the processed records (same scrubbing); a rated reply outside the window (rated
    # after --since, answered before it) is processed on its own, not counted as a chat record.
    dropped: Counter = Counter()
    labels = _ratings(pairs, tables.feedback, tables.conversations, since_ms, dropped)
    by_id = {str(r["meta"]["assistant_message_id"]): r for r in records}
    outside = [p for p in pairs if str(p.reply["id"]) in labels and not recent(p.reply["timestamp"])]
    if outside:
        extra = Report()
        side = _process([_to_item(p, path, screen_context, Counter()) for p in outside], extra, scrub)
        by_id.update({str(r["meta"]["assistant_message_id"]): r for r in extra.finish(side)})
    rating_rows = []
    for reply_id, (label, attribution, provenance) in labels.items():
        rec = by_id.get(reply_id)
        if rec is None:
            dropped["rated reply was quarantined"] += 1
            continue
        rating_rows.append({"messages": rec["messages"], "rating": "up" if label else "down",
                            "meta": {**rec["meta"], "attribution": attribution, **provenance}})
    attribution = Counter(r["meta"]["attribution"] for r in rating_rows)
    ratings = {"written": len(rating_rows), "up": sum(r["rating"] == "up" for r in rating_rows),
               "down": sum(r["rating"] == "down" for r in rating_rows), "exact": attribution["exact"],
               "by_time": attribution["by_time"], "feedback_rows": len(tables.feedback), "dropped": dict(dropped)}

    personas, persona_warnings = personas_from(tables, scrub != "off") if personas_path is not None else ([], [])
    warnings = list(persona_warnings)
    if not rating_rows:
        warnings.append(f"no thumbs up/down ratings in {path}" + (" since --since" if since_ms is not None else "")
                        + " (app builds after v3.0.4 record none): the round trains with SFT only")
    convs_in_window = {str(m["conversation_id"]) for m in window_msgs}
    counts.update({
        "conversations": len(convs_in_window), "conversations_in_database": len(tables.conversations),
        "messages": len(window_msgs),
        **{f"{role}_messages": sum(1 for m in window_msgs if _role(m) == role) for role in ("user", "assistant", "system", "other")},
        "pairs": sum(1 for p in window if p.user is not None), "replies_without_user": sum(1 for p in window if p.user is None),
        "answered_user_messages": len(answered), "orphans": len(window_orphans),
        "records_written": len(records), "quarantined": report.quarantined,
    })
    counts.setdefault("screen_context_blocks", 0)
    watermark = max((_int(m["timestamp"]) for m in tables.messages), default=None)
    result = EdenImport(path, dict(counts), report, ratings, personas, warnings, watermark, since_ms, tables.layout,
                        tables.persona_layout)
    with atomic_outputs(inputs=db_files, outputs=outputs) as txn:
        if out is not None:
            txn.write_jsonl(out, records)
        if feedback is not None:
            txn.write_jsonl(feedback, rating_rows)
        if quarantine is not None:
            txn.write_jsonl(quarantine, report.quarantine)
        if personas_path is not None:
            txn.write_text(personas_path, personas_yaml(personas, path))
        if report_path is not None:
            txn.write_json(report_path, result.to_json())
    return result


def personas_yaml(personas: list[dict], db: Path) -> str:
    head = (f"# edentune personas read from {db} by `edentune data import-eden`.\n"
            "# Paste the entries into the `personas:` list of a cycle workspace's cycle.yaml\n"
            "# (each gets its own adapter and Ollama model), or use one system_prompt as run.model.system_prompt.\n")
    return head + yaml.safe_dump({"personas": personas}, allow_unicode=True, sort_keys=False, width=100)


def balanced(result: EdenImport) -> bool:
    """The invariants the tests and the report promise."""
    c = result.counts
    return (c["messages"] == c["user_messages"] + c["assistant_messages"] + c["system_messages"] + c["other_messages"]
            and c["user_messages"] == c["answered_user_messages"] + c["orphans"]
            and c["assistant_messages"] == c["pairs"] + c["replies_without_user"]
            and c["pairs"] + c["replies_without_user"] == result.report.lines
            and result.report.lines == c["records_written"] + c["quarantined"])
