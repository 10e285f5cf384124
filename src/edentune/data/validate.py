"""ChatML validation: `{"messages": [{"role", "content"}, ...]}`, extra keys kept.

Rules (each failure has one stable reason string):
- roles are system/user/assistant/tool; a system message may only come first;
- after the optional system prompt the conversation starts with the user, then user and assistant
  alternate; an assistant turn with `tool_calls` is followed by tool results, which are followed
  by more tool results or the assistant;
- there is at least one assistant turn and the last turn is the assistant's;
- content is a non-empty string. OpenAI content-part lists of text parts are joined with "\n"
  (a repair); any other part (image, audio, ...) is rejected. An assistant turn that carries
  `tool_calls` may have empty content;
- text containing chat-template control tokens is rejected: it could forge turns at training time.
"""

from __future__ import annotations

from collections.abc import Iterable

from edentune.data.records import MAX_LINE_BYTES, PathLike, Rejected, Report, load, write_outputs
from edentune.errors import DataError
from edentune.io import check_outputs

ROLES = ("system", "user", "assistant", "tool")
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
# Which turn may follow which; "tool_calls" is an assistant turn that requests tools.
NEXT = {
    "start": {"system", "user"},
    "system": {"user"},
    "user": {"assistant"},
    "assistant": {"user"},
    "tool_calls": {"tool"},
    "tool": {"tool", "assistant"},
}


def _content(msg: dict, i: int, repairs: list[str]) -> str:
    content = msg.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise Rejected("non-text content part", at=i, detail=str(kind))
            texts.append(part["text"])
        content = msg["content"] = "\n".join(texts)
        repairs.append("joined content parts")
    if content is None or content == "":
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            return ""
        raise Rejected("empty content", at=i)
    if not isinstance(content, str):
        raise Rejected("content is not a string", at=i, detail=type(content).__name__)
    if not content.strip():
        raise Rejected("empty content", at=i)
    for token in CONTROL_TOKENS:
        if token in content:
            raise Rejected("chat template control token in content", at=i, detail=token)
    return content


def validate_record(record: dict) -> tuple[dict, list[str]]:
    """Check one record; returns it (content parts joined in place) and the repairs made."""
    messages = record.get("messages")
    if messages is None:
        raise Rejected("missing 'messages'")
    if not isinstance(messages, list):
        raise Rejected("'messages' is not a list")
    if not messages:
        raise Rejected("'messages' is empty")
    repairs: list[str] = []
    state = "start"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise Rejected("message is not an object", at=i)
        role = msg.get("role")
        if role not in ROLES:
            raise Rejected("unknown role", at=i, detail=repr(role))
        if role == "system" and i > 0:
            raise Rejected("system message not first", at=i)
        calls = msg.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list) or not calls):
            raise Rejected("invalid tool_calls", at=i)
        _content(msg, i, repairs)
        if role not in NEXT[state]:
            raise Rejected(f"{role} turn after {state.replace('_', ' ')}", at=i)
        state = "tool_calls" if calls else role
    if not any(m["role"] == "assistant" for m in messages):
        raise Rejected("no assistant turn")
    if messages[-1]["role"] != "assistant":
        raise Rejected("last turn is not the assistant's")
    return record, repairs


def validate(paths: Iterable[PathLike], write: PathLike | None = None,
             quarantine: PathLike | None = None, max_line_bytes: int = MAX_LINE_BYTES, *,
             report_path: PathLike | None = None) -> tuple[list[dict], Report]:
    """Validate JSONL files; valid records go to `write`, rejected lines verbatim to `quarantine`,
    the report as JSON to `report_path` (all or none of them, never over an input)."""
    paths = list(paths)
    check_outputs(paths, [write, quarantine, report_path])
    report = Report()
    records = report.finish(load(paths, validate_record, report, max_line_bytes))
    write_outputs(paths, report, records, write, quarantine, report_path)
    return records, report


def load_valid(paths: Iterable[PathLike], max_line_bytes: int = MAX_LINE_BYTES) -> list[dict]:
    """Records of files that must be entirely valid (training-set inputs): invalid lines are an
    error here, never silently dropped."""
    paths = list(paths)
    records, report = validate(paths, max_line_bytes=max_line_bytes)
    if report.quarantined:
        shown = "\n  ".join(report.problems[:5])
        raise DataError(f"{report.quarantined} invalid line(s) in {', '.join(map(str, paths))}:\n  {shown}",
                        hint="run `edentune data validate` or `edentune data clean` first and use its output")
    return records
