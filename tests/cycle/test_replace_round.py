"""Acceptance (ollama.replace + request_format eden): a real round on the embedded model, trained
and evaluated in Garden of Eden V3's request layout, deploys in place of the app's tag on the
labeled Ollama stand-in (original kept, fine-tune FROM it, smoke-checked); `cycle status` notices
an `ollama pull` that put the stock model back; `cycle rollback --original` restores the
original's digest; and redeploying the round onto a tag with another base is refused, leaving
Ollama unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
