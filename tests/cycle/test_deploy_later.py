"""The bookkeeping of rounds accepted but not deployed (`cycle run --no-deploy`), on a registry
written by hand (no training): which round the next one builds on, what `cycle status` shows, and
`cycle deploy` refusing what it must refuse before Ollama is touched. The whole path, trained and
deployed to the Ollama stand-in, is tests/cycle/test_no_deploy.py."""

from __future__ import annotations

import pytest

from edentune.cycle import status
from edentune.cycle.deploy_later import deploy_round
from edentune.cycle.pending import pending_rounds, standing_round
from edentune.cycle.report import verdict_text, waiting_rounds
from edentune.cycle.workspace import init_workspace
from edentune.errors import EdentuneError


def _round(reg, round_id: str, status_: str, steps=("gate", "export"), **run) -> None:
    reg.begin_round(round_id, {})
    reg.set_run(round_id, "default", status=status_, verdict={"ship": status_ == "accepted"}, **run)
    for step in steps:
        reg.record_step(round_id, "default", step, inputs_sha256="x", outputs={}, detail={})
    reg.finish_round(round_id, status_)


@pytest.fixture
def ws(tmp_path):
    return init_workspace(tmp_path / "ws", model="embedded")


def test_an_undeployed_round_is_what_the_next_one_builds_on(ws):
    with ws.open_registry() as reg:
        assert standing_round(reg, "default") is None  # nothing yet: the base
        _round(reg, "2026-01", "accepted", export_dir=str(ws.export_dir("2026-01", "default")))
        assert pending_rounds(reg) == ["2026-01"] and standing_round(reg, "default") == "2026-01"
        _round(reg, "2026-02", "refused", steps=("gate",))
        assert standing_round(reg, "default") == "2026-01"  # a refused month changes nothing
        _round(reg, "2026-03", "accepted")
        assert pending_rounds(reg) == ["2026-01", "2026-03"] and standing_round(reg, "default") == "2026-03"
        # 2026-03 deployed (its deploy step and live row): it is live and no longer waiting
        reg.record_step("2026-03", "default", "deploy", inputs_sha256="x", outputs={}, detail={})
        reg.set_live("default", "2026-03", "eden:latest")
        assert pending_rounds(reg) == ["2026-01"] and standing_round(reg, "default") == "2026-03"
        # an older undeployed round never comes before the live one
        reg.set_live("default", "2026-01", "eden:latest", event="rollback")
        assert pending_rounds(reg) == [] and standing_round(reg, "default") == "2026-01"


def test_status_shows_accepted_not_deployed(ws):
    with ws.open_registry() as reg:
        _round(reg, "2026-01", "accepted")
        _round(reg, "2026-02", "accepted", steps=("gate", "export", "deploy", "live"))
        reg.set_live("default", "2026-02", "eden:latest")
    table = status(ws.dir)
    rows = {r.round_id: r for r in table.rows}
    assert verdict_text(rows["2026-01"]) == "accepted, not deployed" and not rows["2026-01"].deployed
    assert verdict_text(rows["2026-02"]) == "deployed" and rows["2026-02"].deployed
    assert waiting_rounds(table) == ["2026-01"]
    assert table.to_json()["rows"][0]["deployed"] is False


def test_deploy_refuses_before_ollama_is_touched(ws, tmp_path):
    nowhere = "http://127.0.0.1:9"  # nothing answers: every refusal below comes before a request
    with pytest.raises(EdentuneError, match="is waiting to be deployed"):
        deploy_round(ws.dir, host=nowhere)
    with ws.open_registry() as reg:
        _round(reg, "2026-01", "refused", steps=("gate",), reasons=["validation loss did not improve"])
        _round(reg, "2026-02", "accepted", export_dir=str(tmp_path / "gone"))
        _round(reg, "2026-03", "accepted", steps=("gate", "export", "deploy", "live"))
    with pytest.raises(EdentuneError, match=r"round 2026-01 has nothing to deploy: default: refused \(validation loss did not improve\)"):
        deploy_round(ws.dir, "2026-01", host=nowhere)
    with pytest.raises(EdentuneError, match="round 2026-03 is deployed already") as err:
        deploy_round(ws.dir, "2026-03", host=nowhere)
    assert "cycle rollback" in str(err.value)
    with pytest.raises(EdentuneError, match="no round 'nope'"):
        deploy_round(ws.dir, "nope", host=nowhere)
    # the default is the newest waiting round; its export is gone, so the gate cannot be re-checked
    with pytest.raises(EdentuneError, match="the export of round 2026-02 .* is gone"):
        deploy_round(ws.dir, host=nowhere)
    with ws.open_registry() as reg:
        assert reg.live_rows() == [] and reg.step("2026-02", "default", "deploy") is None
