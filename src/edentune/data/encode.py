"""Conversations -> token ids and labels that train only on what the assistant says.

One home for training (`train`) and scoring (`evaluate`: perplexity over the same tokens).

Each conversation is rendered with the model's own chat template. Assistant spans are found by
rendering prefixes (messages[:i] with the generation prompt, then messages[:i+1]) and comparing
character positions, so no token ids are guessed and a pad == eos tokenizer cannot hide the
end-of-turn token: every assistant turn is trained up to and including its end-of-turn marker
(`<|im_end|>` for ChatML). The whitespace a template puts after that marker (ChatML's "\\n") is
not trained: at inference the runtime stops at the marker and never generates it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from edentune.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that do not contribute to the loss (transformers' convention)


@dataclass
class Conversation:
    source: str  # "file:line", named in every error about it
    messages: list[dict]


@dataclass
class Encoded:
    source: str
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class EncodeStats:
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    trained_tokens: int = 0
    tokens: int = 0
    longest: int = 0  # tokens of the longest conversation before length handling
    dropped_sources: list[str] = field(default_factory=list)


def read_conversations(path: str | Path) -> list[Conversation]:
    """ChatML JSONL checked by the data stage's validator (the same rules as `edentune data
    validate`); any invalid line is an error naming `file:line`, never a silently skipped row."""
    from edentune.data.records import Report, load
    from edentune.data.validate import validate_record

    if not Path(path).exists():
        raise DataError(f"{path}: no such data file")
    report = Report()
    items = load([path], validate_record, report)
    if report.quarantined:
        shown = "\n  ".join(report.problems[:5])
        raise DataError(f"{report.quarantined} invalid line(s) in {path}:\n  {shown}",
                        hint="run `edentune data clean` first and train on its output")
    return [Conversation(item.source, [{"role": m["role"], "content": m["content"]} for m in item.record["messages"]])
            for item in items]


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    # An explicit system prompt, never the template's default (Qwen's injects "You are Qwen, ...").
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character span of each assistant reply + end-of-turn."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, upto = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (upto.startswith(head) and text.startswith(upto)):
            raise DataError(
                "the chat template does not render conversations prefix-stably (earlier turns change when "
                "later ones are added), so assistant spans cannot be located",
                hint="use a model whose template renders each turn independently (ChatML, Llama 3)",
            )
        spans.append((len(head), len(upto.rstrip())))  # rstrip: the "\n" after <|im_end|> is not trained
    return text, spans


def encode_conversation(tokenizer, conv: Conversation, system_prompt: str | None) -> Encoded:
    text, spans = assistant_char_spans(tokenizer, with_system_prompt(conv.messages, system_prompt))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        tok if any(s < end and e > start for start, end in spans) else IGNORE
        for tok, (s, e) in zip(ids, enc["offset_mapping"])
    ]
    out = Encoded(conv.source, ids, labels)
    if not out.trained_tokens:
        raise DataError(f"{conv.source}: no assistant tokens to train on", hint="every conversation needs an assistant reply")
    return out


def fit_length(ex: Encoded, max_len: int, policy: str) -> Encoded | None:
    """Apply `model.overlong` to one example; None means dropped."""
    if len(ex.input_ids) <= max_len:
        return ex
    if policy == "drop":
        return None
    cut = Encoded(ex.source, ex.input_ids[:max_len], ex.labels[:max_len])
    return cut if cut.trained_tokens else None  # a truncation that keeps no reply teaches nothing


def encode_all(tokenizer, convs: list[Conversation], max_len: int, overlong: str, system_prompt: str | None) -> tuple[list[Encoded], EncodeStats]:
    stats, out = EncodeStats(), []
    for conv in convs:
        ex = encode_conversation(tokenizer, conv, system_prompt)
        stats.longest = max(stats.longest, len(ex.input_ids))
        fitted = fit_length(ex, max_len, overlong)
        if fitted is None:
            stats.dropped_overlong += 1
            stats.dropped_sources.append(conv.source)
            continue
        stats.truncated += fitted is not ex
        stats.kept += 1
        stats.trained_tokens += fitted.trained_tokens
        stats.tokens += len(fitted.input_ids)
        out.append(fitted)
    return out, stats


def load_splits(data_cfg) -> tuple[list[Conversation], list[Conversation]]:
    """Train and validation conversations; without validation files, a content-hash split."""
    from .split import split_records

    if not data_cfg.train_files:
        raise DataError("data.train_files is empty", hint="list one or more ChatML JSONL files in the config")
    train = [c for f in data_cfg.train_files for c in read_conversations(f)]
    if data_cfg.validation_files:
        return train, [c for f in data_cfg.validation_files for c in read_conversations(f)]
    records = [{"messages": c.messages, "conv": c} for c in train]
    tr, va = split_records(records, data_cfg.validation_fraction)
    return [r["conv"] for r in tr], [r["conv"] for r in va]
