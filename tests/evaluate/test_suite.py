"""Suite files: the bundled default suite, and `file:line: reason` errors."""

import json

import pytest

from edentune.errors import DataError
from edentune.evaluate.suite import load_suite


def test_default_suite_has_the_guides_cases():
    suite = load_suite("default")
    cases = {c.id: c for c in suite.cases}
    assert len(cases) >= 30
    assert cases["ko-list-reverse"].expected_keywords.words == ["reverse", "[::-1]", "reversed()"]
    assert cases["en-weather-context"].expected_behavior == "asks_for_missing_information"
    assert set(cases["ko-react-hooks"].expected_keywords.words) == {"useState", "useEffect", "컴포넌트"}
    assert {"persona", "korean", "coding", "general", "safety"} <= set(suite.categories)


def test_conversation_always_has_explicit_system():
    case = load_suite("default").cases[0]
    assert case.conversation("You are Eden.")[0] == {"role": "system", "content": "You are Eden."}
    assert case.conversation(None)[0] == {"role": "system", "content": ""}


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "cases:\n"
        "  - prompt: hi\n"                      # line 2: fine
        "    expected_language: en\n"
        "  - prompt: hello\n"                   # line 4: unknown behaviour
        "    expected_behavior: dances\n"
        "  - expected_language: ko\n"           # line 6: no prompt
        "  - prompt: x\n"                       # line 7: checks nothing
        "  - prompt: y\n"                       # line 8: typo'd field
        "    expected_langauge: en\n"
        "  - id: dup\n"                         # line 10
        "    prompt: a\n    expected_language: en\n"
        "  - id: dup\n"                         # line 13: duplicate
        "    prompt: b\n    expected_language: en\n"
        "  - prompt: z\n"                       # line 16: bad language
        "    expected_language: klingon\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError) as err:
        load_suite(str(path))
    msg = str(err.value)
    for line, reason in [(4, "unknown behaviour 'dances'"), (6, "exactly one of `prompt` or `messages`"),
                         (7, "checks nothing"), (8, "unknown field"), (13, "duplicate id 'dup'"), (16, "unknown language")]:
        assert f"{path}:{line}: " in msg and reason in msg, (line, msg)
    assert f"{path}:2:" not in msg


def test_yaml_syntax_error_has_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- prompt: a\n  expected_language: en\n- prompt: [unclosed\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.yaml:\d+: not valid YAML"):
        load_suite(str(path))


def test_jsonl_suite_and_errors(tmp_path):
    good = {"prompt": "안녕", "expected_language": "ko", "expected_keywords": {"all": ["안녕"]}}
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(good, ensure_ascii=False) + "\n\n{not json\n"
                    + json.dumps({"messages": [{"role": "assistant", "content": "x"}], "expected_language": "en"}) + "\n",
                    encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_suite(str(path))
    assert f"{path}:3: not valid JSON" in str(err.value)
    assert f"{path}:4: " in str(err.value) and "must end with a user turn" in str(err.value)
    path.write_text(json.dumps(good, ensure_ascii=False) + "\n", encoding="utf-8")
    (case,) = load_suite(str(path)).cases
    assert case.id == "s-1" and case.expected_keywords.mode == "all"


def test_missing_suite_file():
    with pytest.raises(DataError, match="no such suite"):
        load_suite("no-such-suite.yaml")


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text suite file (invalid UTF-8"),
    (b"- prompt: hi\x00\n  expected_language: en\n", "not a text suite file (it contains NUL bytes)"),
    (b"- !!python/object/apply:os.system [\"touch PWNED\"]\n", "not a plain YAML value"),
    (b"cases:\n  - prompt: hi\n    expected_language: !!python/name:os.getcwd\n", ":3: not a plain YAML value"),
])
def test_binary_or_unsafe_suite_is_a_clear_error(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "suite.yaml"
    path.write_bytes(content)
    with pytest.raises(DataError, match="suite") as err:
        load_suite(str(path))
    assert message in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_directory_as_suite_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        load_suite(str(tmp_path))


def test_suite_hash_is_the_cases_content(tmp_path):
    yaml_suite = tmp_path / "a.yaml"
    yaml_suite.write_text("# comment\ncases:\n  - id: x\n    prompt: hi\n    expected_keywords: [a, b]\n", encoding="utf-8")
    jsonl_suite = tmp_path / "b.jsonl"  # the same case, other format, key order and file name
    jsonl_suite.write_text(json.dumps({"expected_keywords": {"any": ["a", "b"]}, "prompt": "hi", "id": "x"}) + "\n", encoding="utf-8")
    sha = load_suite(str(yaml_suite)).sha256
    assert len(sha) == 64 and load_suite(str(jsonl_suite)).sha256 == sha
    for changed in ("x\n    prompt: hi!", "y\n    prompt: hi"):  # another prompt, another id
        yaml_suite.write_text(f"cases:\n  - id: {changed}\n    expected_keywords: [a, b]\n", encoding="utf-8")
        assert load_suite(str(yaml_suite)).sha256 != sha
    assert load_suite("default").sha256 == load_suite("default").sha256


@pytest.mark.parametrize("keywords", [[], {"any": []}, {"all": []}])
def test_a_case_without_keywords_has_no_keyword_check(tmp_path, keywords):
    from edentune.config import RunConfig
    from edentune.evaluate.backends import Generation
    from edentune.evaluate.runner import case_metrics, check_answer

    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "expected_language": "en", "expected_keywords": keywords}) + "\n", encoding="utf-8")
    (case,) = load_suite(str(path)).cases
    assert case.expected_keywords is None
    result = check_answer(case, Generation("Hello! How can I help you today?", 0.1), RunConfig())
    assert result.keywords_ok is None and not any("keywords" in f for f in result.failures)
    assert result.passed and case_metrics([result])["keyword_hit_rate"] is None  # n/a, not a failure
