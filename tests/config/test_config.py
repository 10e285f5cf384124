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
