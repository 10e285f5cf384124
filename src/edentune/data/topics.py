"""Topic of a conversation by cheap rules: "coding", "korean" or "general".

- coding: a code fence anywhere, or at least two distinct programming keywords (English or
  Korean, e.g. "python", "함수", "컴파일") in the user and assistant turns.
- korean: not coding, and the user asks about the Korean language/culture (keywords such as
  한국어, 맞춤법, 존댓말, 추석, "Korean") or writes in Korean (lang.detect of the user turns).
- general: everything else.
Coding wins over Korean: a Korean-language question about Python trains the coding skill.
"""

from __future__ import annotations

import re

from edentune.data.lang import detect

TOPICS = ("coding", "general", "korean")
CODE_KEYWORDS = re.compile(
    r"\b(?:python|javascript|typescript|java|rust|golang|c\+\+|sql|html|css|bash|regex|api|json|yaml"
    r"|function|variable|compile[rd]?|debug|exception|stack ?trace|syntax|algorithm|recursion"
    r"|def|class|import|return|lambda|async|await|git|docker|npm|pip|array|loop|list|tuple|dict"
    r"|string|integer|complexity|big-o|o\([^)]{1,12}\))"
    r"|함수|변수|코드|코딩|프로그래밍|컴파일|디버그|디버깅|에러|예외|알고리즘|재귀|배열|반복문"
    r"|클래스|라이브러리|복잡도|문자열|리스트|딕셔너리|튜플|for문|while문|if문",
    re.I,
)
KOREAN_KEYWORDS = re.compile(
    r"한국어|한글|맞춤법|띄어쓰기|존댓말|반말|높임말|사자성어|속담|한국|추석|설날|김치|한복|세종"
    r"|\bkorea|\bhangul|\bchuseok|\bkimchi|\bhanbok|\bseollal",
    re.I,
)


def classify(record: dict) -> str:
    turns = [m for m in record["messages"] if m.get("role") in ("user", "assistant")]
    text = "\n".join(m.get("content") or "" for m in turns)
    if "```" in text or len({k.lower() for k in CODE_KEYWORDS.findall(text)}) >= 2:
        return "coding"
    user = "\n".join(m.get("content") or "" for m in turns if m["role"] == "user")
    if KOREAN_KEYWORDS.search(user) or detect(user) == "ko":
        return "korean"
    return "general"


def category(record: dict) -> str:
    """The record's own `category` label (e.g. "persona") when it has one, else `classify`."""
    cat = record.get("category")
    return cat if isinstance(cat, str) and cat else classify(record)
