"""Shared helpers for the data-pipeline tests."""

import json


def chat(*turns, system=None, **extra):
    """A valid ChatML record from alternating user/assistant texts."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"messages": msgs, **extra}


def write_lines(path, lines):
    """Write raw lines (str or bytes, no terminator added beyond \\n)."""
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def write_records(path, records):
    return write_lines(path, [json.dumps(r, ensure_ascii=False) for r in records])


def read_jsonl(path):
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]
