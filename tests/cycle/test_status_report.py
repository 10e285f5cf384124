"""`cycle status`: the history table from the registry (also while a round writes), and the HTML
report with a trend plot per key metric and the numbers beside it."""

from __future__ import annotations

import base64
import re
import sqlite3

import pytest

from edentune.cycle import status
from edentune.cycle.report import TRENDS, render_html, write_html
from edentune.cycle.workspace import init_workspace
from edentune.errors import EdentuneError
from edentune.registry import SHARED

MONTHS = {
    "2026-01": ("accepted", {"val_loss": 2.3456, "korean_consistency": 0.81, "persona_adherence": 0.7, "forgetting": 0.02,
                             "forgetting_base": 0.02, "train_records": 700, "new_records": 700, "replay_records": 0,
                             "dropped_for_length": 12, "trained_records": 688, "started_from": "base"}),
    "2026-02": ("accepted", {"val_loss": 2.1234, "korean_consistency": 0.86, "persona_adherence": 0.75, "forgetting": 0.03,
                             "forgetting_base": 0.0506, "train_records": 1000, "new_records": 700, "replay_records": 300,
                             "dropped_for_length": 0, "trained_records": 1000, "started_from": "round 2026-01"}),
    "2026-03": ("refused", {"val_loss": 3.9876, "korean_consistency": 0.2, "persona_adherence": 0.4, "forgetting": 0.5}),
}


@pytest.fixture
def history(tmp_path):
    ws = init_workspace(tmp_path / "ws", model="embedded", personas={"professional": "", "friendly": ""})
    with ws.open_registry() as reg:
        for round_id, (st, metrics) in MONTHS.items():
            reg.begin_round(round_id, {})
            reg.record_step(round_id, SHARED, "ingest", inputs_sha256="x", outputs={}, detail={"seconds": 1.5})
            for persona in ws.persona_names:
                reg.record_step(round_id, persona, "sft", inputs_sha256="x", outputs={}, detail={"seconds": 61.25})
                reg.set_run(round_id, persona, status=st, metrics=metrics, verdict={"ship": st == "accepted"},
                            reasons=[] if st == "accepted" else ["validation loss 3.9876 is not below the live round's 2.1234 [worse]"])
                if st == "accepted":
                    reg.set_live(persona, round_id, ws.ollama_model(persona) + ":latest")
            reg.finish_round(round_id, st)
        reg.set_live("friendly", "2026-01", "eden-friendly:latest", event="rollback")
        reg.begin_round("2026-04", {})
        reg.record_step("2026-04", SHARED, "ingest", inputs_sha256="x", outputs={}, detail={})
    return ws


def test_status_rows_verdicts_and_live_markers(history):
    table = status(history.dir)
    assert [(r.round_id, r.persona) for r in table.rows] == [
        ("2026-01", "friendly"), ("2026-01", "professional"), ("2026-02", "friendly"), ("2026-02", "professional"),
        ("2026-03", "friendly"), ("2026-03", "professional"), ("2026-04", "")]
    live = {(r.round_id, r.persona) for r in table.rows if r.live_for}
    assert live == {("2026-01", "friendly"), ("2026-02", "professional")}
    refused = [r for r in table.rows if r.status == "refused"]
    assert len(refused) == 2 and all(r.ship is False and "not below" in r.reasons[0] for r in refused)
    assert table.rows[-1].status == "running" and table.rows[-1].last_step == "ingest"
    assert table.live["friendly"]["round_id"] == "2026-01"
    assert [e["kind"] for e in table.to_json()["events"]][-1] == "rollback"
    first = table.to_json()["rows"][0]
    assert first["step_seconds"] == {"ingest": 1.5, "sft": 61.25} and first["wall_s"] is not None and first["wall_s"] >= 0
    assert table.rows[-1].wall_s is None  # still running


def test_status_table_shows_what_was_trained_and_where_it_started(history):
    from rich.console import Console

    from edentune.cycle.cli import print_status

    console = Console(width=250, record=True)
    print_status(status(history.dir), console)
    text = console.export_text()
    line1 = next(line for line in text.splitlines() if line.strip().startswith("2026-01") and "friendly" in line)
    line2 = next(line for line in text.splitlines() if line.strip().startswith("2026-02") and "friendly" in line)
    assert "700+0" in line1 and "688 −12" in line1 and " base " in line1
    assert "700+300" in line2 and "1,000" in line2 and "2026-01" in line2.split("2026-02", 1)[1] and "5.1%" in line2
    assert "against the original base" in text and "dropped, longer than max_seq_len" in text


def test_status_reads_while_a_writer_holds_a_transaction(history):
    writer = sqlite3.connect(history.registry_path, timeout=1)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO rounds (id, seq, created, status, config_json) VALUES ('2026-05', 99, 'now', 'running', '{}')")
    try:
        table = status(history.dir)  # does not wait for the writer (WAL) and sees only committed rows
        assert "2026-05" not in {r.round_id for r in table.rows} and len(table.rows) == 7
    finally:
        writer.rollback()
        writer.close()


def test_html_report_has_a_plot_and_the_numbers_per_trend(history, tmp_path):
    path = write_html(status(history.dir), tmp_path / "out" / "report.html")
    text = path.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) == len(TRENDS)
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    for number in ("2.3456", "2.1234", "3.9876", "81.0%", "86.0%", "75.0%", "3.0%", "50.0%", "5.1%", "round 2026-01", "sft 61.25"):
        assert number in text
    assert "refused: validation loss 3.9876 is not below the live round&#x27;s 2.1234 [worse]" in text
    assert "● live" in text


def test_html_without_metrics_and_bad_paths(tmp_path):
    ws = init_workspace(tmp_path / "ws")
    text = render_html(status(ws.dir))
    assert text.count("no values yet") == len(TRENDS) and "<img" not in text
    with pytest.raises(EdentuneError, match="is a folder"):
        write_html(status(ws.dir), tmp_path)
    with pytest.raises(EdentuneError, match="inside the cycle workspace .*whose files edentune manages"):
        write_html(status(ws.dir), ws.dir / "registry.sqlite")
    with pytest.raises(EdentuneError, match="no registry here"):
        status(tmp_path / "nowhere")
