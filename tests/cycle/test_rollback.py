"""`cycle rollback`: any earlier accepted round becomes live again in Ollama (checked against the
labeled Ollama stand-in), recorded in the registry; refused rounds, vanished exports and a
stopped Ollama are clear errors that change neither Ollama nor the registry."""

from __future__ import annotations

import hashlib
import json
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from edentune.config import render_config_yaml
from edentune.cycle import rollback
from edentune.cycle.workspace import init_workspace, load_workspace
from edentune.errors import EdentuneError
from edentune.export import export_adapter
from edentune.export.api import base_model_dir, smoke_base_gguf
from edentune.export.modelfile import CHATML_TEMPLATE
from edentune.io import write_json_atomic
from edentune.registry import SHARED

EXPORT_TESTS = Path(__file__).resolve().parents[1] / "export"
sys.path.insert(0, str(EXPORT_TESTS))  # ollama_standin
from gate_results import scored_comparison  # noqa: E402
from ollama_standin import OllamaStandIn  # noqa: E402

BASE = {"qwen2.5:14b": {"parameters": {"stop": ["<|im_start|>", "<|im_end|>"]}}}


def _make_adapter():
    # The export tests' adapter factory (random non-zero LoRA B), loaded by path: "conftest" is
    # not a unique module name across test folders.
    spec = importlib.util.spec_from_file_location("export_tests_conftest", EXPORT_TESTS / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_adapter


@pytest.fixture(scope="module")
def months(tiny_qwen2_dir, tmp_path_factory):
    """A workspace with 2026-01 and 2026-02 accepted (each with a real export), 2026-03 refused; 02 is live."""
    make_adapter = _make_adapter()
    tmp = tmp_path_factory.mktemp("rollback")
    ws = init_workspace(tmp / "ws", model=tiny_qwen2_dir)
    # The stand-in answers /api/chat from the same base GGUF deploy's smoke check reads, so the
    # check after each (re)deploy is real.
    cfg0 = ws.round_config("2026-01", "default")
    BASE["qwen2.5:14b"].update(gguf=str(smoke_base_gguf(cfg0, base_model_dir(cfg0))), template=CHATML_TEMPLATE)
    digests = {}
    with ws.open_registry() as reg:
        for seed, (round_id, st) in enumerate([("2026-01", "accepted"), ("2026-02", "accepted"), ("2026-03", "refused")]):
            reg.begin_round(round_id, {})
            cfg = ws.round_config(round_id, "default")
            ws.round_dir(round_id, "default").mkdir(parents=True)
            ws.frozen_config_path(round_id, "default").write_text(render_config_yaml(cfg))
            if st == "accepted":
                export = export_adapter(cfg, make_adapter(tiny_qwen2_dir, tmp / f"adapter-{round_id}", seed=seed),
                                        ws.export_dir(round_id, "default"), verify=False)
                digests[round_id] = export.report["adapter_sha256"]
                scored_comparison(ws.eval_dir(round_id, "default"), digests[round_id], cfg=cfg)
                reg.set_run(round_id, "default", status="accepted", export_dir=str(export.out_dir))
                reg.set_live("default", round_id, "eden:latest")
            else:
                reg.set_run(round_id, "default", status="refused", reasons=["persona adherence fell 40% -> 10%"])
            reg.finish_round(round_id, st)
    return ws, digests


def _adapter_blob(ws, round_id: str) -> str:
    return "sha256:" + hashlib.sha256((ws.export_dir(round_id, "default") / "adapter.gguf").read_bytes()).hexdigest()


def _live(ws):
    with ws.open_registry(readonly=True) as reg:
        return reg.live("default").round_id, len(reg.events())


def test_rollback_to_the_previous_then_any_accepted_round(months):
    ws, _ = months
    with OllamaStandIn(BASE) as server:
        recs = rollback(ws.dir, host=server.host)  # default: the accepted round before the live one
        assert [(r["persona"], r["round_id"], r["from_round"]) for r in recs] == [("default", "2026-01", "2026-02")]
        assert server.models["eden:latest"]["adapters"] == {"adapter.gguf": _adapter_blob(ws, "2026-01")}
        with ws.open_registry(readonly=True) as reg:
            assert reg.live("default").round_id == "2026-01"
            event = reg.events()[-1]
            assert event.kind == "rollback" and event.round_id == "2026-01" and event.detail["from_round"] == "2026-02"

        rollback(ws.dir, to_round="2026-02", host=server.host)
        assert server.models["eden:latest"]["adapters"] == {"adapter.gguf": _adapter_blob(ws, "2026-02")}
        assert _live(ws)[0] == "2026-02"


@pytest.mark.parametrize("to_round, message", [("2026-03", r"was refused for default \(persona adherence fell"),
                                               ("1999-12", "no round '1999-12'")])
def test_refused_or_unknown_round_changes_nothing(months, to_round, message):
    ws, _ = months
    before = _live(ws)
    with OllamaStandIn(BASE) as server:
        with pytest.raises(EdentuneError, match=message):
            rollback(ws.dir, to_round=to_round, host=server.host)
        assert server.requests == []
    assert _live(ws) == before


def test_renamed_ollama_model_is_refused_before_ollama_is_touched(months):
    ws, _ = months
    before, text = _live(ws), ws.config_path.read_text()
    try:
        ws.config_path.write_text(text.replace("- name: default", "- name: default\n  ollama_model: eden-new"))
        with OllamaStandIn(BASE) as server:
            with pytest.raises(EdentuneError, match="has no Ollama model eden-new for persona default"):
                rollback(ws.dir, to_round="2026-01", host=server.host)
            assert server.requests == []
    finally:
        ws.config_path.write_text(text)
    assert _live(ws) == before


def test_gate_is_rechecked_against_the_export(months, tmp_path):
    ws, digests = months
    before = _live(ws)
    comparison = ws.eval_dir("2026-01", "default") / "comparison.json"
    original = comparison.read_bytes()
    try:
        # The export folder now holds another adapter than the one the comparison scored.
        write_json_atomic(comparison, {**json.loads(original), "candidate_adapter_sha256": digests["2026-02"]})
        with OllamaStandIn(BASE) as server:
            with pytest.raises(EdentuneError, match="scored adapter"):
                rollback(ws.dir, to_round="2026-01", host=server.host)
            comparison.unlink()
            with pytest.raises(EdentuneError, match="deploy gate cannot be re-checked"):
                rollback(ws.dir, to_round="2026-01", host=server.host)
            assert server.requests == []
    finally:
        comparison.write_bytes(original)
    assert _live(ws) == before


def test_vanished_export_and_stopped_ollama_change_nothing(months, tmp_path):
    ws, _ = months
    before = _live(ws)
    export = ws.export_dir("2026-01", "default")
    shutil.move(export, tmp_path / "moved")
    try:
        with OllamaStandIn(BASE) as server:
            with pytest.raises(EdentuneError, match="export of round 2026-01 .* is gone"):
                rollback(ws.dir, to_round="2026-01", host=server.host)
            assert server.requests == []
    finally:
        shutil.move(tmp_path / "moved", export)
    with OllamaStandIn(BASE) as server:
        host = server.host  # closed after the block
    with pytest.raises(EdentuneError, match="cannot reach Ollama"):
        rollback(ws.dir, to_round="2026-01", host=host)
    assert _live(ws) == before


def test_shared_adapter_mode_rolls_back_every_persona_with_one_export(tiny_qwen2_dir, tmp_path):
    make_adapter = _make_adapter()
    ws = init_workspace(tmp_path / "ws", model=tiny_qwen2_dir, personas={"professional": "", "friendly": ""})
    ws.config_path.write_text(ws.config_path.read_text().replace("adapter_mode: per_persona", "adapter_mode: shared"))
    ws = load_workspace(ws.dir)
    with ws.open_registry() as reg:
        for seed, round_id in enumerate(["2026-01", "2026-02"]):
            reg.begin_round(round_id, {})
            export = export_adapter(ws.round_config(round_id, SHARED), make_adapter(tiny_qwen2_dir, tmp_path / f"a{seed}", seed=seed),
                                    ws.export_dir(round_id, SHARED), verify=False)
            scored_comparison(ws.eval_dir(round_id, SHARED), export.report["adapter_sha256"], cfg=ws.round_config(round_id, SHARED))
            reg.set_run(round_id, SHARED, status="accepted", export_dir=str(export.out_dir))
            for p in ws.persona_names:
                reg.set_live(p, round_id, ws.ollama_model(p))
            reg.finish_round(round_id, "accepted")
    with OllamaStandIn(BASE) as server:
        recs = rollback(ws.dir, host=server.host)
        assert sorted((r["persona"], r["round_id"]) for r in recs) == [("friendly", "2026-01"), ("professional", "2026-01")]
        assert sum(path == "/api/create" for _, path in server.requests) == 2  # one export deployed once: a model per persona
        blob = "sha256:" + hashlib.sha256((ws.export_dir("2026-01", SHARED) / "adapter.gguf").read_bytes()).hexdigest()
        for p in ws.persona_names:
            assert server.models[f"eden-{p}:latest"]["adapters"] == {"adapter.gguf": blob}
    with ws.open_registry(readonly=True) as reg:
        assert {lv.persona: lv.round_id for lv in reg.live_rows()} == {"friendly": "2026-01", "professional": "2026-01"}


def test_rollback_against_a_trickling_ollama_ends_at_the_deadline_and_changes_nothing(months, trickle_server):
    import os
    import subprocess

    ws, _ = months
    before = _live(ws)
    frozen = ws.frozen_config_path("2026-01", "default")
    original = frozen.read_text(encoding="utf-8")
    assert original.count("ollama_deadline_s: 60.0\n") == 1
    try:
        frozen.write_text(original.replace("ollama_deadline_s: 60.0\n", "ollama_deadline_s: 1.5\n"), encoding="utf-8")
        res = subprocess.run([sys.executable, "-m", "edentune.cli", "cycle", "rollback", str(ws.dir), "--to", "2026-01",
                              "--host", trickle_server.url], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "COLUMNS": "200"})
    finally:
        frozen.write_text(original, encoding="utf-8")
    message = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "did not finish GET /api/version within the deadline of 1.5 s" in message and "export.ollama_deadline_s" in message
    assert _live(ws) == before
