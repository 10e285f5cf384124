"""Deploy against a stand-in Ollama server (Ollama cannot run here): create, confirm the adapter
through /api/show, keep and restore the previous model, clear errors when Ollama is down or the
base is not pulled."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import make_adapter
from ollama_standin import OllamaStandIn
from qwen25_template import QWEN25_OLLAMA_TEMPLATE

from edentune.config import RunConfig
from edentune.errors import EdentuneError
from edentune.export import export_adapter
from edentune.export.deploy import deploy, rollback
from edentune.export.modelfile import CHATML_TEMPLATE, STOP_TOKENS

QWEN_BASE = {"qwen2.5:14b": {"template": QWEN25_OLLAMA_TEMPLATE, "parameters": {"stop": ["<|im_start|>", "<|im_end|>"]}}}


@pytest.fixture(scope="module")
def exported(tiny_qwen2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    cfg = RunConfig()
    cfg.model.name_or_path = tiny_qwen2_dir
    cfg.training.output_dir = str(tmp / "run")
    result = export_adapter(cfg, make_adapter(tiny_qwen2_dir, tmp / "ad"), tmp / "export", verify=False)
    return cfg, result


def test_deploy_creates_confirms_and_rolls_back(exported):
    cfg, result = exported
    with OllamaStandIn(QWEN_BASE) as server:
        first = deploy(cfg, result.out_dir, host=server.host)[0]
        model = server.models["eden:latest"]
        assert model["adapters"] == {"adapter.gguf": first["adapter.gguf"]} and model["from"] == "qwen2.5:14b"
        assert model["system"] == cfg.model.system_prompt
        assert model["parameters"]["stop"] == list(STOP_TOKENS) and model["parameters"]["num_ctx"] == cfg.export.num_ctx
        assert model["template"] == QWEN25_OLLAMA_TEMPLATE  # the base's template already matches training
        assert first["previous"] is None and first["adapter.gguf"] in server.blobs

        server.models["eden:latest"]["system"] = "the old persona"  # make the current model recognisable
        second = deploy(cfg, result.out_dir, host=server.host)[0]
        assert second["previous"] == "eden:previous"
        assert server.models["eden:previous"]["system"] == "the old persona"
        assert server.models["eden:latest"]["system"] == cfg.model.system_prompt

        restored = rollback(cfg, host=server.host)
        assert restored["restored_from"] == "eden:previous"
        assert server.models["eden:latest"]["system"] == "the old persona"
    history = json.loads((Path(cfg.training.output_dir) / "deployments.json").read_text())
    assert [h["action"] for h in history] == ["deploy", "deploy", "rollback"]


def test_base_with_another_template_gets_edentune_chatml(exported):
    cfg, result = exported
    other = {"qwen2.5:14b": {"template": "{{ .System }}USER: {{ .Prompt }} ASSISTANT:"}}
    with OllamaStandIn(other) as server:
        deploy(cfg, result.out_dir, host=server.host, registry=Path(cfg.training.output_dir) / "other.json")
        assert server.models["eden:latest"]["template"] == CHATML_TEMPLATE


def test_missing_base_is_an_error_not_a_silent_pull(exported):
    cfg, result = exported
    with OllamaStandIn({}) as server:
        with pytest.raises(EdentuneError, match=r"base model 'qwen2.5:14b' is not in Ollama") as err:
            deploy(cfg, result.out_dir, host=server.host)
        assert "ollama pull qwen2.5:14b" in str(err.value)
        assert not any(path == "/api/create" for _, path in server.requests)


def test_ollama_not_running(exported):
    cfg, result = exported
    with OllamaStandIn() as server:
        host = server.host  # the port is closed after the block
    with pytest.raises(EdentuneError, match="cannot reach Ollama") as err:
        deploy(cfg, result.out_dir, host=host)
    assert "ollama serve" in str(err.value)
    with pytest.raises(EdentuneError, match="cannot reach Ollama"):
        rollback(cfg, host=host)


def test_rollback_without_previous(exported):
    cfg, _ = exported
    with OllamaStandIn(QWEN_BASE) as server, pytest.raises(EdentuneError, match="no previous version of eden:latest"):
        rollback(cfg, host=server.host)


def test_standin_follows_the_documented_api():
    with OllamaStandIn(QWEN_BASE) as server:
        bad = httpx.post(f"{server.host}/api/blobs/sha256:{'0' * 64}", content=b"data")
        assert bad.status_code == 400
        legacy = httpx.post(f"{server.host}/api/create", json={"model": "x", "modelfile": "FROM qwen2.5:14b"})
        assert legacy.status_code == 400 and "modelfile" in legacy.json()["error"]
        streamed = httpx.post(f"{server.host}/api/create", json={"model": "x", "from": "qwen2.5:14b"})
        assert [json.loads(line)["status"] for line in streamed.text.splitlines()][-1] == "success"
        assert httpx.request("DELETE", f"{server.host}/api/delete", json={"model": "x"}).status_code == 200


def test_personas_and_host_from_the_config(exported, tmp_path, monkeypatch):
    """`export.personas` gives one Ollama model per persona on the same adapter; `export.ollama_host`
    is used when no --host is given (and wins over $OLLAMA_HOST)."""
    base_cfg, _ = exported
    personas = {"eden": base_cfg.model.system_prompt, "eden-formal:v2": "You are Eden. Always answer formally."}
    cfg = base_cfg.updated({"export.personas": personas, "training.output_dir": str(tmp_path / "run")})
    result = export_adapter(cfg, make_adapter(cfg.model.name_or_path, tmp_path / "ad"), tmp_path / "export", verify=False)
    assert set(result.modelfiles) == set(personas)
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")  # nothing listens there: must not be used
    with OllamaStandIn(QWEN_BASE) as server:
        records = deploy(cfg.updated({"export.ollama_host": server.host}), result.out_dir)
        assert {r["model"] for r in records} == {"eden:latest", "eden-formal:v2"}
        assert server.models["eden:latest"]["system"] == personas["eden"]
        assert server.models["eden-formal:v2"]["system"] == personas["eden-formal:v2"]
        assert server.models["eden-formal:v2"]["adapters"] == server.models["eden:latest"]["adapters"]


def test_a_persona_without_a_prompt_is_a_config_error():
    from edentune.config import parse_config
    from edentune.errors import ConfigError

    with pytest.raises(ConfigError, match="persona 'eden-ko'"):
        parse_config({"export": {"personas": {"eden-ko": "  "}}})


def write_comparison(path: Path, ship: bool, sha: str | None) -> Path:
    """The part of `edentune compare`'s comparison.json the gate reads (the full file is tested in tests/evaluate)."""
    path.write_text(json.dumps({"ship": ship, "reasons": [] if ship else ["Persona adherence is worse (1 → 0.5)"],
                                "candidate_adapter_sha256": sha}))
    return path


def test_deploy_gate_ships_only_a_better_model_and_only_this_adapter(exported, tmp_path):
    from edentune.io import file_sha256

    cfg, result = exported
    sha = json.loads(result.report_path.read_text())["adapter_sha256"]
    assert sha == file_sha256(Path(result.report["adapter_dir"]) / "adapter_model.safetensors")
    cfg = cfg.updated({"training.output_dir": str(tmp_path / "run")})
    with OllamaStandIn(QWEN_BASE) as server:
        with pytest.raises(EdentuneError, match="not deploying: the comparison says .*Persona adherence is worse"):
            deploy(cfg, result.out_dir, host=server.host, gate=write_comparison(tmp_path / "worse.json", False, sha))
        with pytest.raises(EdentuneError, match="not deploying: .* scored adapter 000000000000"):
            deploy(cfg, result.out_dir, host=server.host, gate=write_comparison(tmp_path / "other.json", True, "0" * 64))
        with pytest.raises(EdentuneError, match="not a comparison.json"):
            deploy(cfg, result.out_dir, host=server.host, gate=tmp_path / "missing.json")
        assert "eden:latest" not in server.models and not (tmp_path / "run" / "deployments.json").exists()

        (record,) = deploy(cfg, result.out_dir, host=server.host, gate=write_comparison(tmp_path / "ok.json", True, sha))
        assert "eden:latest" in server.models and record["gate"] == {"comparison": str(tmp_path / "ok.json"), "adapter_sha256": sha}
