"""Offloaded gradient checkpointing (`training.offload_checkpoints`): the saved layer inputs leave
for host memory during the forward and come back for backward, with the same gradients; frozen
weights handed to checkpointed functions (the output head in each loss chunk) never move.

On CPU the hooks run with a CPU selector (plain copies instead of pinned copies on a side stream):
what is picked, and that backward gets back exactly what was saved, is the same code path."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_train_loss import _batch
from transformers import AutoModelForCausalLM

from edentune.train import offload
from edentune.train import trainer as trainer_mod


def _lora_model(model_dir: str):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.requires_grad_(False)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                            task_type="CAUSAL_LM"))
    model.train()
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_layer_inputs_move_out_and_back_with_the_same_gradients(tiny_qwen2_dir, monkeypatch):
    monkeypatch.setattr(trainer_mod, "LOGITS_CHUNK_ELEMENTS", 3 * 49152)  # several loss chunks, each given the head weight
    model = _lora_model(tiny_qwen2_dir)
    batch = _batch(tiny_qwen2_dir)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    layer_input = (batch["input_ids"].shape[0], batch["input_ids"].shape[1], hidden)

    total, n = trainer_mod.trained_token_loss(model, batch)
    (total / n).backward()
    reference = _grads(model)
    model.zero_grad()

    picked, refused_params = [], []

    def select(t: torch.Tensor) -> bool:
        ok = offload.worth_offloading(t, device_type="cpu", min_bytes=1024)
        if ok:
            picked.append(tuple(t.shape))
        elif isinstance(t, torch.nn.Parameter):
            refused_params.append(tuple(t.shape))
        return ok

    with offload.offloaded_activations(select) as moved:
        total2, n2 = trainer_mod.trained_token_loss(model, batch)
    (total2 / n2).backward()  # outside the context, as in Trainer: backward unpacks the host copies

    assert torch.equal(total2, total) and n2 == n
    got = _grads(model)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference)
    # every decoder layer's checkpointed input was moved, and nothing else of that size was kept back
    assert picked.count(layer_input) >= layers, picked
    assert moved["tensors"] == len(picked) and moved["bytes"] >= layers * batch["input_ids"].numel() * hidden * 4
    # the output head went into every loss chunk as a checkpoint input, and was never copied
    assert (model.config.vocab_size, hidden) in refused_params
    assert all(s != (model.config.vocab_size, hidden) for s in picked)


def test_parameters_and_small_tensors_are_not_worth_a_copy():
    w = torch.nn.Parameter(torch.zeros(1024, 1024))
    assert not offload.worth_offloading(w, device_type="cpu")
    assert not offload.worth_offloading(w[:512], device_type="cpu")  # a view of a parameter
    assert not offload.worth_offloading(torch.zeros(16), device_type="cpu")
    assert offload.worth_offloading(torch.zeros(1024, 1024), device_type="cpu")
    assert not offload.worth_offloading(torch.zeros(1024, 1024), device_type="cuda")  # not on that device


def test_offload_needs_gradient_checkpointing():
    from edentune.config import config_for_model
    from edentune.errors import ConfigError

    cfg = config_for_model("qwen2.5-14b")
    assert cfg.updated({"training.offload_checkpoints": True}).training.offload_checkpoints
    with pytest.raises(ConfigError, match="offload_checkpoints needs gradient_checkpointing"):
        cfg.updated({"training.offload_checkpoints": True, "training.gradient_checkpointing": False})
