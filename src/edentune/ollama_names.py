"""Ollama's rules for model names, checked when a config is read (not when Ollama refuses it).

A name is `[host/][namespace/]model[:tag]`, as Ollama's `types/model/name.go` parses it: every
part starts with a letter, digit or `_` and continues with those, `-` and `.` (no `.` in the
namespace; the host may hold `:` for its port); the host is at most 350 characters, the other
parts at most 80. edentune also keeps the replaced model as `<name>:previous` (or
`<name>:<tag>-previous`), so a tag leaves room for that suffix. A name outside these rules
(`../../etc/x`, `$(id)`, spaces) never reaches Ollama, a shell or a path.
"""

from __future__ import annotations

import re

PREVIOUS_SUFFIX = "-previous"  # export.deploy.previous_name: <name>:<tag>-previous
_PART = {"host": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}"), "namespace": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"),
         "model": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
         "tag": re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{79 - len(PREVIOUS_SUFFIX)}}}")}


def ollama_name_problem(name: str) -> str | None:
    """Why `name` is not a usable Ollama model name, or None."""
    if not isinstance(name, str) or not name:
        return "an Ollama model name cannot be empty"
    path, sep, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    segments = path.split("/")
    if len(segments) > 3:
        return "an Ollama model name has at most host/namespace/model before the :tag"
    kinds = ["host", "namespace", "model"][3 - len(segments):]
    for kind, part in [*zip(kinds, segments), *([("tag", tag)] if sep else [])]:
        if not _PART[kind].fullmatch(part):
            limit = 350 if kind == "host" else 80 - (len(PREVIOUS_SUFFIX) if kind == "tag" else 0)
            return (f"its {kind} {part!r} is not valid for Ollama: 1-{limit} letters, digits, _, - and ."
                    f"{' (no .)' if kind == 'namespace' else ''}, starting with a letter, digit or _")
    return None


def check_ollama_name(name: str) -> str:
    """`name` if Ollama accepts it; else ValueError (for pydantic validators: the key is named there)."""
    if problem := ollama_name_problem(name):
        raise ValueError(f"{name!r}: {problem}")
    return name
