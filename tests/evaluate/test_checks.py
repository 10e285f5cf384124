"""Each check on hand-written answers, including mixed-language and code-in-Korean cases."""

import pytest

from edentune.config import PersonaConfig
from edentune.evaluate import checks, sandbox
from edentune.evaluate.checks import AnswerContext, check_behavior, keyword_hits, language_ok, python_blocks
from edentune.evaluate.persona import check_persona, claims_other_identity, detect_formality
from edentune.evaluate.sandbox import RunResult

KO_WITH_CODE = """파이썬에서 리스트를 뒤집는 방법은 여러 가지가 있습니다.

```python
numbers = [1, 2, 3, 4, 5]
print(numbers[::-1])  # reverse with slicing, a new list
numbers.reverse()     # in place
```

`reversed()` 함수는 iterator를 돌려주므로 메모리를 아낄 수 있어요."""


@pytest.mark.parametrize("answer, expected, ok", [
    (KO_WITH_CODE, "ko", True),  # English lives only in code and inline code
    ("React의 useState와 useEffect는 함수 컴포넌트에서 state와 side effect를 다루는 Hook입니다.", "ko", True),
    ("The capital of France is Paris.", "en", True),
    ("The capital is Paris. 수도는 파리입니다. 프랑스의 수도예요.", "en", False),  # mixed
    ("수도는 파리입니다.", "en", False),
    ("Use `sorted()` and 끝.", "ko", False),
    ("こんにちは、今日はいい天気ですね。", "ja", True),
])
def test_language(answer, expected, ok):
    assert language_ok(answer, expected)[0] is ok


def test_language_not_judged_without_prose():
    assert language_ok("```python\nprint(1)\n```", "ko") == (None, "none")


def test_keywords_width_and_case_insensitive():
    r = keyword_hits("ＵＳＥＳＴＡＴＥ 훅과 컴포넌트", ["useState", "useEffect", "컴포넌트"])
    assert r.passed and r.found == ["useState", "컴포넌트"] and r.hit_rate == pytest.approx(2 / 3)
    assert not keyword_hits("useState only", ["useState", "useEffect"], "all").passed
    assert keyword_hits(KO_WITH_CODE, ["reverse", "[::-1]", "reversed()"], "all").passed


def test_python_blocks():
    answer = ("```python\nx = 1\n```\n```py\nprint(x)\n```\n```bash\npip install x\n```\n"
              "```\nfor i in range(2):\n    print(i)\n```\n```\nreverse()\n```\n```\nnot python at all\n```")
    assert python_blocks(answer) == ["x = 1\n", "print(x)\n", "for i in range(2):\n    print(i)\n"]
    assert python_blocks("```python\ndef f(:\n") == ["def f(:\n"]  # cut off by max tokens: still checked


@pytest.mark.skipif(sandbox.find_sandbox() is None, reason="no working sandbox here: code is not run (test_sandbox.py)")
def test_code_runs_joined_blocks():
    assert checks.run_answer_code(KO_WITH_CODE).status == "pass"
    assert checks.run_answer_code("```python\nprint(undefined_name)\n```").status == "fail"
    assert checks.run_answer_code("no code") is None


@pytest.mark.parametrize("name, answer, ok", [
    ("asks_for_missing_information", "I'd love to help! Which city are you in?", True),
    ("asks_for_missing_information", "어느 지역의 날씨가 궁금하신가요?", True),
    ("asks_for_missing_information", "It is sunny and 25°C today.", False),
    ("asks_for_missing_information", "Isn't it lovely?", False),  # a question, but not for the detail
    ("refuses", "I can't help with that, but I can explain how encryption protects files.", True),
    ("refuses", "죄송하지만 그 요청은 도와드릴 수 없습니다.", True),
    ("refuses", "Sure! Step 1: ...", False),
    ("answers_directly", "서울입니다.", True),
    ("answers_directly", "I'm sorry, but I cannot answer that.", False),
    ("introduces_self", "안녕하세요, 저는 이든이에요.", True),
    ("introduces_self", "I'm a helpful assistant.", False),
])
def test_behaviors(name, answer, ok):
    assert check_behavior(name, answer, AnswerContext(("Eden", "이든")))[0] is ok


def test_provides_running_code_uses_sandbox_result():
    assert check_behavior("provides_running_code", "x", AnswerContext(code=RunResult("pass")))[0]
    assert not check_behavior("provides_running_code", "x", AnswerContext(code=RunResult("timeout", "wall")))[0]
    assert not check_behavior("provides_running_code", "x", AnswerContext())[0]
    assert check_behavior("provides_running_code", "x", AnswerContext(code=RunResult("not_run", "no sandbox")))[0] is None


def test_behavior_docs_table_lists_every_rule():
    documented = {line.split("`")[1] for line in checks.__doc__.splitlines() if line.startswith("| `")}
    assert documented == set(checks.BEHAVIORS)


@pytest.mark.parametrize("text, formality", [
    ("안녕하세요. 저는 이든입니다. 무엇을 도와드릴까요?", "jondaetmal"),
    ("네. 그렇게 하시면 돼요!", "jondaetmal"),
    ("그건 이렇게 하면 돼. 쉽지?", "banmal"),
    ("알겠어! 내가 도와줄게.", "banmal"),
    ("안녕하세요! 저는 이든이에요. 뭐든 물어봐.", "mixed"),
    (KO_WITH_CODE, "jondaetmal"),  # code comments and the English in code are ignored
    ("## 주의 사항\n- 리스트 뒤집기\n\n이 방법을 사용하세요.", "jondaetmal"),  # headers / labels not judged
    ("Use slicing: nums[::-1].", "unknown"),
])
def test_formality(text, formality):
    assert detect_formality(text) == formality


@pytest.mark.parametrize("answer, claim", [
    ("I'm SmolLM, an AI assistant created by Hugging Face.", True),
    ("I am a large language model trained by OpenAI.", True),
    ("저는 Qwen입니다.", True),
    ("Alibaba Cloud에서 개발한 모델이에요.", True),
    ("ChatGPT is a chatbot made by OpenAI; I'm Eden.", False),
    ("I'm happy to explain how ChatGPT works.", False),
])
def test_other_identity(answer, claim):
    assert (claims_other_identity(answer) is not None) is claim


def test_persona_rules():
    persona = PersonaConfig(signature_phrases=["언제든 물어보세요"])
    ok = check_persona("안녕하세요, 저는 이든입니다. 언제든 물어보세요!", "너는 누구야?", persona)
    assert ok.passed, ok.reasons
    bad = check_persona("나는 ChatGPT야 😊", "너는 누구야?", persona)
    assert not bad.passed
    text = " | ".join(bad.reasons)
    for part in ("another identity", "does not say", "signature", "formality", "emoji"):
        assert part in text
    # not an identity question: no name needed; English answers have no formality to judge
    assert check_persona("Paris is the capital.", "Capital of France?", persona).passed
    assert check_persona("그건 쉬워.", "어때?", PersonaConfig(korean_formality="banmal")).passed
    assert check_persona("좋아요 👍", "어때요?", PersonaConfig(emoji="allowed")).passed
