"""Workspace init/load: the commented cycle.yaml round-trips, bad configs name the key and
change nothing, init never writes into (or deletes) a folder it does not own."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edentune.cycle.workspace import BUNDLED_FORGETTING, init_workspace, load_workspace
from edentune.errors import ConfigError, EdentuneError
from edentune.registry import SHARED, Registry


def test_init_writes_a_commented_config_that_loads_back(tmp_path):
    ws = init_workspace(tmp_path / "ws", model="embedded", personas={"professional": "", "friendly": "eden-chat"})
    text = ws.config_path.read_text()
    assert text.count("\n# ") > 10 and "personas:" in text and "adapter_mode: per_persona" in text
    loaded = load_workspace(tmp_path / "ws")
    assert loaded.config == ws.config
    assert loaded.config.run.preset == "embedded" and loaded.persona_names == ["professional", "friendly"]
    assert loaded.ollama_model("professional") == "eden-professional" and loaded.ollama_model("friendly") == "eden-chat"
    assert {p.name for p in (tmp_path / "ws").iterdir()} >= {"cycle.yaml", "registry.sqlite", "fixed", "replay", "rounds"}
    with Registry(ws.registry_path, readonly=True) as reg:
        assert reg.rounds() == []


def test_round_config_per_persona_and_shared(tmp_path):
    ws = init_workspace(tmp_path / "ws", model="embedded")
    data = yaml.safe_load(ws.config_path.read_text())
    data["personas"] = [{"name": "professional", "system_prompt": "Be formal.", "persona": {"emoji": "allowed"},
                         "select": {"field": "persona", "equals": "professional"}},
                        {"name": "friendly", "system_prompt": "Be warm.", "files": ["mine/friendly.jsonl"]}]
    data["replay"] = {"new_ratio": 0.6, "quotas": {"general": 10}}
    data["ollama"] = {"host": "http://ollama:11434", "base": "qwen2.5:7b"}
    ws.config_path.write_text(yaml.safe_dump(data))
    ws = load_workspace(ws.dir)

    cfg = ws.round_config("2026-01", "professional")
    assert cfg.model.system_prompt == "Be formal." and cfg.persona.emoji == "allowed"
    assert cfg.persona.korean_formality == "jondaetmal"  # not overridden: the template's value
    assert cfg.export.model_name == "eden-professional" and cfg.export.personas == {}
    assert cfg.export.ollama_host == "http://ollama:11434" and cfg.export.ollama_base == "qwen2.5:7b"
    assert Path(cfg.training.output_dir) == ws.dir / "rounds" / "2026-01" / "professional" / "run"
    assert cfg.data.train_files == [str(ws.train_data_path("2026-01", "professional"))]
    assert cfg.data.validation_files == [str(ws.validation_path)] and cfg.data.replay_files == [str(ws.forgetting_path)]
    assert cfg.data.mix.new_ratio == 0.6 and cfg.data.mix.quotas == {"general": 10}
    assert ws.persona_files("friendly") == [ws.dir / "mine" / "friendly.jsonl"] and ws.persona_files("professional") is None
    assert ws.forgetting_sources() == [BUNDLED_FORGETTING] and BUNDLED_FORGETTING.is_file()

    shared = ws.round_config("2026-01", SHARED)
    assert shared.export.personas == {"eden-professional": "Be formal.", "eden-friendly": "Be warm."}
    with pytest.raises(EdentuneError, match="no persona 'nobody'"):
        ws.round_config("2026-01", "nobody")
    with pytest.raises(EdentuneError, match="not usable as a folder name"):
        ws.round_dir("../evil")


@pytest.mark.parametrize("edit, key, message", [
    (lambda d: d["run"]["training"].update(learning_rate=-1), "run.training.learning_rate", "greater than 0"),
    (lambda d: d.update(adapter_mode="both"), "adapter_mode", "'both'"),
    (lambda d: d.update(replay_policy={}), "replay_policy", "unknown key"),
    (lambda d: d.update(personas=[{"name": "a"}, {"name": "a"}]), "personas", "appears twice"),
    (lambda d: d.update(personas=[{"name": "a", "ollama_model": "m"}, {"name": "b", "ollama_model": "m"}]), "personas", "both deploy"),
    (lambda d: d.update(personas=[{"name": "Bad Name"}]), "personas.0.name", "not a usable name"),
    (lambda d: d.update(personas=[{"name": "shared"}]), "personas.0.name", "reserved"),
    (lambda d: d.update(personas=[{"name": "p", "persona": {"emoji": "sometimes"}}]), "personas.0.persona.emoji", "'sometimes'"),
    (lambda d: d["replay"].update(new_ratio=1.5), "replay.new_ratio", "less than or equal to 1"),
])
def test_bad_config_names_the_key_and_changes_nothing(tmp_path, edit, key, message):
    ws = init_workspace(tmp_path / "ws", model="embedded")
    data = yaml.safe_load(ws.config_path.read_text())
    edit(data)
    ws.config_path.write_text(yaml.safe_dump(data))
    before = {p: p.read_bytes() for p in ws.dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:
        load_workspace(ws.dir)
    text = str(err.value)
    assert f"  {key}:" in text and message in text, text
    assert {p: p.read_bytes() for p in ws.dir.rglob("*") if p.is_file()} == before


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such workspace folder"):
        load_workspace(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a cycle workspace"):
        load_workspace(tmp_path)
    ws = init_workspace(tmp_path / "ws")
    ws.config_path.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_workspace(ws.dir)
    ws.config_path.write_text("- a list")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_workspace(ws.dir)


def test_init_refuses_foreign_folders_and_never_deletes(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    for force in (False, True):
        with pytest.raises(EdentuneError, match="not empty and is not a cycle workspace"):
            init_workspace(mine, force=force)
    assert [p.name for p in mine.iterdir()] == ["cat.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdentuneError, match="not a folder"):
        init_workspace(tmp_path / "file")

    ws = init_workspace(tmp_path / "ws", model="embedded")
    with Registry(ws.registry_path) as reg:
        reg.begin_round("2026-01", {})
    with pytest.raises(EdentuneError, match="already a cycle workspace"):
        init_workspace(ws.dir)
    old = ws.config_path.read_text()
    ws2 = init_workspace(ws.dir, model="qwen2.5-7b", force=True)
    assert ws2.config.run.preset == "8b"
    backups = list(ws.dir.glob("cycle.yaml.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == old
    with Registry(ws.registry_path, readonly=True) as reg:
        assert [r.id for r in reg.rounds()] == ["2026-01"]  # the registry is kept
