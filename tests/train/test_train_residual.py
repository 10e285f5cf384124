"""The bf16 residual stream for QLoRA (`training.residual_dtype`) trains like today's fp32-upcast
recipe: same loss curve within a small tolerance, on the embedded model in 4-bit NF4."""

from __future__ import annotations

import random

import pytest
import torch
from train_helpers import conversation
from transformers import DataCollatorForSeq2Seq

from edentune.config import config_for_model
from edentune.errors import ConfigError
from edentune.models import load_tokenizer
from edentune.data.encode import IGNORE, Conversation, encode_conversation
from edentune.train.recipe import load_training_model, residual_dtype
from edentune.train.trainer import trained_token_loss

STEPS = 4
# Measured (embedded SmolLM2-135M, NF4, r=32, lr 1e-3, 2 x <=96 tokens, bf16 autocast on CPU):
# fp32 stream 8.251 6.735 5.474 4.648, bf16 stream 8.241 6.771 5.503 4.655: largest difference
# 0.036 (0.5% of the loss). Tolerance 0.1 (~2.7x that); a broken stream (e.g. no learning, or a
# wrong head dtype) moves the curve by whole nats.
TOLERANCE = 0.1


def _cfg(residual: str, model_dir: str):
    return config_for_model("embedded").updated({
        "model.name_or_path": model_dir, "model.max_seq_len": 96, "training.precision": "bf16",
        "training.residual_dtype": residual, "lora.dropout": 0.0,  # dropout masks would differ between the runs
    })


def _curve(cfg, model_dir: str, batches) -> tuple[list[float], object]:
    model = load_training_model(cfg, model_dir, "cpu", torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what Trainer does with bf16=True
            loss, n = trained_token_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / n)
    return losses, model


def test_bf16_stream_loss_curve_matches_the_fp32_recipe(embedded_dir):
    tok = load_tokenizer(embedded_dir)
    tok.padding_side = "right"
    rng = random.Random(3)
    feats = []
    for i in range(2 * STEPS):
        e = encode_conversation(tok, Conversation(f"c{i}", conversation(rng, rng.randint(10, 40))["messages"]), "Be kind.")
        feats.append({"input_ids": e.input_ids[:96], "attention_mask": [1] * min(96, len(e.input_ids)), "labels": e.labels[:96]})
    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE)
    batches = [collate(feats[i:i + 2]) for i in range(0, len(feats), 2)]

    ref, ref_model = _curve(_cfg("fp32", embedded_dir), embedded_dir, batches)
    emb = ref_model.get_base_model().get_input_embeddings().weight
    assert emb.dtype == torch.float32  # today's recipe: PEFT's upcast
    del ref_model
    new, model = _curve(_cfg("bf16", embedded_dir), embedded_dir, batches)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA masters stay fp32
    assert new[-1] < new[0]  # it learns
    assert max(abs(a - b) for a, b in zip(ref, new)) < TOLERANCE, (ref, new)


def test_residual_dtype_auto_and_its_errors():
    cfg = config_for_model("embedded")
    assert residual_dtype(cfg, "cpu", torch.float32) == torch.float32  # CPU keeps today's behaviour
    assert residual_dtype(cfg, "cpu", torch.bfloat16) == torch.float32
    assert residual_dtype(cfg, "cuda", torch.bfloat16) == torch.bfloat16
    assert residual_dtype(cfg, "cuda", torch.float16) == torch.float32  # fp16 compute: the upcast stays
    assert residual_dtype(cfg.updated({"training.residual_dtype": "fp32"}), "cuda", torch.bfloat16) == torch.float32
    with pytest.raises(ConfigError, match="needs bf16 compute"):
        residual_dtype(cfg.updated({"training.residual_dtype": "bf16"}), "cpu", torch.float32)
