"""The post-deploy smoke check, for real: an adapter exported from the embedded SmolLM2 is deployed
to the stand-in, which answers /api/chat through llama-cpp-python from the created model's files
(the embedded GGUF as the base, the uploaded adapter blob as a LoRA); deploy compares that answer
with llama.cpp's on the exported files. A stand-in that silently drops the adapter fails the check
and the previous model comes back; a stand-in that refuses adapters gets the merged model or a
clear error."""

from __future__ import annotations

import shutil

import pytest
from conftest import embedded_cfg, make_adapter
from ollama_standin import OllamaStandIn

from edentune.errors import EdentuneError
from edentune.export.deploy import SMOKE_PROMPT, DeployFailed, deploy, judge_smoke
from edentune.export.modelfile import CHATML_TEMPLATE
from edentune.models import embedded_gguf_path
from edentune.registry import Registry


@pytest.fixture(scope="module")
def embedded_export(embedded_dir, tmp_path_factory):
    from edentune.export import export_adapter

    tmp = tmp_path_factory.mktemp("smoke")
    cfg = embedded_cfg("llama", tmp).updated({"export.ollama_base": "smollm2:135m"})
    adapter = make_adapter(embedded_dir, tmp / "ad")
    return cfg, adapter, export_adapter(cfg, adapter, tmp / "export", verify=False).out_dir


def base_models() -> dict:
    """What the stand-in serves for FROM smollm2:135m: the embedded model's own GGUF."""
    return {"smollm2:135m": {"gguf": str(embedded_gguf_path()), "template": CHATML_TEMPLATE, "parameters": {"stop": ["<|im_end|>"]}}}


def test_smoke_check_passes_on_a_correct_deploy(embedded_export):
    cfg, _, export_dir = embedded_export
    with OllamaStandIn(base_models()) as server:
        (record,) = deploy(cfg, export_dir, host=server.host)
        assert ("POST", "/api/chat") in server.requests
    smoke = record["smoke"]
    assert smoke["status"] == "passed" and smoke["prompt"] == SMOKE_PROMPT
    assert smoke["answer"] == smoke["expected"] != smoke["without_adapter"]  # the adapter changes the answer, and it was applied
    assert record["status"] == "live" and record["route"] == "adapter"


def test_a_dropped_adapter_fails_the_smoke_check_and_restores_the_previous_model(embedded_export, tmp_path):
    cfg, _, export_dir = embedded_export
    registry = tmp_path / "registry.sqlite"
    with OllamaStandIn(base_models(), drop_adapters=True) as server:
        with pytest.raises(DeployFailed, match="smoke check failed for eden:latest: .*adapter was not applied.*eden:latest removed"):
            deploy(cfg, export_dir, host=server.host)
        assert "eden:latest" not in server.models  # a first deploy that fails leaves no model behind

        server.models["eden:latest"] = {"from": "smollm2:135m", "system": "the old persona", "template": CHATML_TEMPLATE,
                                        "parameters": {"stop": ["<|im_end|>"]}}
        with pytest.raises(DeployFailed, match="smoke check failed for eden:latest") as err:
            deploy(cfg, export_dir, host=server.host, registry=registry)
        assert "eden:latest restored from eden:previous" in str(err.value)
        assert server.models["eden:latest"]["system"] == "the old persona" and not server.models["eden:latest"].get("adapters")
    with Registry(registry, readonly=True) as reg:
        (event,) = reg.events()  # the failed attempt is on record too
    (record,) = event.detail["records"]
    assert event.kind == "error" and event.model == "eden:latest" and event.detail["error"] == record["error"]
    assert record["status"] == "rolled back" and record["smoke"]["status"] == "failed"
    assert record["smoke"]["answer"] == record["smoke"]["without_adapter"]
    assert record["restored"] == "restored from eden:previous"


def test_an_ollama_that_refuses_adapters_is_a_clear_error(embedded_export):
    cfg, _, export_dir = embedded_export
    with OllamaStandIn(base_models(), refuse_adapters=True) as server:
        with pytest.raises(EdentuneError, match="refused the GGUF adapter for eden:latest") as err:
            deploy(cfg, export_dir, host=server.host, smoke=False)
        assert "edentune export --merged" in str(err.value)
        assert "eden:latest" not in server.models


def test_an_ollama_that_refuses_adapters_gets_the_merged_model_when_the_export_has_one(embedded_export, tmp_path):
    from edentune.export import export_merged

    cfg, adapter, export_dir = embedded_export
    both = tmp_path / "export"
    shutil.copytree(export_dir, both)
    merged = export_merged(cfg, adapter, tmp_path / "merged", verify=False, dtype="f16")
    shutil.copy(merged.gguf, both / "model.gguf")
    with OllamaStandIn(base_models(), refuse_adapters=True) as server:
        (record,) = deploy(cfg, both, host=server.host)
        created = server.models["eden:latest"]
        assert created["files"] == {"model.gguf": record["digest"]} and not created.get("adapters")
        assert all("quantize" not in req for req in server.create_requests)
    assert record["route"] == "merged" and record["from"] == "./model.gguf"
    assert record["smoke"]["status"] == "passed", record["smoke"]


@pytest.mark.parametrize(
    ("answer", "with_adapter", "without", "status"),
    [
        ("Hello, I am Eden.", "Hello, I am Eden.", "Hello there, friend", "passed"),
        ("Hello, I am Eden and I lo", "Hello, I am Eden and I like red", "Hello there, friend", "passed"),  # drifts later: quantized base
        ("Hello there, friend", "Hello, I am Eden.", "Hello there, friend", "failed"),  # adapter not applied
        ("Hello there, fr", "Hello, I am Eden.", "Hello there, friend", "failed"),
        ("Bonjour! Je suis", "Hello, I am Eden.", "Hello there, friend", "failed"),  # wrong template
        ("Hi, I am Eden.", "Hello, I am Eden.", "Hello there, friend", "passed"),  # departed early, still the adapter's answer
        ("anything", "Same answer", "Same answer", "inconclusive"),
        ("", "Hello", "Hi", "failed"),
    ],
)
def test_judge_smoke(answer, with_adapter, without, status):
    got, reason = judge_smoke(answer, with_adapter, without)
    assert got == status, reason
