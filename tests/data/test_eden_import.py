"""`edentune data import-eden`: Garden of Eden V3's database -> chat records, ratings with their
provenance, personas; on databases the tests build from the app's documented schema."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from data_helpers import read_jsonl
from eden_db import OAUTH_SECRET, T0, EdenDB, app_running, files_of
from typer.testing import CliRunner

from edentune.cli import app
from edentune.data.eden import PERSONA_DEFAULTS, balanced, default_db_path, import_eden, parse_since, render_persona
from edentune.data.feedback import prepare_feedback
from edentune.errors import DataError

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[2] / "src")


def edentune(*args: str) -> subprocess.CompletedProcess:
    """The real command line: user errors go through its handler (one message, exit code 2)."""
    return subprocess.run([sys.executable, "-m", "edentune.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "300"})
EMAIL, PHONE = "kim.minji@example.com", "010-1234-5678"
SCREEN = (f"[Screen Context]\nApplication: Mail\nWorkspace: inbox\nA message from {EMAIL} asking to call {PHONE} today."
          "\n\nHow should I answer this politely?")


def outputs(tmp_path: Path) -> dict[str, Path]:
    return {"out": tmp_path / "out" / "chats.jsonl", "feedback": tmp_path / "out" / "ratings.jsonl",
            "report_path": tmp_path / "out" / "report.json", "personas_path": tmp_path / "out" / "personas.yaml",
            "quarantine": tmp_path / "out" / "quarantine.jsonl"}


def assert_no_secret(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            assert OAUTH_SECRET not in p.read_text(encoding="utf-8"), p


@pytest.fixture
def current_db(tmp_path) -> tuple[Path, dict]:
    """The current (Tauri) layout: thumbs in `feedback`, an onboarding prompt, a changed persona."""
    (tmp_path / "app").mkdir()
    db = EdenDB(tmp_path / "app" / "data.db")
    ids = {}
    a = db.conversation("Python help")
    ids["q1"], ids["a1"] = db.turn(a, "How do I reverse a list in Python?", "Use reversed(xs) or xs[::-1].")
    db.thumbs(a, True)
    ids["q2"], ids["a2"] = db.turn(a, "And a string?", "The same slice works: s[::-1].")
    db.thumbs(a, False)
    db.thumbs(a, True)  # changed their mind: the latest click wins
    b = db.conversation("Mail")
    ids["q3"], ids["a3"] = db.turn(b, SCREEN, "Thank them and propose a time for the call.")
    c = db.conversation("Offline")
    ids["orphan"], _ = db.turn(c, "Are you there?", None)  # Ollama was down: no reply stored
    ids["q4"], ids["a4"] = db.turn(c, "오늘 날씨 어때?", "저는 실시간 날씨를 알 수 없지만, 날씨 앱을 확인해 보세요.")
    db.thumbs("unknown", True)
    db.thumbs("conv_1", False)  # a conversation deleted since
    db.persona(formality=90, verbosity=10, humor=30, emoji_usage=0, empathy=60, creativity=50, proactiveness=40,
               technical_depth=80, code_examples=95, questioning=40)
    db.onboarding("당신은 사용자의 개발 비서입니다. 간결하게 답하세요.")
    db.close()
    return db.path, ids


def test_current_layout_counts_labels_provenance(current_db, tmp_path):
    path, ids = current_db
    before = files_of(path)
    o = outputs(tmp_path)
    res = import_eden(path, **o)

    assert files_of(path) == before
    c = res.counts
    assert (c["conversations"], c["messages"], c["user_messages"], c["assistant_messages"]) == (3, 9, 5, 4)
    assert (c["pairs"], c["orphans"], c["replies_without_user"], c["screen_context_blocks"]) == (4, 1, 0, 1)
    assert (c["records_written"], c["quarantined"]) == (4, 0) and balanced(res)

    records = read_jsonl(o["out"])
    assert [r["meta"]["assistant_message_id"] for r in records] == [ids["a1"], ids["a2"], ids["a3"], ids["a4"]]
    first = records[0]
    assert first["messages"] == [{"role": "user", "content": "How do I reverse a list in Python?"},
                                 {"role": "assistant", "content": "Use reversed(xs) or xs[::-1]."}]
    assert first["meta"]["conversation_id"].startswith("conv_") and first["meta"]["title"] == "Python help"
    assert first["meta"]["user_message_id"] == ids["q1"] and first["meta"]["assistant_timestamp"] > first["meta"]["user_timestamp"]
    screen = records[2]["messages"][0]["content"]
    assert screen.startswith("[Screen Context]\nApplication: Mail") and "How should I answer" in screen
    assert EMAIL not in screen and PHONE not in screen and "[REDACTED_EMAIL]" in screen and "[REDACTED_PHONE]" in screen

    ratings = read_jsonl(o["feedback"])
    by_reply = {r["meta"]["assistant_message_id"]: r for r in ratings}
    assert set(by_reply) == {ids["a1"], ids["a2"]}
    assert by_reply[ids["a1"]]["rating"] == "up" and by_reply[ids["a2"]]["rating"] == "up"
    assert all(r["meta"]["attribution"] == "by_time" and r["meta"]["feedback_id"] for r in ratings)
    assert res.ratings["dropped"] == {"conversation 'unknown'": 1, "conversation not in the database": 1,
                                      "superseded by a later click": 1}
    assert res.ratings["feedback_rows"] == 5 == res.ratings["written"] + sum(res.ratings["dropped"].values())

    # The ratings are what `data feedback` reads.
    fb = prepare_feedback([o["feedback"]], tmp_path / "fb")
    assert (fb.desirable, fb.undesirable, fb.quarantined) == (2, 0, 0)

    personas = yaml.safe_load(o["personas_path"].read_text(encoding="utf-8"))["personas"]
    from edentune.cycle.workspace import WorkspacePersona

    assert [WorkspacePersona(**p).name for p in personas] == ["settings", "onboarding"]
    settings = personas[0]["system_prompt"]
    assert "Adam" in settings and "formal" in settings and "Do not use emoji" in settings and "working code examples" in settings
    assert personas[1]["system_prompt"].startswith("당신은 사용자의 개발 비서입니다")
    assert res.persona_layout == "10-value" and not any("defaults" in w for w in res.warnings)

    report = json.loads(o["report_path"].read_text(encoding="utf-8"))
    assert report["counts"] == c and report["watermark_ms"] == res.watermark_ms > T0
    assert "oauth_tokens" not in report["tables_read"] and "webhooks" not in report["tables_read"]
    assert_no_secret(tmp_path / "out")


def test_orphans_replies_and_since(tmp_path):
    db = EdenDB(tmp_path / "data.db")
    a = db.conversation()
    db.turn(a, "first question, never answered", None)
    db.turn(a, "second question", "second answer")
    db.message(a, "assistant", "a regenerated second answer")  # the same question answered again
    b = db.conversation()
    db.message(b, "assistant", "a greeting nobody asked for")  # no user message before it
    cut = db.clock
    c = db.conversation()
    db.turn(c, "a later question", "a later answer")
    db.turn(c, "a later orphan", None)
    db.close()

    res = import_eden(db.path, tmp_path / "all.jsonl", quarantine=tmp_path / "q.jsonl")
    c_all = res.counts
    assert (c_all["pairs"], c_all["replies_without_user"], c_all["orphans"]) == (3, 1, 2) and balanced(res)
    assert res.report.reasons == {"reply without a user message": 1}
    assert [q["reason"].split(" (")[0] for q in read_jsonl(tmp_path / "q.jsonl")] == ["reply without a user message"]
    assert [r["messages"][0]["content"] for r in read_jsonl(tmp_path / "all.jsonl")] == ["second question", "second question",
                                                                                         "a later question"]

    later = import_eden(db.path, tmp_path / "later.jsonl", since_ms=cut)
    assert [r["messages"][1]["content"] for r in read_jsonl(tmp_path / "later.jsonl")] == ["a later answer"]
    assert (later.counts["conversations"], later.counts["orphans"], later.counts["conversations_in_database"]) == (1, 1, 3)
    assert balanced(later) and later.watermark_ms == res.watermark_ms


def test_older_17_value_persona_layout(tmp_path):
    db = EdenDB(tmp_path / "data.db", layout="tauri17")
    db.turn(db.conversation(), "hi", "hello")
    db.persona(formality=20, humor=90, verbosity=80, emoji_usage=90, enthusiasm=70, empathy=10, directness=50,
               technicality=5, creativity=50, proactivity=95, language_preference="ko", patience=50)
    db.close()
    res = import_eden(db.path, tmp_path / "c.jsonl", personas_path=tmp_path / "p.yaml")
    assert res.persona_layout == "17-value"
    prompt = yaml.safe_load((tmp_path / "p.yaml").read_text(encoding="utf-8"))["personas"][0]["system_prompt"]
    # The app's migration: proactivity -> proactiveness, technicality -> technical_depth, code_examples 70, questioning 40.
    expected = render_persona({**PERSONA_DEFAULTS, "formality": 20, "humor": 90, "verbosity": 80, "emoji_usage": 90,
                               "empathy": 10, "creativity": 50, "proactiveness": 95, "technical_depth": 5,
                               "code_examples": 70, "questioning": 40})
    assert prompt == expected and "Anticipate needs" in prompt and "plain words" in prompt


OLD_LAYOUT_DEFAULTS = dict(formality=50, humor=40, verbosity=50, emoji_usage=30, enthusiasm=60, empathy=70, directness=60,
                           technicality=50, creativity=50, proactivity=40, patience=80, encouragement=70)


@pytest.mark.parametrize("layout, values", [("tauri", {}), ("tauri17", OLD_LAYOUT_DEFAULTS)])
def test_untouched_default_persona_warns(tmp_path, layout, values):
    db = EdenDB(tmp_path / "data.db", layout=layout)
    db.turn(db.conversation(), "hi", "hello")
    db.persona(**values)  # the row the app inserts at first start: its column defaults
    db.close()
    res = import_eden(db.path, tmp_path / "c.jsonl", personas_path=tmp_path / "p.yaml")
    assert any("untouched defaults" in w for w in res.warnings)
    assert yaml.safe_load((tmp_path / "p.yaml").read_text(encoding="utf-8"))["personas"][0]["name"] == "settings"


def test_electron_db_exact_satisfaction(tmp_path):
    db = EdenDB(tmp_path / "eden.db", layout="electron")
    conv = db.conversation("old")
    _, up = db.turn(conv, "Explain recursion briefly.", "A function that calls itself on a smaller input.", "positive")
    _, down = db.turn(conv, "Shorter?", "No.", "negative")
    _, unrated = db.turn(conv, "Thanks", "You're welcome.")
    db.close()
    before = files_of(db.path)
    res = import_eden(db.path, tmp_path / "c.jsonl", feedback=tmp_path / "r.jsonl", personas_path=tmp_path / "p.yaml")
    assert files_of(db.path) == before
    ratings = {r["meta"]["assistant_message_id"]: r for r in read_jsonl(tmp_path / "r.jsonl")}
    assert {k: (v["rating"], v["meta"]["attribution"]) for k, v in ratings.items()} == {up: ("up", "exact"), down: ("down", "exact")}
    assert res.ratings["exact"] == 2 and res.ratings["by_time"] == 0 and unrated not in ratings
    assert res.counts["records_written"] == 3
    assert yaml.safe_load((tmp_path / "p.yaml").read_text(encoding="utf-8"))["personas"] == []
    assert any("no persona" in w for w in res.warnings)


def test_zero_ratings_said_plainly(tmp_path):
    db = EdenDB(tmp_path / "data.db")
    db.turn(db.conversation(), "hi", "hello")
    db.close()
    res = runner.invoke(app, ["data", "import-eden", str(db.path), "-o", str(tmp_path / "c.jsonl"),
                              "--feedback", str(tmp_path / "r.jsonl")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "no thumbs up/down ratings" in res.output and "SFT only" in res.output
    assert (tmp_path / "r.jsonl").read_text(encoding="utf-8") == "" and len(read_jsonl(tmp_path / "c.jsonl")) == 1


@pytest.mark.parametrize("mode, expected", [
    ("strip", "How should I answer this politely?"),
    ("drop", None),
])
def test_screen_context_strip_or_drop(tmp_path, mode, expected):
    db = EdenDB(tmp_path / "data.db")
    conv = db.conversation()
    db.turn(conv, SCREEN, "Propose a time.")
    db.turn(conv, f"[Screen Context]\nApplication: Code\nfoo.py open, {EMAIL}", "I see foo.py.")  # nothing but the block
    db.turn(conv, "plain question", "plain answer")
    db.close()
    res = import_eden(db.path, tmp_path / "c.jsonl", screen_context=mode)
    users = [r["messages"][0]["content"] for r in read_jsonl(tmp_path / "c.jsonl")]
    assert res.counts["screen_context_blocks"] == 2 and balanced(res)
    if mode == "strip":
        assert users == [expected, "plain question"] and res.report.reasons == {"empty content": 1}
    else:
        assert users == ["plain question"] and res.report.reasons == {"screen context (--screen-context drop)": 2}


def test_snapshot_while_another_connection_holds_an_uncommitted_write(tmp_path):
    db = EdenDB(tmp_path / "data.db")
    db.turn(db.conversation(), "committed question", "committed answer")
    db.close()
    app_conn = sqlite3.connect(db.path, isolation_level=None)
    app_conn.execute("BEGIN")
    app_conn.execute("INSERT INTO conversations VALUES ('conv_x', 't', 'user-led', 1, 1, 0)")
    app_conn.execute("INSERT INTO messages (id, conversation_id, role, content, timestamp) VALUES ('m_x', 'conv_x', 'user', 'pending', 9)")
    try:
        before = files_of(db.path)
        assert "data.db-journal" in before  # the app's write is in flight
        res = import_eden(db.path, tmp_path / "c.jsonl")
        assert files_of(db.path) == before
        assert res.counts["messages"] == 2 and [r["messages"][0]["content"] for r in read_jsonl(tmp_path / "c.jsonl")] == ["committed question"]
    finally:
        app_conn.execute("ROLLBACK")
        app_conn.close()


def test_locked_database_is_one_clear_error(tmp_path):
    db = EdenDB(tmp_path / "data.db")
    db.turn(db.conversation(), "q", "a")
    db.close()
    holder = sqlite3.connect(db.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DataError, match="locked by another program") as err:
            import_eden(db.path, tmp_path / "c.jsonl", timeout=0.2)
        assert str(db.path) in str(err.value) and not (tmp_path / "c.jsonl").exists()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_wal_mode_with_the_app_running_and_after_it_quit(tmp_path):
    db = EdenDB(tmp_path / "data.db", journal="wal")
    db.turn(db.conversation(), "question before", "answer before")
    db.close()
    with app_running(db.path):  # another process, as the app is: SQLite shares -shm within one process
        before = files_of(db.path)
        assert {"data.db-wal", "data.db-shm"} <= set(before)
        res = import_eden(db.path, tmp_path / "running.jsonl")
        assert files_of(db.path) == before  # -shm included: not even a read mark was written
        assert [r["messages"][1]["content"] for r in read_jsonl(tmp_path / "running.jsonl")] == ["answer while running", "answer before"]
    before = files_of(db.path)  # the app quit: SQLite checkpointed and removed -wal/-shm
    assert set(before) == {"data.db"}
    res = import_eden(db.path, tmp_path / "quit.jsonl")
    assert files_of(db.path) == before and res.counts["records_written"] == 2  # no -wal/-shm created


def _truncated(tmp_path: Path) -> Path:
    db = EdenDB(tmp_path / "full.db")
    for i in range(300):
        db.turn(db.conversation(), f"question {i} " + "x" * 400, f"answer {i} " + "y" * 400)
    db.close()
    data = db.path.read_bytes()
    out = tmp_path / "data.db"
    out.write_bytes(data[: len(data) // 2])
    return out


def _file(name: str, data: bytes):
    def make(tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return make


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.db", "no such database file"),
    (_file("notes.db", b"just some notes\n"), "not a SQLite database"),
    (_file("enc.db", bytes(range(256)) * 16), "not a SQLite database (encrypted"),  # what SQLCipher looks like
    (_file("empty.db", b""), "not a SQLite database"),
    (_truncated, "damaged or truncated"),
])
def test_unreadable_files_are_one_clear_error(tmp_path, make, message):
    path = make(tmp_path)
    res = edentune("data", "import-eden", str(path), "-o", str(tmp_path / "c.jsonl"))
    assert res.returncode == 2 and message in res.stderr and str(path.resolve()) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "c.jsonl").exists()


def test_not_an_eden_database(tmp_path):
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE notes (id, body)")
    conn.commit()
    conn.close()
    with pytest.raises(DataError, match="no conversations table: not a Garden of Eden database"):
        import_eden(tmp_path / "other.db", tmp_path / "c.jsonl")


def test_refuses_to_write_over_the_database(current_db):
    path, _ = current_db
    before = files_of(path)
    with pytest.raises(Exception, match="is the input"):
        import_eden(path, path)
    assert files_of(path) == before


def test_default_path_per_os(tmp_path):
    home = Path("/home/u")
    assert default_db_path("darwin", {}, home) == home / "Library/Application Support/garden-of-eden-v3/data.db"
    assert default_db_path("win32", {"APPDATA": "C:/Users/u/AppData/Roaming"}, home) == Path("C:/Users/u/AppData/Roaming/garden-of-eden-v3/data.db")
    assert default_db_path("linux", {}, home) == home / ".local/share/garden-of-eden-v3/data.db"
    assert default_db_path("linux", {"XDG_DATA_HOME": "/data/x"}, home) == Path("/data/x/garden-of-eden-v3/data.db")


def test_since_parsing():
    assert parse_since("2026-01-01T00:00:00+00:00") == T0
    with pytest.raises(DataError, match="not a date"):
        parse_since("last month")


def test_since_keeps_a_late_click_on_an_earlier_reply(tmp_path):
    db = EdenDB(tmp_path / "data.db")
    conv = db.conversation()
    _, old_reply = db.turn(conv, "an old question", "an old answer")
    db.thumbs(conv, True)  # rated before the cut: belongs to the earlier import
    cut = db.clock
    db.thumbs(conv, False)  # the user came back after the cut and changed the rating
    other = db.conversation()
    _, new_reply = db.turn(other, "a new question", "a new answer")
    db.close()
    res = import_eden(db.path, tmp_path / "c.jsonl", feedback=tmp_path / "r.jsonl", since_ms=cut)
    assert [r["meta"]["assistant_message_id"] for r in read_jsonl(tmp_path / "c.jsonl")] == [new_reply]
    ratings = read_jsonl(tmp_path / "r.jsonl")
    assert [(r["meta"]["assistant_message_id"], r["rating"]) for r in ratings] == [(old_reply, "down")]
    assert res.counts["records_written"] == 1 and balanced(res)  # the rated old reply is not a new chat record
