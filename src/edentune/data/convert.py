"""Convert alpaca, ShareGPT and OpenAI chat records to ChatML, then validate them.

- alpaca (also KULLM-v2, Code Alpaca): `instruction`, optional `input`, `output`; the input is
  appended to the instruction after a blank line.
- sharegpt: `conversations` of `{"from": human|gpt|system, "value": ...}` (a few common aliases,
  and `role`/`content` keys, are accepted too).
- openai: `messages` whose content may be part lists; the join happens in validation.
- auto: decided per record from its keys, so one file may mix formats.

Keys a format does not consume are kept. `system` inserts a system prompt into conversations
that do not already have one (an existing prompt is the author's intent and wins).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from edentune.data.records import MAX_LINE_BYTES, PathLike, Rejected, Report, load, write_outputs
from edentune.data.validate import validate_record
from edentune.errors import DataError
from edentune.io import check_outputs

FORMATS = ("auto", "alpaca", "sharegpt", "openai")
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "system": "system",
}


def _alpaca(rec: dict) -> dict:
    instruction, inp, output = rec.get("instruction"), rec.get("input") or "", rec.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(inp, str):
        raise Rejected("alpaca record needs string 'instruction' and 'output'")
    prompt = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    rest = {k: v for k, v in rec.items() if k not in ("instruction", "input", "output")}
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": output}], **rest}


def _sharegpt(rec: dict) -> dict:
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        raise Rejected("sharegpt record needs a 'conversations' list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Rejected("message is not an object", at=i)
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise Rejected("unknown sharegpt speaker", at=i, detail=repr(speaker))
        messages.append({"role": role, "content": turn.get("value", turn.get("content"))})
    rest = {k: v for k, v in rec.items() if k != "conversations"}
    return {"messages": messages, **rest}


def _openai(rec: dict) -> dict:
    if "messages" not in rec:
        raise Rejected("openai record needs 'messages'")
    return rec


def detect(rec: dict) -> str:
    if "messages" in rec:
        return "openai"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    raise Rejected("unrecognised format", detail="expected messages, conversations or instruction/output")


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai}


def convert_record(rec: dict, fmt: str = "auto", system: str | None = None) -> tuple[dict, list[str]]:
    out = CONVERTERS[detect(rec) if fmt == "auto" else fmt](rec)
    msgs = out["messages"]
    first = msgs[0] if isinstance(msgs, list) and msgs else None
    if system and isinstance(msgs, list) and not (isinstance(first, dict) and first.get("role") == "system"):
        out["messages"] = [{"role": "system", "content": system}, *msgs]
    return validate_record(out)


def convert(paths: Iterable[PathLike], fmt: str = "auto", system: str | None = None,
            write: PathLike | None = None, quarantine: PathLike | None = None,
            max_line_bytes: int = MAX_LINE_BYTES, *, report_path: PathLike | None = None) -> tuple[list[dict], Report]:
    """Convert JSONL files to ChatML; unconvertible lines are quarantined with the reason."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")
    paths = list(paths)
    check_outputs(paths, [write, quarantine, report_path])
    report = Report()
    records = report.finish(load(paths, partial(convert_record, fmt=fmt, system=system), report, max_line_bytes))
    write_outputs(paths, report, records, write, quarantine, report_path)
    return records, report
