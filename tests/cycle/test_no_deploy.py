"""A newcomer's path without Ollama: `cycle init` on the embedded model, `cycle run --no-deploy`
for two months (nothing answers at the Ollama address), `cycle status`, then `cycle deploy` against
the Ollama stand-in. Round 2 builds on round 1 although round 1 was never deployed: it mixes in
round 1's records from the replay buffer, continues its adapter and must beat its validation loss."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import configure
from edentune.cli import app
from edentune.io import file_sha256
from edentune.registry import Registry

runner = CliRunner()


def cli(*args: str):
    res = runner.invoke(app, list(args))
    return res, " ".join(res.output.split())


@pytest.mark.slow
def test_two_months_without_ollama_then_deploy(tmp_path, cycle_files, standin_factory, short_parity):
    from ollama_standin import OllamaStandIn

    with OllamaStandIn() as gone:
        nowhere = gone.host  # closed after the block: no Ollama answers here
    ws = tmp_path / "eden-cycle"
    res, out = cli("cycle", "init", str(ws), "--model", "embedded")
    assert res.exit_code == 0 and "base embedded" in out, out
    configure(ws, cycle_files, nowhere)  # smaller sizes, as a user would edit cycle.yaml

    # without --no-deploy the round refuses to start: Ollama is needed at its end
    res, out = cli("cycle", "run", str(ws), "--new", str(cycle_files["month1"]), "--round", "2026-01")
    assert res.exit_code != 0 and f"cannot reach Ollama at {nowhere}" in str(res.exception)

    res, out = cli("cycle", "run", str(ws), "--new", str(cycle_files["month1"]), "--round", "2026-01", "--no-deploy")
    assert res.exit_code == 0, out
    assert "round 2026-01: accepted" in out and f"edentune cycle deploy {ws} --round 2026-01" in out
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        steps = [s.step for s in reg.list_steps("2026-01")]
        assert steps[-2:] == ["gate", "export"] and "deploy" not in steps
        assert reg.live_rows() == [] and reg.run("2026-01", "default").status == "accepted"
        r1_val = reg.run("2026-01", "default").metrics["val_loss"]
    assert (ws / "rounds/2026-01/default/export/adapter.gguf").is_file()

    res, out = cli("cycle", "run", str(ws), "--new", str(cycle_files["month2"]), "--round", "2026-02", "--no-deploy")
    assert res.exit_code == 0, out
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        mix = reg.step("2026-02", "default", "mix").detail
        assert mix["ratio"] == 0.7 and mix["sources"].get("2026-01/default", 0) > 0  # round 1's replay records
        assert reg.step("2026-02", "default", "sft").detail["init_adapter"].endswith("2026-01/default/run/adapter")
        assert reg.step("2026-02", "default", "evaluate").detail["baseline"] == "live round 2026-01"
        r2 = reg.run("2026-02", "default")
        gate = json.loads((ws / "rounds/2026-02/default/eval/gate.json").read_text(encoding="utf-8"))
        assert gate["live_val_loss"] == pytest.approx(r1_val)  # the gate judged round 2 against round 1
        assert r2.status in ("accepted", "refused") and (r2.status == "accepted") == gate["ship"]
        assert reg.live_rows() == []
    newest = "2026-02" if r2.status == "accepted" else "2026-01"

    res, out = cli("cycle", "status", str(ws))
    assert res.exit_code == 0, out
    assert "accepted, not deployed" in out and f"edentune cycle deploy {ws} --round {newest}" in out
    res, out = cli("cycle", "status", str(ws), "--json")
    rows = {r["round_id"]: r for r in json.loads(res.output)["rows"]}
    assert rows["2026-01"]["deployed"] is False and rows["2026-01"]["status"] == "accepted"

    # deploy: by default the newest accepted round, its gate re-checked, to the stand-in
    server = standin_factory()
    res, out = cli("cycle", "deploy", str(ws), "--host", server.host)
    assert res.exit_code == 0, out
    assert f"round {newest} (default) live at {server.host}: eden" in out
    digest = "sha256:" + file_sha256(ws / "rounds" / newest / "default" / "export" / "adapter.gguf")
    assert server.models["eden:latest"]["adapters"] == {"adapter.gguf": digest}
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert [(lv.persona, lv.round_id, lv.model) for lv in reg.live_rows()] == [("default", newest, "eden")]
        assert [s.step for s in reg.list_steps(newest)][-2:] == ["deploy", "live"]
        smoke = reg.step(newest, "default", "deploy").detail["records"][0]["smoke"]
        assert smoke["status"] in ("passed", "inconclusive")
    res, out = cli("cycle", "status", str(ws), "--json")
    rows = {r["round_id"]: r for r in json.loads(res.output)["rows"]}
    assert rows[newest]["deployed"] is True and rows[newest]["live_for"] == ["default"]

    # the same round again: refused, nothing changes in Ollama
    created = len(server.create_requests)
    res, out = cli("cycle", "deploy", str(ws), "--round", newest, "--host", server.host)
    assert res.exit_code != 0 and f"round {newest} is deployed already" in str(res.exception)
    assert len(server.create_requests) == created
