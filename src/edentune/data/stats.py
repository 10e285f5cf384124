"""Dataset statistics: sizes, token lengths per role, sequence-length overflow, language and topic
mix against the guide's targets, exact duplicates.

Tokenizer: a Hugging Face tokenizer (a fast one is batch-encoded in Rust without offsets) or any
callable mapping a list of texts to token-id lists or to lengths. The sequence length of a
conversation is the sum of its messages' token counts plus the chat template's overhead for that
sequence of roles; the overhead is measured once per role pattern by rendering the template with
empty contents. Special tokens between turns keep BPE merges from crossing turn boundaries, so
this matches full rendering without tokenizing every conversation twice. Without a chat template
the plain sum is used. Tool-call arguments count towards the assistant turn that makes them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, Field

from edentune.data import lang, topics
from edentune.data.clean import dedup_key
from edentune.data.records import MAX_LINE_BYTES, PathLike, Report, load
from edentune.data.validate import validate_record
from edentune.io import atomic_outputs, check_outputs

# The guide's target topic mix (share of conversations).
TOPIC_TARGETS = {"coding": (0.50, 0.60), "general": (0.20, 0.30), "korean": (0.10, 0.20)}
ROLES = ("system", "user", "assistant", "tool")
BATCH = 8192


class Lengths(BaseModel):
    count: int
    p50: float
    p95: float
    max: int


class Stats(BaseModel):
    conversations: int
    invalid_lines: int
    turns: int
    tokens: dict[str, Lengths] = Field(default_factory=dict)  # role or "conversation" -> lengths
    histogram: list[tuple[int, int, int]] = Field(default_factory=list)  # (lo, hi, count)
    max_seq_len: int | None = None
    over_max_seq_len: int | None = None
    chat_template: bool = False
    languages: dict[str, int]
    topics: dict[str, int]  # coding/general/korean, plus any `category` labels the records carry
    topic_flags: list[str]  # topics outside their target range, explained
    exact_duplicates: int


def _count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    out: list[int] = []
    for i in range(0, len(texts), BATCH):
        chunk = list(texts[i:i + BATCH])
        if backend is not None:
            out += [len(e.ids) for e in backend.encode_batch_fast(chunk, add_special_tokens=False)]
            continue
        res = tokenizer(chunk)
        ids = res["input_ids"] if isinstance(res, dict) or hasattr(res, "keys") else res
        out += [x if isinstance(x, int) else len(x) for x in ids]
    return out


def _message_text(m: dict) -> str:
    calls = m.get("tool_calls")
    return (m.get("content") or "") + (json.dumps(calls, ensure_ascii=False) if calls else "")


def _template_overhead(tokenizer, records: list[dict]) -> list[int] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    cache: dict[tuple, int] = {}
    out = []
    for rec in records:
        roles = tuple(m["role"] for m in rec["messages"])
        if roles not in cache:
            skeleton = [{"role": r, "content": ""} for r in roles]
            try:
                rendered = tokenizer.apply_chat_template(skeleton, tokenize=False)
                cache[roles] = _count_tokens(tokenizer, [rendered])[0]
            except Exception:  # templates raise arbitrary errors for roles they refuse: count content only
                cache[roles] = 0
        out.append(cache[roles])
    return out


def _lengths(values: list[int]) -> Lengths:
    a = np.asarray(values)
    p50, p95 = np.percentile(a, [50, 95])
    return Lengths(count=len(a), p50=float(p50), p95=float(p95), max=int(a.max()))


def _histogram(values: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    counts, edges = np.histogram(values, bins=bins)
    return [(int(lo), int(hi), int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def topic_flags(mix: dict[str, int]) -> list[str]:
    """Topics outside the guide's range; shares are of coding+general+korean (persona and other
    labelled categories have their own quotas and are left out)."""
    total = sum(mix.get(t, 0) for t in TOPIC_TARGETS) or 1
    flags = []
    for topic, (lo, hi) in TOPIC_TARGETS.items():
        share = mix.get(topic, 0) / total
        if not lo <= share <= hi:
            flags.append(f"{topic} is {share:.0%}, target {lo:.0%}-{hi:.0%}")
    return flags


def compute_stats(records: list[dict], tokenizer: Callable | None = None,
                  max_seq_len: int | None = None, invalid_lines: int = 0) -> Stats:
    """Statistics over validated ChatML records; token figures need a tokenizer."""
    dialogue = ("\n".join(m.get("content") or "" for m in r["messages"] if m["role"] != "system") for r in records)
    lang_mix = Counter(lang.detect(text) for text in dialogue)
    topic_mix = Counter(topics.category(r) for r in records)
    keys = Counter(dedup_key(r) for r in records)
    stats = Stats(
        conversations=len(records), invalid_lines=invalid_lines,
        turns=sum(len(r["messages"]) for r in records),
        languages=dict(lang_mix), topics={t: topic_mix.get(t, 0) for t in topics.TOPICS} | dict(topic_mix),
        topic_flags=topic_flags(topic_mix), exact_duplicates=sum(n - 1 for n in keys.values()),
    )
    if tokenizer is None or not records:
        return stats
    flat = [(n, m["role"], _message_text(m)) for n, r in enumerate(records) for m in r["messages"]]
    counts = _count_tokens(tokenizer, [t for _, _, t in flat])
    per_conv = [0] * len(records)
    by_role: dict[str, list[int]] = {}
    for (n, role, _), c in zip(flat, counts):
        per_conv[n] += c
        by_role.setdefault(role, []).append(c)
    overhead = _template_overhead(tokenizer, records)
    if overhead is not None:
        per_conv = [a + b for a, b in zip(per_conv, overhead)]
    stats.tokens = {role: _lengths(by_role[role]) for role in ROLES if role in by_role}
    stats.tokens["conversation"] = _lengths(per_conv)
    stats.histogram = _histogram(per_conv)
    stats.chat_template = overhead is not None
    if max_seq_len:
        stats.max_seq_len = max_seq_len
        stats.over_max_seq_len = sum(n > max_seq_len for n in per_conv)
    return stats


def stats(paths: Iterable[PathLike], tokenizer: Callable | None = None,
          max_seq_len: int | None = None, max_line_bytes: int = MAX_LINE_BYTES, *,
          json_path: PathLike | None = None) -> Stats:
    """Statistics over the valid records of JSONL files; invalid lines are only counted. With
    `json_path` the statistics are also written there as JSON (never over an input)."""
    paths = list(paths)
    check_outputs(paths, [json_path])
    report = Report()
    records = report.finish(load(paths, validate_record, report, max_line_bytes))
    st = compute_stats(records, tokenizer, max_seq_len, invalid_lines=report.quarantined)
    if json_path is not None:
        with atomic_outputs(inputs=paths, outputs=[json_path]) as txn:
            txn.write_json(json_path, st.model_dump())
    return st
