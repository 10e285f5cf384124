"""`edentune cycle run WS --from-eden DB` twice on a growing Garden of Eden database: each round
imports only what is newer than the last round's watermark (recorded in the registry), its
thumbs become the round's feedback, and the database files are never changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edentune.cli import app
from edentune.registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # eden_db: databases from the documented schema
from eden_db import EdenDB, files_of  # noqa: E402

runner = CliRunner()


def add_month(db: EdenDB, records: list[dict], thumbs: bool = False) -> list[str]:
    """One conversation per record (its first question and answer), as the app writes them."""
    replies = []
    for i, rec in enumerate(records):
        turn = [m for m in rec["messages"] if m["role"] in ("user", "assistant")]
        conv = db.conversation(title=turn[0]["content"][:30])
        _, reply = db.turn(conv, turn[0]["content"], turn[1]["content"])
        replies.append(reply)
        if thumbs:
            db.thumbs(conv, i % 2 == 0)
    return replies


def chats(ws: Path, round_id: str) -> list[dict]:
    path = ws / "rounds" / round_id / "shared" / "data" / "eden" / "chats.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_two_rounds_on_a_growing_database(tmp_path, make_workspace, standin_factory, new_data, short_parity):
    month_records, _ = new_data
    server = standin_factory()
    # One optimizer step a round: what is tested is which conversations each round imports.
    ws = make_workspace(tmp_path / "ws", server.host, **{"run.training.max_steps": 1, "run.training.warmup_steps": 0, "run.training.eval_steps": 1,
                                                         "run.training.save_steps": 1})
    (tmp_path / "app").mkdir()
    db = EdenDB(tmp_path / "app" / "data.db")  # stays open, as the running app's connection
    first = add_month(db, month_records(seed=1))

    before = files_of(db.path)
    res = runner.invoke(app, ["cycle", "run", str(ws), "--from-eden", str(db.path), "--round", "2026-01"])
    assert res.exit_code == 0, res.output
    assert files_of(db.path) == before
    assert [r["meta"]["assistant_message_id"] for r in chats(ws, "2026-01")] == first
    assert "no thumbs up/down ratings" in res.output

    second = add_month(db, month_records(seed=2), thumbs=True)  # the next month, with thumbs
    before = files_of(db.path)
    res = runner.invoke(app, ["cycle", "run", str(ws), "--from-eden", str(db.path), "--round", "2026-02"])
    assert res.exit_code == 0, res.output
    assert files_of(db.path) == before
    assert [r["meta"]["assistant_message_id"] for r in chats(ws, "2026-02")] == second  # only the new month

    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        imports = {e.round_id: e.detail for e in reg.events() if e.kind == "eden-import"}
        assert imports["2026-01"]["since_ms"] is None and imports["2026-02"]["since_ms"] == imports["2026-01"]["watermark_ms"]
        assert imports["2026-02"]["ratings"]["by_time"] == len(second)
        assert reg.step("2026-01", "shared", "feedback") is None
        assert reg.step("2026-02", "shared", "feedback") is not None and reg.step("2026-02", "default", "preference") is not None
        assert reg.step("2026-02", "shared", "ingest").detail["kept"] == len(second)

    db.close()
    res = runner.invoke(app, ["cycle", "run", str(ws), "--from-eden", str(db.path), "--round", "2026-03"])
    assert res.exit_code != 0 and "no new conversation to train on" in str(res.exception)


def test_from_eden_without_a_path_reads_the_apps_default_database(tmp_path):
    """`--from-eden` alone: the app's path on this OS ($XDG_DATA_HOME on Linux); missing -> one clear error, nothing started."""
    import os
    import subprocess

    from edentune.cycle.workspace import init_workspace

    ws = tmp_path / "ws"
    init_workspace(ws, model="embedded")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src, "COLUMNS": "300", "XDG_DATA_HOME": str(tmp_path / "share")}
    res = subprocess.run([sys.executable, "-m", "edentune.cli", "cycle", "run", str(ws), "--from-eden"], capture_output=True,
                         text=True, timeout=300, env=env)
    expected = tmp_path / "share" / "garden-of-eden-v3" / "data.db"
    assert res.returncode == 2 and f"{expected}: no such database file" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not any((ws / "rounds").iterdir())


def test_watermark_and_resume_without_training(tmp_path):
    """The import side of --from-eden alone (the round itself is the slow test above): the watermark
    moves only when a round finished, and a continued round keeps its first import."""
    from rich.console import Console

    from edentune.cycle import eden
    from edentune.cycle.workspace import init_workspace, load_workspace

    ws = tmp_path / "ws"
    init_workspace(ws, model="embedded")
    db = EdenDB(tmp_path / "data.db")
    conv = db.conversation()
    db.turn(conv, "january question", "january answer")
    quiet = Console(quiet=True)

    jan = eden.prepare(ws, db.path, "2026-01", quiet)
    with load_workspace(ws).open_registry() as reg:
        reg.begin_round("2026-01", {})
        reg.finish_round("2026-01", "refused")  # a refused month still moves the watermark: it was trained on
    eden.record(ws, jan)

    db.turn(conv, "february question", "february answer")
    feb = eden.prepare(ws, db.path, "2026-02", quiet)
    assert [r["messages"][0]["content"] for r in chats(ws, "2026-02")] == ["february question"]
    assert feb.detail["since_ms"] == jan.detail["watermark_ms"] and not feb.feedback
    with load_workspace(ws).open_registry() as reg:
        reg.begin_round("2026-02", {})  # the round crashed: still running

    db.turn(conv, "a question after the crash", "its answer")
    again = eden.prepare(ws, db.path, None, quiet)  # continues 2026-02 on the same import
    assert again.round_id == "2026-02" and again.reused
    assert [r["messages"][0]["content"] for r in chats(ws, "2026-02")] == ["february question"]
    with load_workspace(ws).open_registry(readonly=True) as reg:
        assert eden.last_watermark(reg) == jan.detail["watermark_ms"]  # 2026-02 has not finished
    db.close()


def test_cli_two_rounds_with_the_round_runner_stubbed(tmp_path, monkeypatch):
    """`cycle run --from-eden` end to end at the command line, the training replaced by a stub that
    records what it was given and finishes the round in the registry as run_round does."""
    from types import SimpleNamespace

    import edentune.cycle.round as round_mod
    from edentune.cycle.workspace import init_workspace, load_workspace

    ws = tmp_path / "ws"
    init_workspace(ws, model="embedded")
    calls = []

    def fake_run_round(ws_dir, new_files, *, feedback=None, round_id=None, console=None, **_):
        calls.append(([json.loads(line) for f in new_files for line in Path(f).read_text(encoding="utf-8").splitlines()],
                      feedback, round_id))
        with load_workspace(ws_dir).open_registry() as reg:
            reg.begin_round(round_id, {})
            reg.finish_round(round_id, "accepted")
        return SimpleNamespace(round_id=round_id, status="accepted")

    monkeypatch.setattr(round_mod, "run_round", fake_run_round)
    db = EdenDB(tmp_path / "data.db")
    conv = db.conversation()
    db.turn(conv, "first month", "answer one")
    res = runner.invoke(app, ["cycle", "run", str(ws), "--from-eden", str(db.path), "--round", "2026-01"])
    assert res.exit_code == 0, res.output
    db.turn(db.conversation(), "second month", "answer two")
    db.thumbs(conv, False)  # a late thumbs-down on the first month's answer
    res = runner.invoke(app, ["cycle", "run", str(ws), "--from-eden", str(db.path), "--round", "2026-02"])
    assert res.exit_code == 0, res.output
    db.close()

    (jan, jan_fb, _), (feb, feb_fb, _) = calls
    assert [r["messages"][0]["content"] for r in jan] == ["first month"] and jan_fb is None
    assert [r["messages"][0]["content"] for r in feb] == ["second month"]
    ratings = [json.loads(line) for line in Path(feb_fb[0]).read_text(encoding="utf-8").splitlines()]
    assert [(r["messages"][0]["content"], r["rating"], r["meta"]["attribution"]) for r in ratings] == [("first month", "down", "by_time")]
    assert Path(feb_fb[0]).is_relative_to(ws / "rounds" / "2026-02" / "shared" / "data")
