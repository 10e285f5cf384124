"""Perplexity over assistant tokens only, with exactly the training engine's masking
(`edentune.data.encode.encode_conversation`: the model's chat template, assistant replies up to and
including their end-of-turn token), so evaluation perplexity and training loss measure the same
tokens. Overlong conversations are truncated to `max_seq_len`.
"""

from __future__ import annotations

import math


def scored_examples(tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int):
    """(input_ids, labels) of each conversation exactly as training encodes it (IGNORE outside
    assistant replies), in order; None for a conversation that leaves nothing after truncation."""
    from edentune.data.encode import encode_conversation, fit_length

    for conv in conversations:
        ex = fit_length(encode_conversation(tokenizer, conv, system_prompt), max_seq_len, "truncate")
        yield (ex.input_ids, ex.labels) if ex is not None else None


def perplexity_terms(model, tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int) -> list[list[float]]:
    """[summed NLL, scored tokens] of each conversation (`data.encode.Conversation`s), in order; a
    conversation with no scored token left after truncation gives [0, 0]. Kept per conversation so
    that two models' losses can be compared pair by pair (`significance.paired_loss`)."""
    import torch

    from edentune.data.encode import IGNORE

    terms = []
    for example in scored_examples(tokenizer, conversations, system_prompt, max_seq_len):
        if example is None:
            terms.append([0.0, 0])
            continue
        input_ids, labels = example
        ids = torch.tensor([input_ids], device=model.device)
        targets = torch.tensor(labels[1:], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        mask = targets != IGNORE
        terms.append([torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum").item(), int(mask.sum())])
    return terms


def gguf_perplexity_terms(llm, tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int) -> list[list[float]]:
    """`perplexity_terms` from llama.cpp's logits (`llama_cpp.Llama` built with logits_all=True) on
    the same token ids and labels."""
    import numpy as np

    from edentune.data.encode import IGNORE

    terms = []
    for example in scored_examples(tokenizer, conversations, system_prompt, max_seq_len):
        targets = np.asarray(example[1][1:]) if example is not None else np.zeros(0, dtype=int)
        positions = np.nonzero(targets != IGNORE)[0]
        if not positions.size:
            terms.append([0.0, 0])
            continue
        llm.reset()
        llm.eval(example[0])
        logits = np.asarray(llm.scores[positions], dtype=np.float64)  # row i predicts token i + 1
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        terms.append([float((log_z - logits[np.arange(positions.size), targets[positions]]).sum()), int(positions.size)])
    return terms


def perplexity_of(terms: list[list[float]]) -> float | None:
    """exp(mean NLL per scored token) of `perplexity_terms`; None when no token is scored."""
    count = sum(n for _, n in terms)
    return math.exp(sum(nll for nll, _ in terms) / count) if count else None


def perplexity(model, tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int) -> float | None:
    """exp(mean NLL per assistant token) over `conversations` (`data.encode.Conversation`s);
    None when no token is scored."""
    return perplexity_of(perplexity_terms(model, tokenizer, conversations, system_prompt, max_seq_len))


def gguf_perplexity(llm, tokenizer, conversations: list, system_prompt: str | None, max_seq_len: int) -> float | None:
    """`perplexity` from llama.cpp's logits."""
    return perplexity_of(gguf_perplexity_terms(llm, tokenizer, conversations, system_prompt, max_seq_len))
