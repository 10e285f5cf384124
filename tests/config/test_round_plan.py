"""The round's plan: every step of a cycle round (train, evaluate per backend, export, smoke check)
against the guide's machines, the changes that make it fit, and the step that does not."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edentune.cli import app
from edentune.config import config_for_model, render_config_yaml
from edentune.cycle.plan import plan_round
from edentune.train.plan import KNOWN_ARCHITECTURES, estimate, estimate_apple

HOST_RAM_GB = 32  # beside the CUDA cards


def _plan(preset: str, device: str, gb: float, **kw):
    cfg = config_for_model(preset)
    return plan_round(cfg, KNOWN_ARCHITECTURES[cfg.model.name_or_path], device, gb, ram_gb=HOST_RAM_GB, disk_free_gb=500, **kw)


@pytest.mark.parametrize("device", ["cuda", "apple"])
@pytest.mark.parametrize("gb", [16, 24, 36])
@pytest.mark.parametrize("preset", ["qwen2.5-14b", "qwen2.5-7b"])
def test_every_step_of_the_round_fits_with_the_chosen_settings(preset, device, gb):
    rp = _plan(preset, device, gb)
    assert [s.step for s in rp.steps] == ["train", "evaluate", "export", "smoke check"]
    assert rp.fits and rp.advice == [], [(s.label, s.total_gb, s.limit_gb, s.host_gb) for s in rp.steps]
    for s in rp.steps:
        assert s.total_gb <= s.limit_gb and (s.host_limit_gb is None or s.host_gb <= s.host_limit_gb)
    # auto: gguf first (it scores the files Ollama serves); the 16-bit 14B fits none of these devices
    assert rp.eval_backend == "gguf"
    if preset == "qwen2.5-14b" and gb < 32:
        assert rp.evaluation["transformers"] > rp.steps[1].limit_gb
    # the changed config is what the round runs: planned again, training needs no further change
    mc = KNOWN_ARCHITECTURES[rp.config.model.name_or_path]
    again = plan_round(rp.config, mc, device, gb, ram_gb=HOST_RAM_GB, disk_free_gb=500)
    wired = [text for _, text in rp.changes if text.startswith("let Metal wire")]  # a Mac setting, not a config one
    assert [c for c in again.changes if c[0] == "train"] == [("train", text) for text in wired] and again.fits
    if device == "apple":
        trained = estimate_apple(rp.config, mc, gb, working_set_gb=gb - 4 if wired else None)
    else:
        trained = estimate(rp.config, mc, gb)
    assert trained.fits


def _settings(rp) -> list[tuple[str, str]]:
    return [(step, text.split(":")[0] if not text.startswith("let Metal") else "iogpu.wired_limit_mb") for step, text in rp.changes]


def test_14b_on_a_16gb_card_fits_with_offloaded_checkpoints_and_the_gguf_evaluation():
    rp = _plan("qwen2.5-14b", "cuda", 16)
    assert _settings(rp) == [("train", "training.offload_checkpoints"), ("export", "export.verify")]
    train, evaluate, export, smoke = rp.steps
    assert train.detail == "QLoRA" and 15 < train.total_gb <= 16
    assert train.host_terms["offloaded layer inputs (pinned)"] == pytest.approx(3.75, abs=0.01)
    assert evaluate.detail == "gguf" and evaluate.total_gb < 10.5  # Q4_K_M weights + KV cache + compute buffer on the GPU
    assert rp.evaluation["transformers-nf4"] < 16 < rp.evaluation["transformers"]
    assert "parity check" not in export.detail and export.total_gb < 3
    assert smoke.where == "GPU" and smoke.total_gb < 11


def test_14b_on_a_16gb_mac_says_exactly_how_the_round_fits():
    rp = _plan("qwen2.5-14b", "apple", 16)
    assert _settings(rp) == [("train", "training.per_device_batch_size"), ("train", "iogpu.wired_limit_mb"), ("train", "lora.r"),
                             ("export", "export.verify"), ("smoke check", "evaluation.base_gguf")]
    c = rp.config
    assert (c.training.per_device_batch_size, c.training.gradient_accumulation_steps) == (1, 32)  # the same effective batch
    assert (c.lora.r, c.lora.alpha, c.model.max_seq_len) == (8, 16, 2048)  # the guide's alpha / r and sequence length kept
    assert not c.export.verify
    assert "sudo sysctl iogpu.wired_limit_mb=12288" in rp.changes[1][1]
    train, evaluate, _, smoke = rp.steps
    assert train.where == "Metal" and train.limit_gb == pytest.approx(12 * 0.95) and train.fits
    assert evaluate.detail == "gguf" and evaluate.limit_gb == pytest.approx(16 * 2 / 3)  # evaluation keeps macOS's default
    # deploy's llama.cpp references run on the Q4_K_M base, not on an f16 copy of 27.5 GB
    assert "base GGUF" in smoke.host_terms and not any(k.startswith("f16") for k in smoke.host_terms)
    assert smoke.host_gb < 12


def test_a_24gb_card_keeps_the_guides_batch():
    rp = _plan("qwen2.5-14b", "cuda", 24)
    assert _settings(rp) == [("export", "export.verify")]
    assert rp.config.training.per_device_batch_size == 4 and rp.config.model.max_seq_len == 2048


def test_evaluation_is_the_step_that_does_not_fit_with_the_configured_backend():
    """transformers in 16 bits: the 14B is ~31.8 GB on a 24 GB card, where training fits untouched."""
    rp = _plan("qwen2.5-14b", "cuda", 24, eval_backend="transformers")
    assert not [c for c in rp.changes if c[0] == "train"]
    step, text = next(c for c in rp.changes if c[0] == "evaluate")
    assert text.startswith("evaluation.backend: gguf (transformers needs ~31.8 GB on the GPU of 24.0 GB")
    assert rp.eval_backend == "gguf" and rp.fits


def test_when_no_backend_fits_the_advice_names_evaluate_and_its_largest_term():
    cfg = config_for_model("qwen2.5-14b").updated({"evaluation.max_new_tokens": 60000})
    rp = plan_round(cfg, KNOWN_ARCHITECTURES[cfg.model.name_or_path], "cuda", 16, ram_gb=HOST_RAM_GB, disk_free_gb=500)
    assert rp.steps[0].fits and not rp.steps[1].fits and not rp.fits
    assert len(rp.advice) == 1 and rp.advice[0].startswith("evaluate does not fit with any backend on the GPU")
    assert "KV cache" in rp.advice[0] and "lower evaluation.max_new_tokens" in rp.advice[0]


def test_the_export_parity_check_is_kept_where_it_fits_and_when_the_gate_did_not_score_gguf():
    cfg = config_for_model("qwen2.5-0.5b")
    rp = plan_round(cfg, KNOWN_ARCHITECTURES[cfg.model.name_or_path], "cuda", 16, ram_gb=HOST_RAM_GB, disk_free_gb=500)
    assert rp.changes == [] and rp.config.export.verify and "parity check" in rp.steps[2].detail
    # 14B with a card big enough for 16-bit evaluation: no gguf scores, so the parity check is not dropped
    big = _plan("qwen2.5-14b", "cuda", 80, eval_backend="transformers")
    assert big.eval_backend == "transformers" and big.config.export.verify
    assert not big.steps[2].fits and "export (adapter + parity check) does not fit" in big.advice[0]
    assert "export.verify: false" in big.advice[0]


def test_disk_counts_checkpoints_per_round_and_says_when_it_is_short():
    rp = _plan("qwen2.5-14b", "cuda", 24)
    assert 2 < rp.disk["checkpoints (3 kept) + adapter, per round"] < 4
    short = plan_round(config_for_model("qwen2.5-14b"), KNOWN_ARCHITECTURES["Qwen/Qwen2.5-14B-Instruct"], "cuda", 24,
                       ram_gb=HOST_RAM_GB, disk_free_gb=20)
    assert not short.fits and short.advice[-1].startswith("disk: the round needs ~")


def test_plan_cli_prints_the_round_and_its_json(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(render_config_yaml(config_for_model("qwen2.5-14b")))
    res = CliRunner().invoke(app, ["plan", str(path), "--device-gb", "16", "--ram-gb", "32", "--disk-free-gb", "500", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)["round"]
    assert out["fits"] and out["eval_backend"] == "gguf"
    assert [s["step"] for s in out["steps"]] == ["train", "evaluate", "export", "smoke check"]
    assert out["changes"][0] == {"step": "train", "set": out["changes"][0]["set"]}
    assert out["changes"][0]["set"].startswith("training.offload_checkpoints: true")
    res = CliRunner().invoke(app, ["plan", str(path), "--device", "apple", "--device-gb", "16", "--disk-free-gb", "500"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "The round on a Mac with 16 GB of unified memory" in text and "the round fits with these changes:" in text
    assert "sudo sysctl iogpu.wired_limit_mb=12288" in text
