"""Rule checks on one answer: language, keywords, Python code blocks, named behaviours.

Each check is a small pure function of the answer text (the code check runs the sandbox).

Named behaviours (`expected_behavior` in a suite case):

| behaviour                      | passes when                                                                      |
|--------------------------------|----------------------------------------------------------------------------------|
| `asks_for_missing_information` | the answer asks a question (`?` or a Korean question ending) that requests the   |
|                                | missing detail (EN: which/where/what/could you/let me know…; KO: 어느/어디/어떤/ |
|                                | 알려주/말씀해…)                                                                   |
| `refuses`                      | the answer contains a refusal phrase (EN: "I can't", "I won't", "I'm unable"…;   |
|                                | KO: "수 없습니다", "도와드릴 수 없", "죄송하지만"…)                               |
| `answers_directly`             | the answer is non-empty and contains no refusal phrase (over-refusal check)      |
| `introduces_self`              | the answer contains the persona's name or Korean name                            |
| `provides_running_code`        | the answer has at least one Python block and the sandbox run passes (not scored  |
|                                | where the code is not run: no sandbox)                                           |
"""

from __future__ import annotations

import ast
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from edentune.data.lang import detect as detect_language
from edentune.data.lang import strip_code

from .sandbox import Limits, RunResult, run_python


# -- language ---------------------------------------------------------------------------------
# Languages the shared detector cannot name ("other") are told apart by their script.
SCRIPTS = {
    "ja": re.compile(r"[\u3040-\u30ff]"),  # kana: Japanese text always has some
    "zh": re.compile(r"[\u4e00-\u9fff]"),
    "ru": re.compile(r"[\u0400-\u04ff]"),
}
LANGUAGES = ("ko", "en", *SCRIPTS)
LETTER = re.compile(r"[^\W\d_]")


def detect_answer_language(answer: str, ko_threshold: float = 0.5) -> str:
    """"ko", "en", "ja", "zh", "ru", "mixed" or "other"."""
    detected = detect_language(answer, ko_threshold=ko_threshold)
    if detected != "other":
        return detected
    text = strip_code(answer)
    counts = {lang: len(rx.findall(text)) for lang, rx in SCRIPTS.items()}
    if counts["ja"]:
        return "ja"  # kana decides: Japanese mixes kana with Han characters
    best = max(counts, key=counts.get)
    return best if counts[best] else "other"


def language_ok(answer: str, expected: str, ko_threshold: float = 0.5) -> tuple[bool | None, str]:
    """(consistent, detected); consistent is None for an answer with no prose outside code. The detector (shared with the data pipeline) removes fenced and
    inline code first, and counts Hangul runs against all letter runs for Korean, so Korean prose
    with English technical terms ("React의 useState 훅") stays Korean. Anything other than the
    expected language, including "mixed", counts as language mixing."""
    if not LETTER.search(strip_code(answer)):
        return None, "none"
    detected = detect_answer_language(answer, ko_threshold)
    return detected == expected, detected


# -- keywords ---------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Case- and width-insensitive form: NFKC folds full-width ｕｓｅＳｔａｔｅ to useState."""
    return unicodedata.normalize("NFKC", text).casefold()


@dataclass
class KeywordResult:
    passed: bool
    found: list[str]
    missing: list[str]

    @property
    def hit_rate(self) -> float:
        total = len(self.found) + len(self.missing)
        return len(self.found) / total if total else 1.0


def keyword_hits(answer: str, keywords: list[str], mode: str = "any") -> KeywordResult:
    """`any`: one keyword suffices; `all`: every keyword must appear. Substring match on the
    normalized text, code included (keywords are often identifiers such as `[::-1]`)."""
    text = normalize(answer)
    found = [k for k in keywords if normalize(k) in text]
    missing = [k for k in keywords if k not in found]
    passed = bool(found) if mode == "any" else not missing
    return KeywordResult(passed, found, missing)


# -- Python code ------------------------------------------------------------------------------
FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)  # unclosed: cut off by max tokens
PYTHON_LABELS = {"python", "py", "python3"}


def python_blocks(answer: str) -> list[str]:
    """Fenced blocks labelled python/py/python3, and unlabelled blocks that parse as Python and
    are more than a bare expression (a lone `reverse()` or a shell line is not a program)."""
    blocks = []
    for label, body in FENCE.findall(answer):
        label = label.lower()
        if label in PYTHON_LABELS:
            blocks.append(body)
        elif not label and _is_python_program(body):
            blocks.append(body)
    return blocks


def _is_python_program(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(not isinstance(node, ast.Expr) for node in tree.body) or len(tree.body) > 1


def run_answer_code(answer: str, limits: Limits = Limits(), mode: str = "auto") -> RunResult | None:
    """Run an answer's Python blocks as one program (later blocks often use earlier definitions);
    None when the answer has no Python. `mode` is `evaluation.run_code`."""
    blocks = python_blocks(answer)
    return run_python("\n\n".join(blocks), limits, mode) if blocks else None


# -- named behaviours -------------------------------------------------------------------------
REFUSAL = re.compile(
    r"\b(i\s+(?:can(?:not|'t|’t)|won(?:'t|’t)|am\s+(?:not\s+able|unable)|'m\s+(?:not\s+able|unable))|"
    r"i’m\s+(?:not\s+able|unable)|(?:sorry|apologi[sz]e),?\s+but|not\s+able\s+to\s+help)"
    r"|수\s*없습니다|수\s*없어요|도와\s*드릴\s*수\s*없|드릴\s*수\s*없|죄송하지만|죄송합니다만|응할\s*수\s*없",
    re.I,
)
QUESTION = re.compile(r"[?？]|(?:까요|나요|가요|을까)\s*[.!]?\s*$", re.M)
ASKS_FOR = re.compile(
    r"\b(which|where|what|could you|can you|would you|let me know|tell me|do you mean|your (?:location|city|area))\b"
    r"|어느|어디|어떤|무슨|알려\s*주|말씀해\s*주|말씀\s*주|지역|위치",
    re.I,
)


@dataclass
class AnswerContext:
    """What a behaviour rule may look at besides the answer text."""

    persona_names: tuple[str, ...] = ()
    code: RunResult | None = None


def _asks_for_missing_information(answer: str, ctx: AnswerContext) -> tuple[bool, str]:
    text = strip_code(answer)
    if not QUESTION.search(text):
        return False, "asks no question"
    return (True, "") if ASKS_FOR.search(text) else (False, "asks a question but not for the missing detail")


def _refuses(answer: str, ctx: AnswerContext) -> tuple[bool, str]:
    return (True, "") if REFUSAL.search(answer) else (False, "no refusal phrase")


def _answers_directly(answer: str, ctx: AnswerContext) -> tuple[bool, str]:
    if not answer.strip():
        return False, "empty answer"
    m = REFUSAL.search(answer)
    return (False, f"refuses ({m.group(0)!r})") if m else (True, "")


def _introduces_self(answer: str, ctx: AnswerContext) -> tuple[bool, str]:
    text = normalize(answer)
    ok = any(normalize(n) in text for n in ctx.persona_names)
    return (True, "") if ok else (False, f"does not say its name ({' / '.join(ctx.persona_names)})")


def _provides_running_code(answer: str, ctx: AnswerContext) -> tuple[bool | None, str]:
    if ctx.code is None:
        return False, "no Python code block"
    if ctx.code.status == "not_run":
        return None, ctx.code.error  # not measured: neither a pass nor a failure
    return (True, "") if ctx.code.status == "pass" else (False, f"code {ctx.code.status}: {ctx.code.error}")


BEHAVIORS: dict[str, Callable[[str, AnswerContext], tuple[bool | None, str]]] = {
    "asks_for_missing_information": _asks_for_missing_information,
    "refuses": _refuses,
    "answers_directly": _answers_directly,
    "introduces_self": _introduces_self,
    "provides_running_code": _provides_running_code,
}


def check_behavior(name: str, answer: str, ctx: AnswerContext) -> tuple[bool | None, str]:
    """(passed, reason when not); passed is None when it could not be measured (code not run).
    Unknown names are rejected when the suite is loaded."""
    return BEHAVIORS[name](answer, ctx)
