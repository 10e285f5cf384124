"""Run configuration: presets, validation messages naming the key, range warnings, init round-trip."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from edentune.cli import app
from edentune.config import config_for_model, load_config, parse_config, render_config_yaml
from edentune.errors import ConfigError
from edentune.presets import ALL_PROJECTIONS, PRESETS


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "run.yaml")
    return str(exc.value)


def test_unknown_key_is_named():
    msg = _error({"lora": {"rank": 16}})
    assert "lora.rank: unknown key" in msg


def test_wrong_type_is_named():
    msg = _error({"training": {"learning_rate": "fast"}})
    assert "training.learning_rate" in msg and "number" in msg


@pytest.mark.parametrize(
    "data, key, text",
    [
        ({"lora": {"alpha": 0}}, "lora.alpha", "must be > 0"),
        ({"lora": {"alpha": -16}}, "lora.alpha", "must be > 0"),
        ({"lora": {"target_modules": ["lm_head"]}}, "lora.target_modules", "allowed: q_proj"),
        ({"training": {"warmup_steps": 100, "max_steps": 50}}, "training", "warmup_steps (100) must be shorter than the run"),
        ({"training": {"eval_steps": 50, "save_steps": 120}}, "training", "save_steps (120) must be a multiple of eval_steps (50)"),
        ({"training": {"optimizer": "sgd"}}, "training.optimizer", "'paged_adamw_8bit'"),
        ({"preset": "70b"}, "preset", "allowed: 8b, 14b, 32b, small, embedded"),
        ({"model": {"max_seq_len": 8192}}, "(top level)", "Ollama would silently truncate"),
    ],
)
def test_impossible_values(data, key, text):
    msg = _error(data)
    assert f"{key}:" in msg and text in msg


def test_save_steps_free_when_best_model_loading_off():
    cfg = parse_config({"training": {"eval_steps": 50, "save_steps": 120, "load_best_model_at_end": False}})
    assert cfg.training.save_steps == 120


@pytest.mark.parametrize(
    "model, preset, lr, epochs, rank",
    [("llama-3.1-8b", "8b", 1e-5, 3, 16), ("qwen2.5-14b", "14b", 2e-5, 5, 32), ("qwen2.5-32b", "32b", 3e-5, 5, 32),
     ("qwen2.5-0.5b", "small", 1e-4, 3, 16), ("embedded", "embedded", 1e-3, 1, 32)],
)
def test_presets_encode_the_guide(model, preset, lr, epochs, rank):
    cfg = config_for_model(model)
    t = cfg.training
    assert cfg.preset == preset
    assert (t.learning_rate, t.num_epochs, cfg.lora.r, cfg.lora.alpha) == (lr, epochs, rank, 2 * rank)
    assert cfg.lora.dropout == 0.05 and cfg.lora.target_modules == ALL_PROJECTIONS
    assert t.weight_decay == 0.01 and t.max_grad_norm == 1.0 and t.optimizer == "paged_adamw_8bit"
    assert t.lr_scheduler == "cosine" and t.save_total_limit == 3 and t.load_best_model_at_end
    assert t.early_stopping_patience == 3
    assert cfg.range_warnings() == []  # a preset's own defaults are inside its ranges


def test_14b_preset_is_the_guide_default():
    cfg = config_for_model("qwen2.5-14b")
    t = cfg.training
    assert (t.per_device_batch_size, t.gradient_accumulation_steps, t.warmup_steps) == (4, 8, 100)
    assert (t.eval_steps, t.save_steps) == (50, 100) and t.gradient_checkpointing
    assert cfg.quantization.load_in_4bit and cfg.quantization.quant_type == "nf4" and cfg.quantization.double_quant
    assert cfg.export.ollama_base == "qwen2.5:14b"
    assert PRESETS["14b"].lr_range == (1e-5, 3e-5) and PRESETS["32b"].rank_range == (32, 64)


def test_out_of_range_values_warn_with_reason():
    cfg = config_for_model("qwen2.5-14b")
    cfg.training.learning_rate = 1e-4
    cfg.lora.r, cfg.lora.alpha = 64, 32
    warnings = "\n".join(cfg.range_warnings())
    assert "learning_rate=0.0001 is above the 14b preset's range" in warnings and "catastrophic forgetting" in warnings
    assert "lora.r=64 is above" in warnings
    assert "not 2 x r" in warnings


def test_data_round_warnings():
    cfg = config_for_model("qwen2.5-14b")
    cfg.training.num_epochs = 3
    assert cfg.data_size_warnings(800) == []
    assert "below the initial round's 500-1000" in cfg.data_size_warnings(100)[0]
    assert "consider data.round: round2" in cfg.data_size_warnings(2500)[0]


def test_init_writes_a_commented_config_that_round_trips(tmp_path):
    out = tmp_path / "eden.yaml"
    result = CliRunner().invoke(app, ["init", "--model", "qwen2.5-14b", "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.count("\n# ") >= 8 and "# LoRA alpha; the guide uses 2 x r" in text
    cfg = load_config(out)
    expected = config_for_model("qwen2.5-14b")
    assert cfg.lora == expected.lora and cfg.training.learning_rate == expected.training.learning_rate
    assert yaml.safe_load(render_config_yaml(expected)) == expected.model_dump(mode="json")


def test_cli_prints_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  alpha: 0\n  rank: 8\n")
    proc = subprocess.run([sys.executable, "-m", "edentune.cli", "config", "check", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "lora.alpha: must be > 0" in proc.stderr and "lora.rank: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_relative_paths_resolve_against_the_config(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text("data:\n  train_files: [chats.jsonl]\ntraining:\n  output_dir: out\n")
    cfg = load_config(path)
    assert cfg.data.train_files == [str(tmp_path / "cfg" / "chats.jsonl")]
    assert cfg.training.output_dir == str(tmp_path / "cfg" / "out")


# -- files that are not configs: each a ConfigError naming the file ------------------------------

@pytest.mark.parametrize("name, content, text", [
    ("binary.yaml", bytes(range(256)) * 4, "not a text file"),
    ("nul.yaml", b"preset: 14b\n\0\0\0", "contains NUL bytes"),
    ("tag.yaml", b"preset: !!python/object/apply:os.system ['touch pwned']\n", "tags like !!python/... are not allowed"),
    ("list.yaml", b"- preset\n- 14b\n", "the top level must be a mapping"),
    ("scalar.yaml", b"just words\n", "the top level must be a mapping"),
    ("deep.yaml", b"[" * 20000 + b"]" * 20000, "nested too deeply"),
    ("deep-map.yaml", b"{a: " * 20000 + b"1" + b"}" * 20000, "nested too deeply"),
    ("deep-value.yaml", b"lora: {target_modules: " + b"[" * 900 + b"]" * 900 + b"}\n", "nested too deeply"),
    ("broken.yaml", b"lora: {r: 8\n", "not valid YAML"),
    ("huge.yaml", b"#" * (2 << 20), "not a run config"),
])
def test_files_that_are_not_configs(tmp_path, name, content, text):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: ") and text in str(exc.value)
    assert not (tmp_path / "pwned").exists()


def test_a_directory_or_a_missing_file_as_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def _check(tmp_path, yaml_text: str):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    return CliRunner().invoke(app, ["config", "check", str(path)])


def test_config_check_reports_missing_data_files_and_an_unknown_model(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "folder.jsonl").mkdir()
    result = _check(tmp_path, "model:\n  name_or_path: qwen-14b-typo\n"
                              "data:\n  train_files: [train.jsonl, missing.jsonl]\n  validation_files: [folder.jsonl]\n"
                              "  replay_files: [gone/replay.jsonl]\n")
    assert isinstance(result.exception, ConfigError)  # main() prints it in one message, exit code 2
    msg = str(result.exception)
    assert "4 problem(s)" in msg
    assert f"data.train_files: {tmp_path / 'missing.jsonl'} does not exist" in msg
    assert f"data.validation_files: {tmp_path / 'folder.jsonl'} is not a file" in msg
    assert f"data.replay_files: {tmp_path / 'gone' / 'replay.jsonl'} does not exist" in msg
    assert "model.name_or_path: unknown model 'qwen-14b-typo'" in msg
    assert "train.jsonl does not exist" not in msg


@pytest.mark.parametrize("model, ok, warning", [
    ("embedded", True, None),
    ("qwen2.5-14b", True, None),  # a preset alias
    ("Some-Org/not-cached-model", True, "not in the local Hugging Face cache"),
    ("./models/missing", False, None),
    ("gpt-typo", False, None),
])
def test_config_check_model_references(tmp_path, monkeypatch, model, ok, warning):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "t.jsonl").write_text("")
    result = _check(tmp_path, f"model:\n  name_or_path: {model}\ndata:\n  train_files: [t.jsonl]\n")
    assert (result.exit_code == 0) == ok, result.output
    if warning:
        assert warning in result.output
    if not ok:
        assert isinstance(result.exception, ConfigError) and "model.name_or_path" in str(result.exception)


def test_config_check_accepts_a_local_model_folder_and_gguf(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "t.jsonl").write_text("")
    for model in (str(tmp_path / "model"), str(tmp_path / "m.gguf")):
        result = _check(tmp_path, f"model:\n  name_or_path: {model}\ndata:\n  train_files: [t.jsonl]\n")
        assert result.exit_code == 0, result.output
    (tmp_path / "empty").mkdir()
    result = _check(tmp_path, f"model:\n  name_or_path: {tmp_path / 'empty'}\ndata:\n  train_files: [t.jsonl]\n")
    assert isinstance(result.exception, ConfigError) and "a folder that is not a model: no config.json" in str(result.exception)
    (tmp_path / "empty" / "config.json").write_text("{}")  # AutoConfig cannot tell what model this is
    result = _check(tmp_path, f"model:\n  name_or_path: {tmp_path / 'empty'}\ndata:\n  train_files: [t.jsonl]\n")
    assert isinstance(result.exception, ConfigError) and "config.json names no model_type" in str(result.exception)


def test_init_force_onto_a_directory_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["init", "--model", "embedded", "-o", str(tmp_path), "--force"])
    assert isinstance(result.exception, ConfigError) and "is a directory" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_an_unknown_model_and_warns_about_an_uncached_one(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    result = CliRunner().invoke(app, ["init", "--model", "qwen-14b-typo", "-o", str(tmp_path / "a.yaml")])
    assert isinstance(result.exception, ConfigError) and "unknown model 'qwen-14b-typo'" in str(result.exception)
    assert not (tmp_path / "a.yaml").exists()
    result = CliRunner().invoke(app, ["init", "--model", "qwen2.5-7b", "-o", str(tmp_path / "b.yaml")])
    assert result.exit_code == 0 and "Qwen/Qwen2.5-7B-Instruct is not in the local Hugging Face cache" in result.output
    assert load_config(tmp_path / "b.yaml").model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
