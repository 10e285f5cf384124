"""A local folder that is not a model, named as the model: one clear error naming what it lacks
(exit 2), in every command that resolves the model, before anything is loaded or written."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from edentune.cli import main

EXPORT_TESTS = Path(__file__).resolve().parent / "export"


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["edentune", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, " ".join((out.out + out.err).split())


@pytest.fixture(scope="module")
def adapter(tiny_qwen2_dir, tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("export_tests_conftest", EXPORT_TESTS / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_adapter(tiny_qwen2_dir, tmp_path_factory.mktemp("adapter") / "ad")


@pytest.fixture
def not_a_model(tmp_path, sample_dir) -> tuple[Path, Path]:
    folder = tmp_path / "emptydir"
    folder.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"name_or_path": str(folder)},
                                  "data": {"train_files": [str(sample_dir / "eden_sample.jsonl")]}}))
    return folder, config


MISSING = "a folder that is not a model: no config.json, no tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model)"


@pytest.mark.parametrize("command", ["plan", "inspect", "eval", "export", "data stats", "cycle init"])
def test_every_command_names_what_the_folder_lacks(monkeypatch, capsys, tmp_path, not_a_model, adapter, sample_dir, command):
    folder, config = not_a_model
    args = {"plan": ["plan", str(config)],
            "inspect": ["inspect", str(config)],
            "eval": ["eval", "-m", "base", "-c", str(config), "-o", str(tmp_path / "results.json")],
            "export": ["export", str(config), "-a", str(adapter), "-o", str(tmp_path / "export")],
            "data stats": ["data", "stats", str(sample_dir / "eden_sample.jsonl"), "--tokenizer", str(folder)],
            "cycle init": ["cycle", "init", str(tmp_path / "ws"), "--model", str(folder)]}[command]
    code, out = run_main(monkeypatch, capsys, *args)
    assert code == 2 and f"model {folder}: {MISSING}" in out and "internal error" not in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emptydir", "run.yaml"]  # nothing written
    assert list(folder.iterdir()) == []


def test_a_config_without_model_type_and_a_tokenizer_only_folder(monkeypatch, capsys, tmp_path, embedded_dir, sample_dir):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    code, out = run_main(monkeypatch, capsys, "data", "stats", str(sample_dir / "eden_sample.jsonl"), "--tokenizer", str(folder))
    assert code == 2 and "config.json names no model_type" in out, out
    # Tokenizer files are enough for counting tokens (not for training).
    (folder / "config.json").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(embedded_dir) / name, folder / name)
    code, out = run_main(monkeypatch, capsys, "data", "stats", str(sample_dir / "eden_sample.jsonl"), "--tokenizer", str(folder))
    assert code in (0, None) and "tokens" in out, out
