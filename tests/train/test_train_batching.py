"""A padded, length-grouped batch gives each conversation the same loss as running it alone."""

from __future__ import annotations

import random

import torch
from train_helpers import conversation
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from edentune.models import load_tokenizer
from edentune.data.encode import IGNORE, Conversation, encode_conversation


def per_sequence_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss per sequence over its trained tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return nll.sum(1) / (labels != IGNORE).sum(1)


def test_padded_batch_matches_each_conversation_alone(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rng = random.Random(1)
    examples = [encode_conversation(tok, Conversation(f"c:{i}", conversation(rng, n)["messages"]), "Be kind.")
                for i, n in enumerate((3, 25, 60))]
    features = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples]
    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE)
    batch = collate(features)
    assert len({len(e.input_ids) for e in examples}) == 3  # really padded
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    with torch.no_grad():
        together = per_sequence_loss(model, batch)
        alone = torch.cat([per_sequence_loss(model, collate([f])) for f in features])
    assert torch.allclose(together, alone, atol=1e-5, rtol=0), (together, alone)
