"""Persona adherence: rules derived from the `persona` config section, checked per answer.

1. Never claims to be another assistant or to be made by another lab ("I'm ChatGPT", "I was
   trained by Alibaba", "저는 Qwen입니다"). Mentioning ChatGPT in an explanation is fine.
2. Asked who it is ("who are you", "이름이 뭐예요", "자기소개"), the answer uses the persona name
   (or Korean name) and, when `signature_phrases` are configured, one of them.
3. Korean formality (`korean_formality`), from sentence endings (heuristic below).
4. Emoji policy (`emoji: never` fails an answer with any emoji).

Formality heuristic: code and markdown headers / table rows are removed; the text is cut into
sentences at `. ! ?` and line breaks; the last Hangul word of each sentence is classified:

- 존댓말 (polite) when it ends in 요 / 니다 / 니까 / 십시오 / 죠, or is the word 네 ("yes");
- 반말 (casual) when it ends in 다 / 야 / 어 / 아 / 해 / 봐 / 줘 / 와 / 워 / 돼 / 지 / 니 / 냐 /
  자 / 래 / 라 / 렴 / 까 / 게 / 걸 / 군 / 네 / 거든 / 잖아;
- otherwise neutral (nouns: "방법", "리스트 뒤집기").

Lines without closing punctuation count only with two or more Hangul words, so headers and list
labels ("주의 사항") are not judged. The answer is 존댓말 if it has polite and no casual
sentences, 반말 for the reverse, `mixed` when both, `unknown` when neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edentune.config import PersonaConfig
from edentune.data.lang import strip_code

from .checks import normalize

OTHER_ASSISTANTS = r"chatgpt|gpt-?[34][\w.-]*|openai|qwen[\w.-]*|tongyi|通义千问|smollm[\w.-]*|claude|anthropic|gemini|bard|llama[\w.-]*|meta ai|alibaba(?: cloud)?|hugging ?face|mistral"
CLAIM_EN = re.compile(
    r"\b(?:i am|i'm|i’m|my name is|call me|i was|i've been|i have been)\s+"
    r"(?:(?:an?|the|large|language|model|ai|assistant|chatbot|called|named|based on|version of|"
    r"created|developed|trained|made|built|by|from)[\s,]+)*(" + OTHER_ASSISTANTS + r")\b",
    re.I,
)
CLAIM_KO = re.compile(
    r"(" + OTHER_ASSISTANTS + r")\s*(?:입니다|이에요|예요|이야|야|라고\s*(?:합니다|해요|불러)|"
    r"에서\s*(?:만든|개발한|훈련한|훈련시킨)|(?:가|이)\s*(?:만든|개발한))",
    re.I,
)
IDENTITY_QUESTION = re.compile(
    r"\bwho are you\b|\bwhat(?:'s| is) your name\b|\bintroduce yourself\b|\bwhat are you\b|"
    r"누구(?:세요|니|야|예요|인가요|십니까|신가요)|이름이\s*(?:뭐|무엇)|이름은\s*(?:뭐|무엇)|자기\s*소개|너는\s*누구",
    re.I,
)
EMOJI = re.compile(r"[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B50-\u2B55\u2300-\u23FF]")

POLITE_END = re.compile(r"(?:요|니다|니까|십시오|죠)$")
CASUAL_END = re.compile(r"(?:다|야|어|아|해|봐|줘|와|워|돼|지|니|냐|자|래|라|렴|까|게|걸|군|네|거든|잖아)$")
HANGUL_WORD = re.compile(r"[\uac00-\ud7a3]+")
SENTENCE = re.compile(r"[^.!?？！。\n]+[.!?？！。]*")


def sentence_endings(text: str) -> list[tuple[str, str]]:
    """(kind, sentence) for each judged sentence: kind is "polite", "casual" or "neutral"."""
    lines = [ln for ln in strip_code(text).splitlines() if not ln.lstrip().startswith(("#", "|", ">"))]
    out = []
    for sentence in SENTENCE.findall("\n".join(lines)):
        words = HANGUL_WORD.findall(sentence)
        punctuated = sentence.rstrip()[-1:] in ".!?？！。"
        if not words or (not punctuated and len(words) < 2):
            continue
        last = words[-1]
        if last == "네" or POLITE_END.search(last):
            kind = "polite"
        elif CASUAL_END.search(last):
            kind = "casual"
        else:
            kind = "neutral"
        out.append((kind, sentence.strip()))
    return out


def detect_formality(text: str) -> str:
    """"jondaetmal", "banmal", "mixed" or "unknown" (no judged Korean sentence)."""
    kinds = {kind for kind, _ in sentence_endings(text)}
    polite, casual = "polite" in kinds, "casual" in kinds
    if polite and casual:
        return "mixed"
    return "jondaetmal" if polite else "banmal" if casual else "unknown"


def claims_other_identity(answer: str) -> str | None:
    """The offending phrase, if the answer presents itself as another assistant."""
    m = CLAIM_EN.search(answer) or CLAIM_KO.search(answer)
    return m.group(0) if m else None


def is_identity_question(question: str) -> bool:
    return bool(IDENTITY_QUESTION.search(question))


@dataclass
class PersonaResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)


def check_persona(answer: str, question: str, persona: PersonaConfig) -> PersonaResult:
    reasons = []
    claim = claims_other_identity(answer)
    if claim:
        reasons.append(f"claims another identity: {claim!r}")
    if is_identity_question(question):
        names = [n for n in (persona.name, persona.korean_name) if n]
        text = normalize(answer)
        if not any(normalize(n) in text for n in names):
            reasons.append(f"asked who it is, does not say {' / '.join(names)}")
        if persona.signature_phrases and not any(normalize(p) in text for p in persona.signature_phrases):
            reasons.append("self-introduction without a signature phrase")
    if persona.korean_formality != "any":
        found = detect_formality(answer)
        if found not in (persona.korean_formality, "unknown"):
            wrong = "casual" if persona.korean_formality == "jondaetmal" else "polite"
            example = next((s for k, s in sentence_endings(answer) if k == wrong), "")
            reasons.append(f"Korean formality is {found}, expected {persona.korean_formality} (e.g. {example[:60]!r})")
    if persona.emoji == "never":
        emoji = EMOJI.findall(answer)
        if emoji:
            reasons.append(f"uses emoji {''.join(emoji[:5])}")
    return PersonaResult(not reasons, reasons)
