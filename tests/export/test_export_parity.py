"""Acceptance: real model, real llama.cpp. A PEFT adapter on the embedded SmolLM2 (llama) and its
Qwen2 twin is exported, validated, loaded with the base GGUF, and matches HF/PEFT (logits, adapter
delta, greedy top-1, template). The merged route matches the HF merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import embedded_cfg, make_adapter


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_adapter_export_parity(arch, request, tmp_path, short_probes):
    from edentune.export import export_adapter

    model_dir = request.getfixturevalue("embedded_dir" if arch == "llama" else "embedded_qwen2_dir")
    cfg = embedded_cfg(arch, tmp_path)
    result = export_adapter(cfg, make_adapter(model_dir, tmp_path / "ad"), tmp_path / "export", verify=True)
    report = json.loads(result.report_path.read_text())
    assert (tmp_path / "export" / "adapter.gguf").exists() and (tmp_path / "export" / "Modelfile").exists()
    exact, *quantized = report["logits"].values()
    assert exact["passed"] and exact["delta_rel"] < 0.1 and exact["top1_agreement"] >= 0.95
    assert report["template"]["passed"]
    if arch == "llama":  # the original Q4_1 GGUF is compared too, with quantization tolerances
        assert quantized and quantized[0]["passed"] and quantized[0]["tolerance"]["max_delta_rel"] is None
    assert result.create_commands == [f"ollama create eden -f {tmp_path / 'export' / 'Modelfile'}"]


def test_merged_export_parity(embedded_qwen2_dir, tmp_path, short_probes):
    from edentune.export import export_merged

    cfg = embedded_cfg("qwen2", tmp_path)
    result = export_merged(cfg, make_adapter(embedded_qwen2_dir, tmp_path / "ad"), tmp_path / "export", dtype="f16")
    report = json.loads(result.report_path.read_text())
    assert report["logits"]["model.gguf"]["passed"] and report["template"]["passed"]
    text = (tmp_path / "export" / "Modelfile").read_text()
    assert "FROM ./model.gguf" in text and "TEMPLATE" in text and "ADAPTER" not in text


def test_an_adapter_without_effect_fails_the_delta_check():
    """If llama.cpp ignored the adapter, its delta is zero: relative error 1.0 must fail."""
    import numpy as np

    from edentune.export.parity import EXACT, compare_logits

    rng = np.random.default_rng(0)
    base = [rng.normal(size=(6, 50)).astype(np.float32)]
    tuned = [base[0] + rng.normal(scale=0.5, size=(6, 50)).astype(np.float32)]
    report = compare_logits(tuned, base, [3], EXACT, hf_base=base, ll_base=base)
    assert not report.passed and report.delta_rel == 1.0
    assert any("adapter delta relative error 1.000" in f for f in report.failures)


def test_adapter_trained_by_edentune_exports_with_parity_on_the_qwen2_twin(tmp_path, short_probes):
    """The acceptance path: QLoRA-train a small adapter with edentune's own engine on the Qwen2
    twin, export it, and pass the llama.cpp parity check (the llama model takes the same path
    in tests/test_quickstart.py)."""
    from edentune.export import export_adapter
    from edentune.presets import fast_cpu_4bit  # QLoRA where bitsandbytes is fast here, else plain LoRA
    from edentune.train import train

    sample = Path(__file__).resolve().parents[2] / "src/edentune/data/sample/eden_sample.jsonl"
    short = [ln for ln in sample.read_text(encoding="utf-8").splitlines() if ln.strip()][:24]
    (tmp_path / "train.jsonl").write_text("\n".join(short[:20]) + "\n", encoding="utf-8")
    (tmp_path / "val.jsonl").write_text("\n".join(short[20:]) + "\n", encoding="utf-8")
    cfg = embedded_cfg("qwen2", tmp_path).updated({
        "model.max_seq_len": 256, "model.overlong": "truncate", "quantization.load_in_4bit": fast_cpu_4bit(),
        "lora.r": 8, "lora.alpha": 16.0, "training.output_dir": str(tmp_path / "run"), "training.warmup_steps": 0,
        "training.max_steps": 3, "training.eval_steps": 3, "training.save_steps": 3, "training.learning_rate": 1e-3,
        "data.train_files": [str(tmp_path / "train.jsonl")], "data.validation_files": [str(tmp_path / "val.jsonl")],
    })
    trained = train(cfg)
    result = export_adapter(cfg, trained.adapter_dir, tmp_path / "export", verify=True)
    exact = next(iter(result.report["logits"].values()))
    assert exact["passed"] and exact["top1_agreement"] >= 0.95 and result.report["template"]["passed"]


APP_TEXT = "You are Adam, a test assistant.\nReply in the user's language."


def test_eden_request_format_training_ids_equal_the_rendered_generate_request(embedded_dir, tmp_path, short_probes):
    """request_format eden on the embedded model: the /api/generate request the app sends (prompt
    in its layout, no system), rendered by the exported TEMPLATE with the Modelfile's SYSTEM, is
    token for token what training put before the reply; a template that mishandles it fails."""
    from edentune.data.eden_layout import request_layout
    from edentune.export import export_adapter
    from edentune.export.modelfile import CHATML_TEMPLATE, parse_modelfile
    from edentune.export.parity import generate_parity, render_generate_prompt
    from edentune.models import embedded_gguf_path, load_tokenizer

    cfg = embedded_cfg("llama", tmp_path).updated({"export.request_format": "eden", "export.eden_system_text": APP_TEXT})
    result = export_adapter(cfg, make_adapter(embedded_dir, tmp_path / "ad"), tmp_path / "export", verify=True)
    template = result.report["template"]
    assert template["passed"] and template["prompts"] == 2 and not template["mismatches"]
    mf = parse_modelfile((tmp_path / "export" / "Modelfile").read_text())
    assert mf.parameters["temperature"] == [0.8] and mf.parameters["num_ctx"] == [cfg.export.num_ctx]

    text = render_generate_prompt(CHATML_TEMPLATE, cfg.model.system_prompt, f"{APP_TEXT}\n\nUser: hi\nAssistant:")
    assert text == (f"<|im_start|>system\n{cfg.model.system_prompt}<|im_end|>\n<|im_start|>user\n{APP_TEXT}\n\nUser: hi\n"
                    "Assistant:<|im_end|>\n<|im_start|>assistant\n")
    no_system = CHATML_TEMPLATE.replace("{{ .System }}", "")  # a template that drops the Modelfile's SYSTEM
    broken = generate_parity(no_system, cfg.model.system_prompt, load_tokenizer(embedded_dir), embedded_gguf_path(),
                             request_layout(cfg.export))
    assert not broken.passed and len(broken.mismatches) == 2
    assert APP_TEXT in broken.mismatches[0]["training_text"] and cfg.model.system_prompt in broken.mismatches[0]["training_text"]
