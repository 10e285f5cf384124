"""Thumbs-up/down feedback logs -> the preference datasets TRL trains on (KTO and DPO).

Assistant apps log one rated answer per JSONL line:

    {"messages": [system?, user, ..., {"role": "assistant", "content": "the answer"}], "rating": "up"}

The last message is the rated answer and everything before it is the prompt; some apps log the
answer as a top-level `"completion"` string instead, with `messages` holding only the prompt. The
rating may sit under `rating`, `feedback`, `thumbs` or `label` (the first present wins) and may be
spelled up/down, 👍/👎, thumbs_up/thumbs_down, good/bad, true/false or 1/-1 (0 counts as down).

Why two outputs: a thumbs rating is an *unpaired* preference, which is exactly what KTO learns
from (`kto.jsonl`, every usable rating). DPO needs a chosen and a rejected answer to the same
prompt, which feedback only yields when a prompt was answered several times and rated both ways
(`dpo.jsonl`). Both use TRL's conversational format so its chat template renders the prompt.

The data stage's guarantees hold here too (see `records`): every input line is kept, repaired
(BOM/CRLF, content parts joined, secrets redacted by `scrub`) or quarantined with its reason, and
the counts must add up. The conversation itself is checked by `validate.validate_record`, the
same rules as every other ChatML input. On top of that:
- an exact repeat (same prompt, answer and rating) is quarantined, the first one kept: repeated
  clicks would otherwise weigh one answer several times;
- the same prompt and answer rated both up and down is quarantined on every side, because there
  is no way to tell which rating to trust and training on both teaches nothing but noise.
Duplicates and conflicts are judged after redaction, as `clean` does, and quarantined lines are
redacted too: like `clean`, this stage never writes a secret it found.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edentune.data.clean import apply_check, redact_quarantine, scrubber
from edentune.data.records import MAX_LINE_BYTES, Item, Rejected, Report, load
from edentune.data.validate import validate_record
from edentune.errors import DataError
from edentune.io import atomic_outputs, check_outputs

RATING_KEYS = ("rating", "feedback", "thumbs", "label")
UP = frozenset({"up", "👍", "thumbs_up", "good"})
DOWN = frozenset({"down", "👎", "thumbs_down", "bad"})
# Emoji pickers append a variation selector or a skin tone to 👍/👎; neither changes the meaning.
EMOJI_MODIFIERS = dict.fromkeys([0xFE0F, *range(0x1F3FB, 0x1F400)])
MAX_PAIRS_PER_PROMPT = 4
MIN_RATINGS = 50
# KTO paper Eq. 8 wants desirable_weight*n_up / (undesirable_weight*n_down) in [1, 4/3]. Weights
# are aimed at the middle of that range so rounding them to TRL's two decimals stays inside it.
KTO_RATIO_RANGE = (1.0, 4 / 3)
KTO_TARGET_RATIO = 7 / 6

KTO_FILE, DPO_FILE, QUARANTINE_FILE, STATS_FILE = "kto.jsonl", "dpo.jsonl", "quarantine.jsonl", "feedback_stats.json"


def parse_rating(value: object) -> bool:
    """True for a thumbs-up, False for a thumbs-down; anything else raises Rejected."""
    if isinstance(value, bool):  # before the number check: True == 1 in Python
        return value
    if isinstance(value, (int, float)) and value in (1, 0, -1):
        return value == 1
    if isinstance(value, str):
        word = value.strip().casefold().translate(EMOJI_MODIFIERS)
        if word in UP:
            return True
        if word in DOWN:
            return False
    raise Rejected("unknown rating", detail=_short(value))


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_feedback(record: dict) -> tuple[dict, list[str]]:
    """One feedback line -> `{"messages": prompt + [answer], "label": bool}` and the repairs made.

    The output keeps the ChatML shape so `validate_record` and the scrubber apply unchanged.
    """
    messages = record.get("messages")
    if "completion" in record:
        completion = record["completion"]
        if not isinstance(completion, str):
            raise Rejected("'completion' is not a string", detail=type(completion).__name__)
        if isinstance(messages, list):
            if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
                # Two candidate answers: rating the wrong one would invert the lesson.
                raise Rejected("both 'completion' and a final assistant message", detail="which one was rated?")
            messages = [*messages, {"role": "assistant", "content": completion}]
    chat, repairs = validate_record({"messages": messages})
    if chat["messages"][-1].get("tool_calls"):
        raise Rejected("rated answer is a tool call", at=len(chat["messages"]) - 1, detail="a rating needs a text answer")
    key = next((k for k in RATING_KEYS if k in record), None)
    if key is None:
        raise Rejected("missing rating", detail=f"expected one of: {', '.join(RATING_KEYS)}")
    try:
        label = parse_rating(record[key])
    except Rejected as e:
        e.detail = f"{key}={e.detail}"
        raise
    return {"messages": chat["messages"], "label": label}, repairs


def _canonical(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _prompt_key(record: dict) -> str:
    # Role and text only: apps that log per-message ids or timestamps still pair the same prompt.
    return _canonical([(m["role"], m.get("content")) for m in record["messages"][:-1]])


def _answer(record: dict) -> str:
    return record["messages"][-1]["content"]


def _drop_duplicates(items: list[Item], report: Report) -> list[Item]:
    seen: dict[tuple[str, str, bool], str] = {}

    def check(item: Item) -> None:
        first = seen.setdefault((_prompt_key(item.record), _answer(item.record), item.record["label"]), item.source)
        if first != item.source:
            raise Rejected("exact duplicate", detail=f"of {first}")
    return apply_check(items, report, check)


def _drop_conflicts(items: list[Item], report: Report) -> list[Item]:
    # Needs the whole input first: the contradicting rating may come later in the file.
    by_answer: dict[tuple[str, str], dict[bool, list[str]]] = {}
    for item in items:
        sides = by_answer.setdefault((_prompt_key(item.record), _answer(item.record)), {True: [], False: []})
        sides[item.record["label"]].append(item.source)

    def check(item: Item) -> None:
        sides = by_answer[(_prompt_key(item.record), _answer(item.record))]
        if sides[True] and sides[False]:
            raise Rejected("conflicting ratings", detail=f"same prompt and answer rated up at {_sources(sides[True])} "
                                                         f"and down at {_sources(sides[False])}")
    return apply_check(items, report, check)


def _sources(sources: list[str], shown: int = 3) -> str:
    more = f" and {len(sources) - shown} more" if len(sources) > shown else ""
    return ", ".join(sources[:shown]) + more


def kto_example(record: dict) -> dict:
    """TRL's unpaired-preference conversational row."""
    return {"prompt": record["messages"][:-1], "completion": [{"role": "assistant", "content": _answer(record)}],
            "label": record["label"]}


def dpo_pairs(records: list[dict], max_per_prompt: int = MAX_PAIRS_PER_PROMPT) -> list[dict]:
    """Pair every up answer with every down answer of the same prompt, first-seen order, capped
    per prompt so one popular prompt cannot dominate the set."""
    groups: dict[str, tuple[list, dict[bool, list[str]]]] = {}
    for rec in records:
        prompt, sides = groups.setdefault(_prompt_key(rec), (rec["messages"][:-1], {True: [], False: []}))
        sides[rec["label"]].append(_answer(rec))
    pairs = []
    for prompt, sides in groups.values():
        combos = [(up, down) for up in sides[True] for down in sides[False]][:max_per_prompt]
        pairs += [{"prompt": prompt, "chosen": [{"role": "assistant", "content": up}],
                   "rejected": [{"role": "assistant", "content": down}]} for up, down in combos]
    return pairs


def kto_weights(n_up: int, n_down: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) for TRL's KTOConfig: the larger class stays at 1.0
    and the smaller one is raised until the weighted ratio is in KTO_RATIO_RANGE. With one class
    missing there is nothing to balance, so both stay at 1.0."""
    if n_up == 0 or n_down == 0:
        return 1.0, 1.0
    ratio = n_up / n_down
    lo, hi = KTO_RATIO_RANGE
    if ratio < lo:
        return round(KTO_TARGET_RATIO / ratio, 2), 1.0
    if ratio > hi:
        return 1.0, round(ratio / KTO_TARGET_RATIO, 2)
    return 1.0, 1.0


@dataclass
class FeedbackResult:
    """What `prepare_feedback` did; `report` holds the line counts, reasons and problems."""

    report: Report
    desirable: int  # thumbs-up ratings written to kto.jsonl
    undesirable: int  # thumbs-down ratings written to kto.jsonl
    pairs: int  # rows written to dpo.jsonl
    desirable_weight: float
    undesirable_weight: float
    warnings: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)  # "kto", "dpo", "quarantine", "stats"

    lines = property(lambda self: self.report.lines)
    kept = property(lambda self: self.report.kept)
    repaired = property(lambda self: self.report.repaired)
    quarantined = property(lambda self: self.report.quarantined)
    blank = property(lambda self: self.report.blank)

    def summary(self) -> str:
        return self.report.summary()


def _warnings(n_up: int, n_down: int, n_pairs: int) -> list[str]:
    out = []
    if n_down == 0:
        out.append("no thumbs-down ratings: KTO needs both liked and disliked answers to learn from")
    if n_up == 0:
        out.append("no thumbs-up ratings: KTO needs both liked and disliked answers to learn from")
    if n_up + n_down < MIN_RATINGS:
        out.append(f"only {n_up + n_down} usable rating(s): too few to learn from (collect at least {MIN_RATINGS})")
    if n_pairs == 0:
        out.append("no prompt has both a thumbs-up and a thumbs-down answer: dpo.jsonl is empty, use kto.jsonl")
    return out


def _ratings(paths: list[Path], max_pairs_per_prompt: int = MAX_PAIRS_PER_PROMPT,
             max_line_bytes: int = MAX_LINE_BYTES) -> tuple[Report, list[dict], list[dict]]:
    """(report, the usable ratings, the DPO pairs) of feedback files, nothing written."""
    report = Report()
    items = load(paths, parse_feedback, report, max_line_bytes)
    items = apply_check(items, report, scrubber(report, "redact"))
    items = _drop_conflicts(_drop_duplicates(items, report), report)
    redact_quarantine(report)
    records = report.finish(items)
    return report, records, dpo_pairs(records, max_pairs_per_prompt)


def feedback_problem(paths: list[str | Path], method: str) -> str | None:
    """Why the feedback in `paths` gives preference training with `method` (kto | dpo) nothing to
    learn from, or None: what that step would find, known before any training starts."""
    paths = [Path(p) for p in paths]
    report, records, pairs = _ratings(paths)
    names = ", ".join(map(str, paths))
    if not records:
        reasons = ", ".join(f"{r} ({n})" for r, n in list(report.reasons.items())[:3])
        return f"{names}: no usable rating in {report.lines} line(s)" + (f": {reasons}" if reasons else "")
    n_up = sum(1 for r in records if r["label"])
    if method == "kto" and n_up in (0, len(records)):
        return (f"{names}: only thumbs-{'up' if n_up else 'down'} ratings ({len(records)}): "
                "KTO learns from the contrast and needs both")
    if method == "dpo" and not pairs:
        return f"{names}: no prompt has both a thumbs-up and a thumbs-down answer: DPO has no pair to learn from"
    return None


def prepare_feedback(paths: list[str | Path], out_dir: str | Path, *, max_pairs_per_prompt: int = MAX_PAIRS_PER_PROMPT,
                     max_line_bytes: int = MAX_LINE_BYTES) -> FeedbackResult:
    """Read feedback JSONL files and write kto.jsonl, dpo.jsonl, quarantine.jsonl and
    feedback_stats.json to `out_dir` (all four or none, never over an input). Raises DataError
    for unreadable input."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no feedback files given", hint="pass one or more JSONL files")
    if max_pairs_per_prompt < 0:
        raise DataError(f"max_pairs_per_prompt must be >= 0, got {max_pairs_per_prompt}")
    out = Path(out_dir)
    outputs = {"kto": out / KTO_FILE, "dpo": out / DPO_FILE, "quarantine": out / QUARANTINE_FILE, "stats": out / STATS_FILE}
    check_outputs(paths, outputs.values())  # before reading: `-o` holding an input is refused up front
    report, records, pairs = _ratings(paths, max_pairs_per_prompt, max_line_bytes)
    n_up = sum(1 for r in records if r["label"])
    n_down = len(records) - n_up
    w_up, w_down = kto_weights(n_up, n_down)
    result = FeedbackResult(report, n_up, n_down, len(pairs), w_up, w_down, _warnings(n_up, n_down, len(pairs)), outputs)
    # The four files appear together or not at all.
    with atomic_outputs(inputs=paths, outputs=outputs.values()) as txn:
        txn.write_jsonl(outputs["kto"], map(kto_example, records))
        txn.write_jsonl(outputs["dpo"], pairs)
        txn.write_jsonl(outputs["quarantine"], report.quarantine)
        txn.write_json(outputs["stats"], {
            "inputs": [str(p) for p in paths],
            "lines": report.lines, "kept": report.kept, "repaired": report.repaired,
            "quarantined": report.quarantined, "blank": report.blank,
            "reasons": report.reasons, "repairs": report.repairs,
            "findings": dict(Counter(f["kind"] for f in report.findings)),
            "desirable": n_up, "undesirable": n_down, "pairs": len(pairs),
            "kto_weights": {"desirable_weight": w_up, "undesirable_weight": w_down},
            "warnings": result.warnings,
        })
    return result
