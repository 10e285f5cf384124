"""Garden of Eden V3 databases for tests, built from the app's documented schema (docs/eden-app.md),
never from real user data. `EdenDB` writes conversations turn by turn as the app does (the user row
first, then the reply) with millisecond timestamps, plus thumbs, persona rows and a token table
that no output may ever contain."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

OAUTH_SECRET = "ya29.A0ARrdaM-oauth-refresh-Zq8Xk3Lm9Pw2Rt7Vb"

CHAT_DDL = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, mode TEXT NOT NULL CHECK(mode IN ('user-led', 'ai-led')),
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, message_count INTEGER DEFAULT 0);
CREATE TABLE messages (id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK(role IN ('user', 'assistant', 'system')), content TEXT NOT NULL, timestamp INTEGER NOT NULL,
    tokens INTEGER, response_time INTEGER, context_level INTEGER CHECK(context_level IN (1, 2, 3)),
    satisfaction TEXT CHECK(satisfaction IN ('positive', 'negative', NULL)),
    FOREIGN KEY (conversation_id) REFERENCES conversations(id) ON DELETE CASCADE);
"""
TAURI_DDL = """
CREATE TABLE feedback (id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL, satisfaction REAL NOT NULL,
    timestamp INTEGER NOT NULL, persona_snapshot TEXT NOT NULL);
CREATE TABLE onboarding_state (id INTEGER PRIMARY KEY CHECK(id = 1), completed BOOLEAN NOT NULL DEFAULT 0,
    system_specs_json TEXT, recommended_model TEXT, selected_model TEXT, survey_results_json TEXT, custom_prompt TEXT,
    created_at INTEGER NOT NULL, completed_at INTEGER);
CREATE TABLE oauth_tokens (id INTEGER PRIMARY KEY, provider TEXT, token_json TEXT);
CREATE TABLE webhooks (id TEXT PRIMARY KEY, url TEXT, secret TEXT);
CREATE TABLE llm_settings (id INTEGER PRIMARY KEY, selected_model TEXT);
"""
PERSONA_10 = """
CREATE TABLE persona_settings (id INTEGER PRIMARY KEY AUTOINCREMENT,
    formality INTEGER NOT NULL DEFAULT 50, verbosity INTEGER NOT NULL DEFAULT 50, humor INTEGER NOT NULL DEFAULT 30,
    emoji_usage INTEGER NOT NULL DEFAULT 20, empathy INTEGER NOT NULL DEFAULT 60, creativity INTEGER NOT NULL DEFAULT 50,
    proactiveness INTEGER NOT NULL DEFAULT 40, technical_depth INTEGER NOT NULL DEFAULT 50,
    code_examples INTEGER NOT NULL DEFAULT 70, questioning INTEGER NOT NULL DEFAULT 40,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
"""
PERSONA_17_COLUMNS = ("formality", "humor", "verbosity", "emoji_usage", "enthusiasm", "empathy", "directness", "technicality",
                      "creativity", "proactivity", "language_preference", "code_language_preference", "patience",
                      "encouragement", "formality_honorifics", "reasoning_depth", "context_awareness")
PERSONA_17 = ("CREATE TABLE persona_settings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
              + ", ".join(f"{c} {'TEXT' if c.endswith('preference') else 'INTEGER'}" for c in PERSONA_17_COLUMNS)
              + ", created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);")

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms


class EdenDB:
    """One database file; `layout` is 'tauri' (current), 'tauri17' (older persona table) or 'electron'."""

    def __init__(self, path: Path, layout: str = "tauri", journal: str = "delete"):
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute(f"PRAGMA journal_mode = {journal}")
        ddl = CHAT_DDL + ("" if layout == "electron" else TAURI_DDL + (PERSONA_17 if layout == "tauri17" else PERSONA_10))
        self.conn.executescript(ddl)
        self.clock = T0
        if layout != "electron":
            self.conn.execute("INSERT INTO oauth_tokens (provider, token_json) VALUES ('google', ?)",
                              (f'{{"access_token": "{OAUTH_SECRET}", "refresh_token": "{OAUTH_SECRET}"}}',))
            self.conn.execute("INSERT INTO webhooks VALUES ('w1', 'https://hooks.example/x', ?)", (OAUTH_SECRET,))

    def tick(self, ms: int = 1000) -> int:
        self.clock += ms
        return self.clock

    def conversation(self, title: str = "chat", at: int | None = None) -> str:
        at = at or self.tick()
        conv = f"conv_{at}"
        self.conn.execute("INSERT INTO conversations VALUES (?, ?, 'user-led', ?, ?, 0)", (conv, title, at, at))
        return conv

    def message(self, conv: str, role: str, content: str, satisfaction: str | None = None) -> str:
        at = self.tick()
        msg = f"msg_{at}"
        self.conn.execute("INSERT INTO messages (id, conversation_id, role, content, timestamp, satisfaction) VALUES (?, ?, ?, ?, ?, ?)",
                          (msg, conv, role, content, at, satisfaction))
        return msg

    def turn(self, conv: str, question: str, answer: str | None, satisfaction: str | None = None) -> tuple[str, str | None]:
        """The user row first, then the reply (None: Ollama failed, the question stays an orphan)."""
        q = self.message(conv, "user", question)
        a = self.message(conv, "assistant", answer, satisfaction) if answer is not None else None
        return q, a

    def thumbs(self, conv: str, up: bool | float, after_ms: int = 2000) -> int:
        at = self.tick(after_ms)
        value = float(up) if not isinstance(up, bool) else (1.0 if up else 0.0)
        self.conn.execute("INSERT INTO feedback VALUES (?, ?, ?, ?, ?)", (str(uuid.uuid4()), conv, value, at, '{"constant": true}'))
        return at

    def persona(self, **values: int) -> None:
        cols = ", ".join(["created_at", "updated_at", *values])
        marks = ", ".join("?" * (2 + len(values)))
        self.conn.execute(f"INSERT INTO persona_settings ({cols}) VALUES ({marks})", (self.clock, self.clock, *values.values()))

    def onboarding(self, custom_prompt: str | None) -> None:
        self.conn.execute("INSERT INTO onboarding_state (id, completed, custom_prompt, created_at) VALUES (1, 1, ?, ?)",
                          (custom_prompt, self.clock))

    def close(self) -> None:
        self.conn.close()


def files_of(db: Path) -> dict[str, bytes]:
    """The database file and its companions (-wal, -shm, -journal), by name: what must never change."""
    return {p.name: p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name)}


# The app, as another process: it opens the database (WAL mode stays set in the file), writes one
# more turn that is not checkpointed yet (it lives in -wal) and keeps the connection open.
APP_PROCESS = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("INSERT INTO conversations VALUES ('conv_app', 'live', 'user-led', 1, 1, 0)")
c.execute("INSERT INTO messages (id, conversation_id, role, content, timestamp) VALUES ('msg_app_q', 'conv_app', 'user', 'question while running', 1)")
c.execute("INSERT INTO messages (id, conversation_id, role, content, timestamp) VALUES ('msg_app_a', 'conv_app', 'assistant', 'answer while running', 2)")
print("ready", flush=True)
sys.stdin.readline()
c.close()
"""


@contextlib.contextmanager
def app_running(db: Path) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", APP_PROCESS, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
