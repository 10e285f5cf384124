"""Padding-free packing is exact on CPU: with `position_ids` restarting per sequence and no cache,
SDPA and eager attention in transformers 5.x build a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`), so no token attends across a sequence boundary
and no label is predicted from the previous sequence. The controls show the check can fail."""

from __future__ import annotations

import random

import pytest
import torch
from train_helpers import conversation
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening

from edentune.models import load_tokenizer
from edentune.train import trainer as trainer_mod
from edentune.data.encode import IGNORE, Conversation, encode_conversation

# fp32. Measured on the embedded model (logits up to |38|): eager 0.0; SDPA 5.8e-5 on logits and
# 2.7e-5 on a sequence's summed loss (the packed forward takes SDPA's masked kernel, each sequence
# alone its is_causal kernel: rounding, not leakage). The controls below differ by 20-41.
ATOL = 2e-4


def _features(model_dir: str, lengths=(3, 25, 60)) -> list[dict]:
    tok = load_tokenizer(model_dir)
    rng = random.Random(1)
    encoded = [encode_conversation(tok, Conversation(f"c:{i}", conversation(rng, n)["messages"]), "Be kind.")
               for i, n in enumerate(lengths)]
    return [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in encoded]


def _model(model_dir: str, attn: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    model.config.use_cache = False
    return model


def _packed(features):
    return DataCollatorWithFlattening(return_position_ids=True)(features)


def _per_sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of one sequence ([s, V] logits, [s] labels)."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")


def _max_diff(model, features, packed, use_cache=False) -> tuple[float, float]:
    """Largest |logit| and |per-sequence loss| difference between the packed forward and each alone."""
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=use_cache).logits[0]
        logit_diff = loss_diff = 0.0
        start = 0
        for f in features:
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0]
            part = together[start:start + n]
            logit_diff = max(logit_diff, float((part - alone).abs().max()))
            loss_diff = max(loss_diff, abs(float(_per_sequence_nll(part, packed["labels"][0, start:start + n]))
                                           - float(_per_sequence_nll(alone, torch.tensor(f["labels"])))))
            start += n
    return logit_diff, loss_diff


@pytest.fixture(scope="module", params=["tiny", "embedded"])
def model_dir(request, tiny_llama_dir, embedded_dir):
    return tiny_llama_dir if request.param == "tiny" else embedded_dir


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_separate_forwards(model_dir, attn):
    features = _features(model_dir)
    packed = _packed(features)
    model = _model(model_dir, attn)
    logit_diff, loss_diff = _max_diff(model, features, packed)
    assert logit_diff <= ATOL and loss_diff <= ATOL, (logit_diff, loss_diff)

    # Controls: the same comparison fails when the sequences can see each other.
    unrestarted = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    assert min(_max_diff(model, features, unrestarted)) > 50 * ATOL
    # a cache (use_cache=True) turns transformers' packed-sequence detection off: the sequences leak
    assert min(_max_diff(model, features, packed, use_cache=True)) > 50 * ATOL


def test_no_label_crosses_a_sequence_boundary(tiny_llama_dir):
    features = _features(tiny_llama_dir)
    packed = _packed(features)
    starts = torch.cumsum(torch.tensor([0] + [len(f["input_ids"]) for f in features[:-1]]), 0)
    labels = packed["labels"][0]
    assert (labels[starts] == IGNORE).all()  # the first token of a sequence is never a target of the previous one
    restart = (packed["position_ids"][0] == 0).nonzero().flatten()
    assert restart.tolist() == starts.tolist()
    # every other label is the sequence's own
    assert labels.tolist() == [lab if i else IGNORE for f in features for i, lab in enumerate(f["labels"])]


def test_packed_and_padded_batches_give_the_same_per_token_loss(tiny_llama_dir):
    """The engine's loss (`trained_token_loss`): the same summed loss and trained-token count, so the
    per-trained-token normalisation is identical in packed and padded mode."""
    features = _features(tiny_llama_dir)
    tok = load_tokenizer(tiny_llama_dir)
    tok.padding_side = "right"
    padded = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE)(features)
    model = _model(tiny_llama_dir, "sdpa")
    with torch.no_grad():
        s_packed, n_packed = trainer_mod.trained_token_loss(model, _packed(features))
        s_padded, n_padded = trainer_mod.trained_token_loss(model, padded)
    assert n_packed == n_padded == sum(sum(lab != IGNORE for lab in f["labels"][1:]) for f in features)
    assert abs(float(s_packed) - float(s_padded)) < 1e-4 * float(s_padded), (s_packed, s_padded)


def test_batching_auto_packs_only_with_flash_attention_and_packed_trains_on_cpu(tiny_llama_dir, small_data, tmp_path):
    from train_helpers import make_config

    from edentune.train import train
    from edentune.train.recipe import resolve_batching

    assert resolve_batching("auto", "cpu") == "length_grouped"  # measured faster on CPU (docs/benchmarks.md)
    assert resolve_batching("packed", "cpu") == "packed"  # exact under SDPA: allowed when asked for
    cfg = make_config(tiny_llama_dir, *small_data, tmp_path / "run", batching="packed", max_steps=4)
    result = train(cfg)
    data = result.metrics["data"]["train"]
    # every trained token is counted once: a packed batch neither drops nor adds any
    assert result.metrics["global_step"] == 4 and 0 < result.metrics["trained_tokens"] <= 4 * data["trained_tokens"]
    assert result.metrics["final_eval_loss"] is not None and result.metrics["final_eval_loss"] < 50
