"""Find secrets and personal data in message text; redact them or let the caller drop the record.

Detectors run in order on each message; each replaces what it finds with `[REDACTED_<KIND>]`,
so later detectors never see (or double-count) an earlier finding. Findings name the kind and
where it was (record, message index), never the matched text.

Precision choices (false positives cost training data, misses leak data):
- Korean resident registration numbers must have a valid birth date and gender digit 1-8.
- Card numbers must be 13-19 digits and pass the Luhn check.
- Phone numbers: Korean mobiles (010-1234-5678, 01012345678, +82 10 ...), Korean landlines with
  separators, and "+"-prefixed international numbers with 8-15 digits. Bare digit runs are not
  phones (they are usually ids, amounts or timestamps).
- Generic secrets: a token of 32+ characters from [A-Za-z0-9+/=_-] containing upper case, lower
  case *and* digits with Shannon entropy >= 4.5 bits/char. Ordinary identifiers (no digits),
  hex hashes such as git commits (no upper case) and UUIDs do not qualify; code is not exempt
  because that is where keys get pasted.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from datetime import date


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _rrn(m: re.Match) -> bool:
    yy, mm, dd, g = (int(x) for x in m.groups())
    try:
        date((1900 if g in (1, 2, 5, 6) else 2000) + yy, mm, dd)
    except ValueError:
        return False
    return True


def _intl_phone(m: re.Match) -> bool:
    return 8 <= sum(c.isdigit() for c in m.group()) <= 15


def _secret(m: re.Match) -> bool:
    s = m.group()
    return (any(c.isupper() for c in s) and any(c.islower() for c in s)
            and any(c.isdigit() for c in s) and entropy(s) >= 4.5)


# Every number detector below needs 8+ digits with at most single separators between them; one
# search for that lets most texts skip the slower, lookbehind-anchored number patterns.
LONG_NUMBER = re.compile(r"\d(?:[ .-]?\d){7}")
NUMBER = "<8+ digits>"  # gate value: the text contains LONG_NUMBER

# (kind, cheap substring gate or None, pattern, extra check or None); order matters, see docstring.
# A group named "keep" is context that stays (the `aws_secret_access_key =` before the key).
DETECTORS: list[tuple[str, str | None, re.Pattern, Callable[[re.Match], bool] | None]] = [
    ("private_key", "PRIVATE KEY", re.compile(
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S), None),
    ("openai_key", "sk-", re.compile(r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"), None),
    ("aws_access_key", None, re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), None),
    ("aws_secret_key", None, re.compile(
        r"(?P<keep>(?i:aws_?secret\w*)[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"), None),
    ("github_token", "gh", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"), None),
    ("slack_token", "xox", re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}"), None),
    ("email", "@", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), None),
    ("rrn", NUMBER, re.compile(r"(?<!\d)(\d\d)(\d\d)(\d\d)-?([1-8])\d{6}(?!\d)"), _rrn),
    ("card", NUMBER, re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card),
    ("phone", NUMBER, re.compile(
        r"(?<![\d+])(?:\+82[ -]?1[016789]|01[016789])[ .-]?\d{3,4}[ .-]?\d{4}(?!\d)"
        r"|(?<!\d)0(?:2|[3-6][1-5])[ .-]\d{3,4}[ .-]\d{4}(?!\d)"), None),
    ("phone", "+", re.compile(r"(?<!\w)\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)"), _intl_phone),
    ("secret", None, re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/=_-]{32,}"), _secret),
]


def scrub_text(text: str) -> tuple[str, list[str]]:
    """Return the redacted text and the kinds found, in detector order."""
    found = []
    numeric = LONG_NUMBER.search(text) is not None  # redaction never creates digits: check once
    for kind, gate, pattern, check in DETECTORS:
        if not (gate is None or (numeric if gate is NUMBER else gate in text)):
            continue

        def repl(m: re.Match, kind=kind, check=check) -> str:
            if check is not None and not check(m):
                return m.group()
            found.append(kind)
            return (m.group("keep") if "keep" in m.re.groupindex else "") + f"[REDACTED_{kind.upper()}]"

        text = pattern.sub(repl, text)
    return text, found


def scrub_record(record: dict) -> list[tuple[int, str]]:
    """Redact message contents and tool-call arguments in place; returns (message index, kind)."""
    findings = []
    for i, msg in enumerate(record["messages"]):
        fields = [(msg, "content")] + [(c["function"], "arguments") for c in msg.get("tool_calls") or []
                                       if isinstance(c, dict) and isinstance(c.get("function"), dict)]
        for obj, key in fields:
            if isinstance(obj.get(key), str):
                obj[key], kinds = scrub_text(obj[key])
                findings += [(i, k) for k in kinds]
    return findings
