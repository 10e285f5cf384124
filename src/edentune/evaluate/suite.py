"""Test suites: YAML (a list of cases, or a mapping with `cases:`) or JSONL (one case a line).

A case:

    id: ko-list-reverse            # optional; defaults to <file stem>-<n>
    category: coding               # optional; reports break metrics down by it
    prompt: 파이썬에서 리스트를 뒤집는 방법을 알려주세요   # or `messages: [{role, content}, …]`
    system: …                      # optional; else the run's model.system_prompt
    expected_language: ko          # ko | en | ja | zh | ru
    expected_keywords: [reverse, "[::-1]", reversed()]   # any one suffices; or {all: [...]} / {any: [...]}
    expected_behavior: provides_running_code             # a rule from checks.BEHAVIORS

Every problem is reported as `file:line: reason`, all at once, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from edentune.errors import DataError

from .checks import BEHAVIORS, LANGUAGES

SUITES_DIR = Path(__file__).parent / "suites"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class Keywords(_Strict):
    mode: Literal["any", "all"] = "any"
    words: list[str]


class Case(_Strict):
    id: str
    category: str = "general"
    prompt: str | None = None
    messages: list[Message] | None = None
    system: str | None = None
    expected_language: str | None = None
    expected_keywords: Keywords | None = None
    expected_behavior: str | None = None

    @field_validator("expected_keywords", mode="before")
    @classmethod
    def _keywords(cls, v):
        # No keywords (`[]`, `{any: []}`): no keyword check (n/a), rather than one that can never pass.
        if isinstance(v, list):
            return {"mode": "any", "words": v} if v else None
        if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("any", "all"):
            mode, words = next(iter(v.items()))
            return {"mode": mode, "words": words} if words != [] else None
        if v is None:
            return v
        raise ValueError("must be a list of keywords, or {any: [...]} / {all: [...]}")

    @field_validator("expected_language")
    @classmethod
    def _language(cls, v):
        if v is not None and v not in LANGUAGES:
            raise ValueError(f"unknown language {v!r}; supported: {', '.join(LANGUAGES)}")
        return v

    @field_validator("expected_behavior")
    @classmethod
    def _behavior(cls, v):
        if v is not None and v not in BEHAVIORS:
            raise ValueError(f"unknown behaviour {v!r}; known: {', '.join(BEHAVIORS)}")
        return v

    @model_validator(mode="after")
    def _conversation(self) -> Case:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.messages is not None and (not self.messages or self.messages[-1].role != "user"):
            raise ValueError("`messages` must end with a user turn (the model answers it)")
        if self.system is not None and self.messages and self.messages[0].role == "system":
            raise ValueError("`system` is set and `messages` starts with a system turn: keep one")
        if not (self.expected_language or self.expected_keywords or self.expected_behavior):
            raise ValueError("checks nothing: set expected_language, expected_keywords or expected_behavior")
        return self

    def conversation(self, default_system: str | None) -> list[dict]:
        """The messages sent to the model, always with an explicit system turn (an absent one lets
        some templates inject their own, e.g. Qwen's "You are Qwen…")."""
        turns = [m.model_dump() for m in self.messages] if self.messages else [{"role": "user", "content": self.prompt}]
        if turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system or default_system or ""})
        return turns

    @property
    def question(self) -> str:
        return self.prompt if self.prompt is not None else self.messages[-1].content


@dataclass
class Suite:
    name: str
    path: str
    cases: list[Case]

    @property
    def categories(self) -> list[str]:
        return sorted({c.category for c in self.cases})

    @property
    def sha256(self) -> str:
        """Content hash of the cases as evaluated (ids, prompts, checks), independent of the file's
        formatting, comments, key order or path: two results are comparable only when it matches."""
        return canonical_sha256([c.model_dump(mode="json") for c in self.cases])


def canonical_sha256(value) -> str:
    """sha256 of a JSON-able value in one canonical form (sorted keys, no whitespace, UTF-8)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _yaml_items(path: Path, text: str) -> list[tuple[int, object]]:
    """(line, python value) for each case, line from the YAML node marks."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise DataError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise DataError(f"{path}:{line}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if isinstance(root, yaml.MappingNode):
        root = next((v for k, v in root.value if k.value == "cases"), None)
    if not isinstance(root, yaml.SequenceNode):
        raise DataError(f"{path}:1: expected a list of cases (or a mapping with `cases:`)")
    constructor = yaml.SafeLoader("")
    items = []
    for node in root.value:
        try:  # the safe constructor refuses tags such as !!python/object: a clear error, never code
            items.append((node.start_mark.line + 1, constructor.construct_document(node)))
        except RecursionError:
            raise DataError(f"{path}:{node.start_mark.line + 1}: YAML nested too deeply") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None) or node.start_mark
            raise DataError(f"{path}:{mark.line + 1}: not a plain YAML value: {getattr(err, 'problem', err)}",
                            hint="a suite holds plain mappings, lists and strings; remove the `!!` tag") from None
    return items


def _jsonl_items(path: Path, text: str) -> tuple[list[tuple[int, object]], list[str]]:
    items, errors = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            errors.append(f"{path}:{n}: not valid JSON: {err.msg}")
        except (ValueError, RecursionError) as err:  # a 5000-digit number, nesting deeper than Python's stack
            errors.append(f"{path}:{n}: not usable JSON: {str(err) or type(err).__name__}")
    return items, errors


def resolve_suite_path(name_or_path: str) -> Path:
    """`default` (or another bundled name) or a file path."""
    bundled = SUITES_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    path = Path(name_or_path).expanduser()
    known = ", ".join(p.stem for p in SUITES_DIR.glob("*.yaml"))
    if not path.exists():
        raise DataError(f"{name_or_path}: no such suite file", hint=f"bundled suites: {known}; or give a .yaml/.jsonl path")
    if not path.is_file():
        raise DataError(f"{name_or_path}: not a file", hint=f"give a suite .yaml/.jsonl file; bundled suites: {known}")
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text suite file (invalid UTF-8 at byte {err.start})",
                        hint="a suite is a UTF-8 .yaml or .jsonl file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the suite ({err.strerror or err})") from None


def load_suite(name_or_path: str) -> Suite:
    path = resolve_suite_path(name_or_path)
    text = _read_text(path)
    if "\x00" in text:
        raise DataError(f"{path}: not a text suite file (it contains NUL bytes)", hint="a suite is a UTF-8 .yaml or .jsonl file")
    if path.suffix == ".jsonl":
        items, errors = _jsonl_items(path, text)
    else:
        items, errors = _yaml_items(path, text), []
    cases, seen = [], {}
    for n, (line, raw) in enumerate(items, 1):
        if not isinstance(raw, dict):
            errors.append(f"{path}:{line}: a case must be a mapping, got {type(raw).__name__}")
            continue
        raw = {"id": f"{path.stem}-{n}", **raw}
        try:
            case = Case.model_validate(raw)
        except ValidationError as err:
            for e in err.errors():
                key = ".".join(str(p) for p in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    msg = f"unknown field; allowed: {', '.join(Case.model_fields)}"
                errors.append(f"{path}:{line}: case {raw['id']!r}: {key + ': ' if key else ''}{msg}")
            continue
        if case.id in seen:
            errors.append(f"{path}:{line}: duplicate id {case.id!r} (first at line {seen[case.id]})")
            continue
        seen[case.id] = line
        cases.append(case)
    if errors:
        raise DataError(f"{path}: invalid test suite\n" + "\n".join(f"  {e}" for e in errors))
    if not cases:
        raise DataError(f"{path}: the suite has no cases")
    return Suite(path.stem, str(path), cases)
