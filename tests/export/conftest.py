"""Fixtures for the export tests: PEFT adapters made directly with peft (no training engine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # ollama_standin, qwen25_template

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: str, out: Path, *, seed: int = 0, **lora_kwargs) -> Path:
    """A LoRA adapter with random non-zero B (so it changes the outputs), saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(r=8, lora_alpha=16, target_modules=ALL_PROJ) | lora_kwargs
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(out)
    return out


@pytest.fixture
def short_probes(monkeypatch):
    """Only the multi-turn probe conversation instead of the full set: keeps the suite fast."""
    from edentune.export import parity

    monkeypatch.setattr(parity, "PROBE_CONVERSATIONS", [parity.PROBE_CONVERSATIONS[2]])


def embedded_cfg(arch: str, tmp_path: Path):
    from edentune.config import RunConfig

    cfg = RunConfig()
    cfg.model.name_or_path, cfg.model.architecture = "embedded", arch
    cfg.training.output_dir = str(tmp_path / "run")
    return cfg
