"""Language of a text from its Unicode scripts: "ko", "en", "mixed" or "other".

Counting letters would undercount Korean (one Hangul syllable carries what takes two or three
Latin letters), so we count *runs*: maximal stretches of Hangul, of Latin letters, of other
letters. Korean prose with English technical terms stays Korean because Korean particles attach
to the terms ("React에서", "hook을") and every Korean word is a run of its own. Fenced and inline
code is removed first: identifiers are not the language of the conversation.
"""

from __future__ import annotations

import re

CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]+`", re.S)  # unclosed fence: code to the end
HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]+")
LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]+")
OTHER = re.compile(r"[^\W\d_A-Za-z\u00c0-\u024f\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]+")


def strip_code(text: str) -> str:
    return CODE.sub(" ", text) if "`" in text else text


def detect(text: str, ko_threshold: float = 0.5, en_threshold: float = 0.8) -> str:
    """"ko" if Hangul runs are at least `ko_threshold` of all letter runs, "en" if Latin runs are
    at least `en_threshold`, "other" for mostly other scripts or no letters, else "mixed"."""
    text = strip_code(text)
    ko, en, other = len(HANGUL.findall(text)), len(LATIN.findall(text)), len(OTHER.findall(text))
    total = ko + en + other
    if not total:
        return "other"
    if ko / total >= ko_threshold:
        return "ko"
    if en / total >= en_threshold:
        return "en"
    return "other" if other / total >= 0.5 else "mixed"
