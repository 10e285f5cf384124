"""CheapDropout: the same distribution and gradient as nn.Dropout, from fewer random draws."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edentune.train.dropout import CheapDropout, keep_mask, use_cheap_lora_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_mask_drops_p_independently(p):
    torch.manual_seed(1)
    n = 1_000_000
    keep = keep_mask((n,), p)
    drop = (~keep).double()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(drop.mean().item() - p) < 5 * sigma + 2**-15
    # Four masks come from each 64-bit draw: every lane position has rate p, and neighbours
    # (same draw or not) are independent: P(both dropped) = p^2.
    lanes = drop.view(-1, 4)
    for lane in range(4):
        assert abs(lanes[:, lane].mean().item() - p) < 5 * (p * (1 - p) / (n // 4)) ** 0.5 + 2**-15
    both = (drop[:-1] * drop[1:]).mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5 + 2**-14


def test_keep_mask_follows_torch_seed():
    torch.manual_seed(7)
    a = keep_mask((3, 5, 7), 0.3)
    torch.manual_seed(7)
    b = keep_mask((3, 5, 7), 0.3)
    c = keep_mask((3, 5, 7), 0.3)
    assert a.shape == (3, 5, 7) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cheap_dropout_scales_survivors_and_masks_gradient(dtype):
    torch.manual_seed(0)
    x = (torch.rand(8, 33, 16) + 0.5).to(dtype).requires_grad_()
    layer = CheapDropout(0.25).train()
    y = layer(x)
    assert y.dtype == dtype
    kept = y != 0
    assert 0.6 < kept.float().mean().item() < 0.9
    torch.testing.assert_close(y[kept], (x[kept] / 0.75).to(dtype))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, (g * kept.to(dtype) / 0.75).to(dtype))


def test_cheap_dropout_is_identity_in_eval_and_at_zero():
    x = torch.randn(4, 9)
    assert CheapDropout(0.3).eval()(x) is x
    assert CheapDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        CheapDropout(1.0)


def test_replaces_every_lora_dropout_and_keeps_the_adapter(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=modules))
    keys = set(model.state_dict())
    layers = model.config.num_hidden_layers
    assert use_cheap_lora_dropout(model) == len(modules) * layers
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert set(model.state_dict()) == keys  # nothing saved changes: export and merge see the same adapter
    model.train()
    ids = torch.randint(0, 100, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_engine_model_uses_cheap_dropout_on_cpu(tiny_llama_dir, tmp_path):
    from train_helpers import make_config

    from edentune.train.recipe import engine_model, load_training_model

    cfg = make_config(tiny_llama_dir, str(tmp_path / "unused.jsonl"), None, tmp_path / "run")
    cfg.lora.dropout = 0.1
    engine = engine_model(cfg, tiny_llama_dir, "cpu", torch.float32)
    plain = load_training_model(cfg, tiny_llama_dir, "cpu", torch.float32)
    assert sum(isinstance(m, CheapDropout) for m in engine.modules()) == 7 * 2
    assert not any(isinstance(m, CheapDropout) for m in plain.modules())  # PEFT's own, as baselines get it
