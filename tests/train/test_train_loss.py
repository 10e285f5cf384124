"""The trained-positions loss equals transformers' own causal-LM loss, chunked or not."""

from __future__ import annotations

import random

import pytest
import torch
from train_helpers import conversation
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from edentune.train import trainer as trainer_mod
from edentune.data.encode import IGNORE, Conversation, encode_conversation


def _batch(model_dir: str):
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(1)
    convs = [Conversation(f"c{n}", conversation(rng, n)["messages"]) for n in (6, 30, 15)]
    encoded = [encode_conversation(tok, c, "You are Eden.") for c in convs]
    feats = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in encoded]
    return DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE)(feats)


@pytest.mark.parametrize("chunk_elements", [2**26, 3 * 49152])  # one chunk; several checkpointed chunks
def test_matches_hf_loss_and_gradients(tiny_qwen2_dir, monkeypatch, chunk_elements):
    monkeypatch.setattr(trainer_mod, "LOGITS_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    batch = _batch(tiny_qwen2_dir)

    ref = model(**batch).loss  # HF: mean over label != -100 after the shift
    ref.backward()
    ref_grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()

    total, n = trainer_mod.trained_token_loss(model, batch)
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum()) > 0
    (total / n).backward()
    assert torch.allclose(total / n, ref, atol=1e-5)
    assert torch.allclose(model.model.layers[0].mlp.up_proj.weight.grad, ref_grad, atol=1e-6)
