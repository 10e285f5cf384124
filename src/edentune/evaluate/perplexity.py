"""Perplexity over assistant tokens only, with exactly the training engine's masking
(`edentune.data.encode.encode_conversation`: the model's chat template, assistant replies up to and
including their end-of-turn token), so evaluation perplexity and training loss measure the same
tokens. Overlong conversations are truncated to `max_seq_len`.
"""

from __future__ import annotations

import math


def perplexity(model, tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int) -> float | None:
    """exp(mean NLL per assistant token) over `conversations` (`data.encode.Conversation`s);
    None when no token is scored."""
    import torch

    from edentune.data.encode import IGNORE, encode_conversation, fit_length

    total, count = 0.0, 0
    for conv in conversations:
        ex = fit_length(encode_conversation(tokenizer, conv, system_prompt), max_seq_len, "truncate")
        if ex is None:
            continue
        ids = torch.tensor([ex.input_ids], device=model.device)
        targets = torch.tensor(ex.labels[1:], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        mask = targets != IGNORE
        total += torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum").item()
        count += int(mask.sum())
    return math.exp(total / count) if count else None
