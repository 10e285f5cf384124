"""The registry (cycle rounds, deploy events): one transaction per call, WAL readers beside a writer, and a killed writer
never leaves a half-written row."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edentune.errors import EdentuneError
from edentune.registry import MIGRATIONS, Registry

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "registry.sqlite") as r:
        yield r


def test_rounds_steps_runs_events_live(reg):
    assert reg.begin_round("2026-01", {"lr": 1e-3}) == 1
    assert reg.begin_round("2026-01", {"lr": 2e-3}) == 1  # resuming a running round keeps its seq
    assert reg.round("2026-01").config == {"lr": 2e-3}
    assert reg.begin_round("2026-02", {}) == 2
    assert reg.next_round_id("2026-02") == "2026-02.2" and reg.next_round_id("2026-03") == "2026-03"

    reg.record_step("2026-01", "shared", "ingest", inputs_sha256="a" * 64, outputs={"x.jsonl": "b" * 64}, detail={"n": 3})
    reg.record_step("2026-01", "p", "mix", inputs_sha256="c", outputs={}, detail={})
    reg.record_step("2026-01", "p", "sft", inputs_sha256="d", outputs={}, detail={})
    reg.record_step("2026-01", "p", "eval", inputs_sha256="e", outputs={}, detail={})
    step = reg.step("2026-01", "shared", "ingest")
    assert step.outputs == {"x.jsonl": "b" * 64} and step.detail == {"n": 3} and step.finished
    reg.forget_steps("2026-01", "p", "sft")
    assert [s.step for s in reg.list_steps("2026-01")] == ["ingest", "mix"]
    assert reg.step("2026-01", "shared", "ingest") is not None  # other personas untouched

    reg.set_run("2026-01", "p", status="running", metrics={"val_loss": 2.0})
    reg.set_run("2026-01", "p", metrics={"forgetting": float("nan")}, verdict={"ship": True}, reasons=["ok"], export_dir=Path("/x"))
    run = reg.run("2026-01", "p")
    assert run.metrics == {"val_loss": 2.0, "forgetting": None}  # merged; NaN stored as null (strict JSON)
    assert run.verdict == {"ship": True} and run.reasons == ["ok"] and run.export_dir == "/x"
    with pytest.raises(TypeError, match="unknown field"):
        reg.set_run("2026-01", "p", colour="red")

    reg.set_live("p", "2026-01", "eden:latest", detail={"digest": "sha256:1"})
    reg.set_live("p", "2026-02", "eden:latest", event="rollback")
    assert reg.live("p").round_id == "2026-02" and reg.live("other") is None
    assert [(e.kind, e.round_id) for e in reg.events()] == [("deploy", "2026-01"), ("rollback", "2026-02")]

    reg.finish_round("2026-01", "accepted")
    with pytest.raises(EdentuneError, match="already finished"):
        reg.begin_round("2026-01", {})
    with pytest.raises(EdentuneError, match="no round"):
        reg.set_run("2099-01", "p", status="running")
    with pytest.raises(ValueError):
        reg.finish_round("2026-02", "great")


def test_strict_json_and_integrity(tmp_path):
    path = tmp_path / "r.sqlite"
    with Registry(path) as reg:
        reg.begin_round("r1", {"x": math.inf})
        reg.set_run("r1", "p", metrics={"a": -math.inf})
    raw = sqlite3.connect(path)
    for (text,) in raw.execute("SELECT config_json FROM rounds UNION ALL SELECT metrics_json FROM runs"):
        json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS)


def test_events_without_a_round_and_an_import_done_once(reg):
    reg.record_events([{"kind": "deploy", "model": "eden:latest", "detail": {"records": [{"a": 1}]}},
                       {"kind": "deploy", "model": "eden-formal:latest", "time": "2025-01-01T00:00:00+00:00"}])
    old = [{"kind": "rollback", "model": "eden:latest", "time": "2024-12-01T00:00:00+00:00", "detail": {"x": 1}}]
    assert reg.import_events(old, source="/h/deployments.json", sha256="ab" * 32) == 1
    assert reg.import_events(old, source="/elsewhere.json", sha256="ab" * 32) is None  # same content: not again
    with pytest.raises(TypeError, match="JSON data"):  # a failed import leaves nothing, the marker included
        reg.import_events(old + [{"kind": "deploy", "detail": {"p": Path("x")}}], source="s", sha256="cd" * 32)
    events = reg.events()
    assert [(e.kind, e.round_id, e.persona, e.model) for e in events] == [
        ("deploy", None, None, "eden:latest"), ("deploy", None, None, "eden-formal:latest"),
        ("rollback", None, None, "eden:latest"), ("import", None, None, None)]
    assert events[1].time == "2025-01-01T00:00:00+00:00" and events[2].time == "2024-12-01T00:00:00+00:00"
    assert events[3].detail == {"source": "/h/deployments.json", "sha256": "ab" * 32, "events": 1}


def test_readonly_and_newer_schema(tmp_path):
    path = tmp_path / "r.sqlite"
    with pytest.raises(EdentuneError, match="no registry"):
        Registry(path, readonly=True)
    Registry(path).close()
    with Registry(path, readonly=True) as ro:
        assert ro.rounds() == []
        with pytest.raises(EdentuneError, match="read-only"):
            ro.begin_round("r", {})
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO schema_version VALUES (99, 'later')")
    with pytest.raises(EdentuneError, match="newer than this edentune"):
        Registry(path)
    (tmp_path / "junk.sqlite").write_text("not a database at all" * 100)
    with pytest.raises(EdentuneError, match="cannot open the registry"):
        Registry(tmp_path / "junk.sqlite")


WRITER = textwrap.dedent("""
    import sys
    from edentune.registry import Registry
    reg = Registry(sys.argv[1])
    reg.begin_round("r1", {"seed": 1})
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        reg.record_step("r1", "p", f"s{i}", inputs_sha256=f"{i:064d}", outputs={f"out{i}": "f" * 64},
                        detail={"i": i, "payload": "x" * 2000})
        reg.set_run("r1", "p", status="running", metrics={"i": i, "val_loss": 1.0 / i})
        reg.set_live("p", "r1", f"eden-{i}", detail={"i": i})
""")


def test_sigkill_mid_write_leaves_a_consistent_registry(tmp_path):
    path = tmp_path / "registry.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert proc.stdout.readline().strip() == b"ready"
        # Read while the other process writes (WAL: no "database is locked").
        deadline = time.monotonic() + 30
        with Registry(path, readonly=True) as ro:
            while len(ro.events()) < 30:
                assert time.monotonic() < deadline, "the writer made no progress"
                assert all(s.record.detail["i"] == int(s.step[1:]) for s in ro.list_steps("r1"))
                time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with Registry(path) as reg:
        assert reg._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        steps = reg.list_steps("r1")
        assert steps and all(s.record.detail == {"i": int(s.step[1:]), "payload": "x" * 2000}
                             and s.record.outputs == {f"out{s.step[1:]}": "f" * 64} for s in steps)
        n = len(steps)
        run = reg.run("r1", "p")
        events = reg.events()
        # Calls happen in order step -> run -> live, each one transaction: the kill can only fall between them.
        assert run.metrics["i"] in (n - 1, n) and run.metrics["val_loss"] == pytest.approx(1.0 / run.metrics["i"])
        last = events[-1]
        assert len(events) in (n - 1, n) and last.detail == {"i": len(events)}
        assert reg.live("p").model == last.model == f"eden-{len(events)}"  # live row and its event: one transaction
