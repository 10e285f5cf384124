"""Perplexity over assistant tokens only, with exactly the training engine's masking
(`edentune.train.data.encode_conversation`: the model's chat template, assistant replies up to and
including their end-of-turn token), so evaluation perplexity and training loss measure the same
tokens. Overlong conversations are truncated to `max_seq_len`.
"""

from __future__ import annotations

import math


def perplexity_terms(model, tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int) -> list[list[float]]:
    """[summed NLL, scored tokens] of each conversation (`train.data.Conversation`s), in order; a
    conversation with no scored token left after truncation gives [0, 0]. Kept per conversation so
    that two models' losses can be compared pair by pair (`significance.paired_loss`)."""
    import torch

    from edentune.train.data import IGNORE, encode_conversation, fit_length

    terms = []
    for conv in conversations:
        ex = fit_length(encode_conversation(tokenizer, conv, system_prompt), max_seq_len, "truncate")
        if ex is None:
            terms.append([0.0, 0])
            continue
        ids = torch.tensor([ex.input_ids], device=model.device)
        targets = torch.tensor(ex.labels[1:], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        mask = targets != IGNORE
        terms.append([torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum").item(), int(mask.sum())])
    return terms


def perplexity_of(terms: list[list[float]]) -> float | None:
    """exp(mean NLL per scored token) of `perplexity_terms`; None when no token is scored."""
    count = sum(n for _, n in terms)
    return math.exp(sum(nll for nll, _ in terms) / count) if count else None


def perplexity(model, tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int) -> float | None:
    """exp(mean NLL per assistant token) over `conversations` (`train.data.Conversation`s);
    None when no token is scored."""
    return perplexity_of(perplexity_terms(model, tokenizer, conversations, system_prompt, max_seq_len))
