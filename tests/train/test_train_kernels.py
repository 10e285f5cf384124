"""`training.kernels`: Liger's fused kernels only on CUDA and only when installed; CPU stays plain."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from edentune.config import config_for_model
from edentune.errors import ConfigError
from edentune.train import recipe
from edentune.train.recipe import apply_kernels, use_liger


def test_cpu_always_takes_the_plain_path(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    cfg = config_for_model("embedded")
    assert cfg.training.kernels == "auto" and not use_liger(cfg, "cpu")
    assert not use_liger(cfg.updated({"training.kernels": "none"}), "cuda")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    norm_forward = type(model.model.norm).forward
    assert apply_kernels(model, cfg, "cpu") is False
    assert type(model.model.norm).forward is norm_forward and "forward" not in vars(model.model.norm)


def test_auto_on_cuda_follows_the_installation(monkeypatch):
    cfg = config_for_model("qwen2.5-14b")
    real = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(recipe.importlib.util, "find_spec",
                            lambda name, *a, _i=installed: (object() if _i else None) if name == "liger_kernel" else real(name, *a))
        assert use_liger(cfg, "cuda") is installed


def test_requesting_liger_without_it_or_without_cuda_is_a_clear_error(monkeypatch):
    cfg = config_for_model("qwen2.5-14b").updated({"training.kernels": "liger"})
    with pytest.raises(ConfigError, match="needs CUDA") as err:
        use_liger(cfg, "cpu")
    assert "training.kernels: auto" in err.value.hint
    real = importlib.util.find_spec
    monkeypatch.setattr(recipe.importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="liger-kernel is not installed") as err:
        use_liger(cfg, "cuda")
    assert "edentune[cuda]" in err.value.hint
