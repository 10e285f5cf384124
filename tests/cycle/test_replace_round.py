"""Acceptance (ollama.replace + request_format eden): a real round on the embedded model, trained
and evaluated in Garden of Eden V3's request layout, deploys in place of the app's tag on the
labeled Ollama stand-in (original kept, fine-tune FROM it, smoke-checked); `cycle status` notices
an `ollama pull` that put the stock model back; `cycle rollback --original` restores the
original's digest; and redeploying the round onto a tag with another base is refused, leaving
Ollama unchanged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

TAG, BACKUP = "qwen2.5:7b", "qwen2.5:7b-edentune-original"
APP_TEXT = "You are a helpful test assistant.\nAnswer in the user's language."


def _tag_model(model_info: dict) -> dict:
    from edentune.export.modelfile import CHATML_TEMPLATE
    from edentune.models import embedded_gguf_path

    return {TAG: {"gguf": str(embedded_gguf_path()), "template": CHATML_TEMPLATE, "parameters": {"stop": ["<|im_end|>"]},
                  "model_info": model_info, "size": 4_700_000_000, "details": {"parameter_size": "7.6B"}}}


@pytest.mark.slow
def test_a_round_replaces_the_apps_tag_then_rolls_back_and_refuses_a_base_mismatch(tmp_path, make_workspace, cycle_files, short_parity):
    from ollama_standin import OllamaStandIn

    from edentune.cli import app
    from edentune.cycle import rollback
    from edentune.cycle.live import replacement_status, restore_original
    from edentune.cycle.round import run_round
    from edentune.errors import EdentuneError
    from edentune.models import resolve_model_dir

    hf = json.loads((Path(resolve_model_dir("embedded", architecture="llama")) / "config.json").read_text())
    same_shape = {"general.architecture": "llama", "llama.block_count": hf["num_hidden_layers"],
                  "llama.embedding_length": hf["hidden_size"]}
    with OllamaStandIn(_tag_model(same_shape)) as server:
        ws = make_workspace(tmp_path / "ws", server.host, **{
            "ollama.base": TAG, "ollama.replace": TAG,
            "run.export.request_format": "eden", "run.export.eden_system_text": APP_TEXT})
        original = server.digest(TAG)
        result = run_round(ws, [cycle_files["month1"]], round_id="2026-01")
        assert result.status == "accepted", result.units[0].reasons

        # Trained, evaluated and parity-checked in the app's layout.
        unit = ws / "rounds" / "2026-01" / "default"
        export = json.loads((unit / "export" / "export_report.json").read_text())
        assert export["template"]["passed"] and export["template"]["prompts"] >= 1
        settings = json.loads((unit / "eval" / "candidate.json").read_text())["settings"]
        assert settings["request_format"] == "eden" and settings["app_system_text"] == APP_TEXT

        # Deployed in place of the tag: original kept, fine-tune FROM it, smoke-checked.
        assert server.digest(BACKUP) == original
        assert server.models[TAG]["from"] == BACKUP and server.models[TAG]["adapters"]
        (state,) = replacement_status(ws)
        assert state["state"] == "unchanged" and state["tag"] == TAG

        server.models[TAG] = dict(server.models[BACKUP])  # `ollama pull qwen2.5:7b`: the stock model is back
        assert replacement_status(ws)[0]["state"] == "original"
        out = CliRunner().invoke(app, ["cycle", "status", str(ws)])
        assert out.exit_code == 0 and f"WARNING {TAG} is the stock model again" in " ".join(out.output.split())

        rollback(ws, to_round="2026-01")  # an earlier round again: redeployed FROM the kept original
        assert server.models[TAG]["from"] == BACKUP and server.digest(TAG) != original
        rec = restore_original(ws)
        assert server.digest(TAG) == original == rec["digest"]
        assert replacement_status(ws)[0]["state"] == "unchanged"  # the original, as the rollback recorded

    # The same round onto an app tag whose weights are another model (the real 7B's shape).
    other = {"general.architecture": "qwen2", "qwen2.block_count": 28, "qwen2.embedding_length": 3584}
    with OllamaStandIn(_tag_model(other)) as server:
        before = json.dumps(server.models, sort_keys=True)
        shapes = f"architecture qwen2 vs llama, layers 28 vs {hf['num_hidden_layers']}, hidden size 3584 vs {hf['hidden_size']}"
        with pytest.raises(EdentuneError, match=rf"its base differs from the one the adapter was trained on \({shapes}\)"):
            rollback(ws, to_round="2026-01", host=server.host)
        assert json.dumps(server.models, sort_keys=True) == before
        assert not [p for m, p in server.requests if p in ("/api/create", "/api/copy", "/api/delete")]


def test_cycle_rollback_and_status_with_ollama_replace(tiny_qwen2_dir, tmp_path):
    """The cycle's side without training: a workspace with ollama.replace and one accepted round
    (a real export) is made live through `cycle rollback --to` in place of the tag, `cycle status`
    reports the tag's digest state (also in --json), and `--original` puts the stock model back."""
    import importlib.util

    from ollama_standin import OllamaStandIn

    from edentune.cli import app
    from edentune.config import render_config_yaml
    from edentune.cycle import rollback
    from edentune.cycle.workspace import init_workspace, load_workspace
    from edentune.export import export_adapter
    from edentune.export.api import base_model_dir, smoke_base_gguf
    from edentune.export.modelfile import CHATML_TEMPLATE
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))  # gate_results, as tests/cycle/test_rollback.py
    from gate_results import scored_comparison

    spec = importlib.util.spec_from_file_location("export_conftest", Path(__file__).resolve().parents[1] / "export" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    init_workspace(tmp_path / "ws", model=tiny_qwen2_dir)
    data = yaml.safe_load((tmp_path / "ws" / "cycle.yaml").read_text())
    data["ollama"].update(replace=TAG, base=TAG)  # as a user edits cycle.yaml
    (tmp_path / "ws" / "cycle.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    ws = load_workspace(tmp_path / "ws")
    assert ws.ollama_model("default") == TAG
    cfg = ws.round_config("2026-01", "default")
    assert cfg.export.replace == TAG and cfg.export.ollama_base == TAG
    hf = json.loads((Path(tiny_qwen2_dir) / "config.json").read_text())
    shape = {"general.architecture": "qwen2", "qwen2.block_count": hf["num_hidden_layers"], "qwen2.embedding_length": hf["hidden_size"]}
    models = {TAG: {"gguf": str(smoke_base_gguf(cfg, base_model_dir(cfg))), "template": CHATML_TEMPLATE, "model_info": shape}}
    with ws.open_registry() as reg:
        reg.begin_round("2026-01", {})
        ws.round_dir("2026-01", "default").mkdir(parents=True)
        ws.frozen_config_path("2026-01", "default").write_text(render_config_yaml(cfg))
        export = export_adapter(cfg, mod.make_adapter(tiny_qwen2_dir, tmp_path / "ad"), ws.export_dir("2026-01", "default"), verify=False)
        # real results files and a real compare: the gate re-derives its verdict from them (export/gate.py)
        scored_comparison(ws.eval_dir("2026-01", "default"), export.report["adapter_sha256"], cfg=cfg)
        reg.set_run("2026-01", "default", status="accepted", export_dir=str(export.out_dir))
        reg.finish_round("2026-01", "accepted")
    runner = CliRunner()
    with OllamaStandIn(models) as server:
        original = server.digest(TAG)
        (rec,) = rollback(ws.dir, to_round="2026-01", host=server.host)
        assert rec["model"] == TAG and server.models[TAG]["from"] == BACKUP and server.digest(BACKUP) == original
        out = runner.invoke(app, ["cycle", "status", str(ws.dir), "--json"])
        assert out.exit_code == 0 and [r["state"] for r in json.loads(out.output)["replaced"]] == ["unchanged"]

        server.models[TAG]["parameters"] = {"num_ctx": 2048}  # someone changed the tag behind the cycle's back
        out = runner.invoke(app, ["cycle", "status", str(ws.dir)])
        assert f"WARNING {TAG} changed since the cycle deployed it" in " ".join(out.output.split())

        out = runner.invoke(app, ["cycle", "rollback", str(ws.dir), "--original", "--host", server.host])
        assert out.exit_code == 0, out.output
        assert server.digest(TAG) == original and f"{TAG} is the original again" in " ".join(out.output.split())
    out = runner.invoke(app, ["cycle", "status", str(ws.dir)])  # Ollama gone: said, not an error
    assert out.exit_code == 0 and f"replaced: {TAG} not checked (cannot reach Ollama" in " ".join(out.output.split())


def test_replace_with_several_personas_is_a_config_error(tmp_path):
    from edentune.cycle.workspace import init_workspace, load_workspace
    from edentune.errors import EdentuneError

    init_workspace(tmp_path / "ws", model="embedded", personas={"formal": "", "friendly": ""})
    data = yaml.safe_load((tmp_path / "ws" / "cycle.yaml").read_text())
    data["ollama"]["replace"] = TAG
    (tmp_path / "ws" / "cycle.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    with pytest.raises(EdentuneError, match=f"ollama.replace publishes one model under {TAG}: keep one persona"):
        load_workspace(tmp_path / "ws")
