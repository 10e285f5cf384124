"""Perplexity over assistant tokens only, with exactly the training engine's masking
(`edentune.train.data.encode_conversation`: the model's chat template, assistant replies up to and
including their end-of-turn token), so evaluation perplexity and training loss measure the same
tokens. Overlong conversations are truncated to `max_seq_len`.
"""

from __future__ import annotations

import math


def scored_examples(tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int):
    """(input_ids, labels) of each conversation exactly as training encodes it (IGNORE outside
    assistant replies); conversations that leave nothing after truncation are skipped."""
    from edentune.train.data import encode_conversation, fit_length

    for conv in conversations:
        ex = fit_length(encode_conversation(tokenizer, conv, system_prompt), max_seq_len, "truncate")
        if ex is not None:
            yield ex.input_ids, ex.labels


def perplexity(model, tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int) -> float | None:
    """exp(mean NLL per assistant token) over `conversations` (`train.data.Conversation`s);
    None when no token is scored."""
    import torch

    from edentune.train.data import IGNORE

    total, count = 0.0, 0
    for input_ids, labels in scored_examples(tokenizer, conversations, system_prompt, max_seq_len):
        ids = torch.tensor([input_ids], device=model.device)
        targets = torch.tensor(labels[1:], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        mask = targets != IGNORE
        total += torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum").item()
        count += int(mask.sum())
    return math.exp(total / count) if count else None


def gguf_perplexity(llm, tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int) -> float | None:
    """The same measure from llama.cpp's logits (`llama_cpp.Llama` built with logits_all=True) on
    the same token ids and labels."""
    import numpy as np

    from edentune.train.data import IGNORE

    total, count = 0.0, 0
    for input_ids, labels in scored_examples(tokenizer, conversations, system_prompt, max_seq_len):
        targets = np.asarray(labels[1:])
        positions = np.nonzero(targets != IGNORE)[0]
        if not positions.size:
            continue
        llm.reset()
        llm.eval(input_ids)
        logits = np.asarray(llm.scores[positions], dtype=np.float64)  # row i predicts token i + 1
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        total += float((log_z - logits[np.arange(positions.size), targets[positions]]).sum())
        count += int(positions.size)
    return math.exp(total / count) if count else None
