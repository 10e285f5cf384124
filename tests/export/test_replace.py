"""`deploy --replace TAG` against the labeled Ollama stand-in (Ollama cannot run here): the
original is kept before anything changes, the fine-tune is built FROM that copy (never from the
tag, which carries an adapter after the first round), any failure puts the original back,
`--rollback --replace` restores its digest, a base other than the trained one is refused with
its cost, and an `ollama pull` that undid the replacement is detected by digest."""

from __future__ import annotations

import json

import pytest
from conftest import make_adapter
from ollama_standin import OllamaStandIn

from edentune.config import RunConfig
from edentune.errors import EdentuneError
from edentune.export import export_adapter
from edentune.export.deploy import DeployFailed, deploy, rollback
from edentune.export.modelfile import CHATML_TEMPLATE
from edentune.export.replace import backup_name, replacement_drift

TAG, BACKUP = "qwen2.5:7b", "qwen2.5:7b-edentune-original"
CHANGING = {"/api/create", "/api/copy", "/api/delete"}


def shape(layers: int, hidden: int) -> dict:
    return {"general.architecture": "qwen2", "qwen2.block_count": layers, "qwen2.embedding_length": hidden}


def bases(gguf: str, *, tag_shape=(2, 64)) -> dict:
    """The app's tag (shaped like the tiny Qwen2 the adapter is trained on, unless told) and a bigger base."""
    return {TAG: {"gguf": gguf, "template": CHATML_TEMPLATE, "model_info": shape(*tag_shape), "size": 4_700_000_000,
                  "details": {"parameter_size": "7.6B"}},
            "qwen2.5:14b": {"gguf": gguf, "template": CHATML_TEMPLATE, "model_info": shape(2, 64), "size": 9_000_000_000,
                            "details": {"parameter_size": "14.8B"}}}


@pytest.fixture(scope="module")
def exported(tiny_qwen2_dir, tmp_path_factory):
    from edentune.export.api import base_model_dir, smoke_base_gguf

    tmp = tmp_path_factory.mktemp("replace")
    cfg = RunConfig().updated({"model.name_or_path": tiny_qwen2_dir, "training.output_dir": str(tmp / "run"),
                               "export.ollama_base": TAG})
    first = export_adapter(cfg, make_adapter(tiny_qwen2_dir, tmp / "ad1", seed=1), tmp / "export1", verify=False)
    second = export_adapter(cfg, make_adapter(tiny_qwen2_dir, tmp / "ad2", seed=2), tmp / "export2", verify=False)
    return cfg, first, second, str(smoke_base_gguf(cfg, base_model_dir(cfg)))


def replacing(cfg, tmp_path, **changes):
    return cfg.updated({"export.replace": TAG, "training.output_dir": str(tmp_path / "run"), **changes})


def changes(server):
    return [(m, p) for m, p in server.requests if p in CHANGING]


def test_replace_keeps_the_original_builds_from_it_and_rollback_restores_its_digest(exported, tmp_path):
    cfg, first, second, gguf = exported
    cfg = replacing(cfg, tmp_path)
    with OllamaStandIn(bases(gguf)) as server:
        original = server.digest(TAG)
        rec = deploy(cfg, first.out_dir, host=server.host, smoke=False)[0]  # the smoke check: tests/cycle/test_replace_round.py
        assert rec["model"] == TAG
        assert server.digest(BACKUP) == original  # kept before the fine-tune was created
        assert changes(server)[:2] == [("POST", "/api/copy"), ("POST", "/api/create")]
        assert server.models[TAG]["from"] == BACKUP and server.models[TAG]["adapters"] == {"adapter.gguf": rec["digest"]}
        rep = rec["replace"]
        assert rep["made_backup"] and rep["digest"] == server.digest(TAG) != original and rep["original_digest"] == original
        assert f"ollama pull {TAG}" in rep["warning"] and rep["base_mismatch"] is None

        rec2 = deploy(cfg, second.out_dir, host=server.host, smoke=False)[0]  # next month
        assert server.models[TAG]["from"] == BACKUP  # never FROM the tag, which carries the first adapter
        assert server.models["qwen2.5:7b-previous"]["adapters"] == {"adapter.gguf": rec["digest"]}
        assert server.digest(BACKUP) == original and not rec2["replace"]["made_backup"]
        assert [d["state"] for d in replacement_drift([rec2], host=server.host)] == ["unchanged"]

        restored = rollback(cfg, host=server.host, registry=tmp_path / "registry.sqlite")
        assert restored["restored_from"] == BACKUP and server.digest(TAG) == original == restored["digest"]
        assert [d["state"] for d in replacement_drift([rec2], host=server.host)] == ["original"]


def test_an_ollama_pull_is_detected_and_not_built_upon(exported, tmp_path):
    cfg, first, _, gguf = exported
    cfg = replacing(cfg, tmp_path)
    with OllamaStandIn(bases(gguf)) as server:
        rec = deploy(cfg, first.out_dir, host=server.host, smoke=False)[0]
        server.models[TAG] = dict(server.models[BACKUP])  # `ollama pull` of the same version: the stock model is back
        assert replacement_drift([rec], host=server.host)[0]["state"] == "original"
        server.models[TAG] = dict(server.models[BACKUP], details={"parameter_size": "7.7B"})  # a newer upstream version
        (drift,) = replacement_drift([rec], host=server.host)
        assert drift["state"] == "changed" and drift["recorded_digest"] == rec["replace"]["digest"] != drift["digest"]
        before = json.dumps(server.models, sort_keys=True)
        with pytest.raises(EdentuneError, match=r"neither the original kept as qwen2.5:7b-edentune-original nor an edentune fine-tune"):
            deploy(cfg, first.out_dir, host=server.host, smoke=False)
        assert json.dumps(server.models, sort_keys=True) == before  # the backup was not overwritten
    assert replacement_drift([rec], host=server.host, timeout=1)[0]["state"] == "unknown"  # Ollama gone: not an error


def test_a_failed_replace_puts_the_original_back(exported, tmp_path):
    cfg, first, _, gguf = exported
    with OllamaStandIn(bases(gguf), refuse_adapters=True) as server:
        original = server.digest(TAG)
        with pytest.raises(DeployFailed, match=f"{TAG} restored from {BACKUP}"):
            deploy(replacing(cfg, tmp_path), first.out_dir, host=server.host, smoke=False)
        assert server.digest(TAG) == original


def test_a_tag_already_carrying_an_adapter_without_a_kept_original_is_refused(exported, tmp_path):
    cfg, first, _, gguf = exported
    models = bases(gguf) | {"qwen2.5:7b": {"from": "qwen2.5:14b", "adapters": {"x.gguf": "sha256:" + "0" * 64}}}
    with OllamaStandIn(models) as server:
        with pytest.raises(EdentuneError, match="already carries an adapter and no original is kept"):
            deploy(replacing(cfg, tmp_path), first.out_dir, host=server.host, smoke=False)
        assert changes(server) == []


def test_a_base_mismatch_is_refused_with_its_cost_unless_allowed(exported, tmp_path):
    """An adapter trained for qwen2.5:14b (shaped like it) under the app's 7B tag."""
    cfg, first, _, gguf = exported
    cfg14 = cfg.updated({"export.ollama_base": "qwen2.5:14b"})
    export14 = export_adapter(cfg14, first.report["adapter_dir"], tmp_path / "export14", verify=False)
    with OllamaStandIn(bases(gguf, tag_shape=(1, 32))) as server:
        original = server.digest(TAG)
        with pytest.raises(EdentuneError) as err:
            deploy(replacing(cfg14, tmp_path), export14.out_dir, host=server.host, smoke=False)
        text = str(err.value)
        assert "its base differs from the one the adapter was trained on (trained for qwen2.5:14b, not qwen2.5:7b" in text
        assert "layers 1 vs 2, hidden size 32 vs 64" in text and "--allow-base-mismatch" in text
        assert "14.8B parameters / 9.0 GB" in text and "7.6B parameters / 4.7 GB" in text  # the cost, in numbers
        assert changes(server) == [] and server.digest(TAG) == original

        rec = deploy(replacing(cfg14, tmp_path, **{"export.allow_base_mismatch": True}), export14.out_dir,
                     host=server.host, smoke=False)[0]
        assert server.models[TAG]["from"] == "qwen2.5:14b" and "9.0 GB" in rec["replace"]["cost"]
        assert server.digest(BACKUP) == original

    with OllamaStandIn(bases(gguf, tag_shape=(1, 32))) as server:  # trained "for the tag", but on another model
        with pytest.raises(EdentuneError, match="no base in Ollama fits the adapter"):
            deploy(replacing(cfg, tmp_path, **{"export.allow_base_mismatch": True}), first.out_dir, host=server.host, smoke=False)
        assert changes(server) == []


def test_deploy_cli_replace_says_what_changed_and_how_to_undo(exported, tmp_path):
    from typer.testing import CliRunner

    from edentune.cli import app

    cfg, first, _, gguf = exported
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.updated({"training.output_dir": str(tmp_path / "run")}).model_dump(mode="json")))
    runner = CliRunner()
    with OllamaStandIn(bases(gguf)) as server:
        original = server.digest(TAG)
        out = runner.invoke(app, ["deploy", str(config), "-e", str(first.out_dir), "--host", server.host,
                                  "--no-smoke-check", "--replace", TAG])
        assert out.exit_code == 0, out.output
        said = " ".join(out.output.split())
        assert f"in place of the original {TAG}, kept as {backup_name(TAG)}" in said
        assert f"--rollback --replace {TAG}" in said and f"`ollama pull {TAG}`" in said
        out = runner.invoke(app, ["deploy", str(config), "--rollback", "--replace", TAG, "--host", server.host])
        assert out.exit_code == 0, out.output
        assert server.digest(TAG) == original and f"restored {TAG} from {BACKUP}" in " ".join(out.output.split())
