import pytest
from data_helpers import write_lines, write_records

from edentune.data.convert import convert
from edentune.data.validate import validate_record
from edentune.errors import DataError

ALPACA = {"instruction": "Translate to Korean", "input": "Good morning", "output": "좋은 아침입니다", "id": 3}
KULLM = {"id": "kullm-1", "instruction": "한국의 수도는?", "input": "", "output": "서울입니다."}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello!"}], "source": "sg"}
OPENAI = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                       {"role": "assistant", "content": "Hello!"}]}


def run(tmp_path, records, **kw):
    path = write_records(tmp_path / "in.jsonl", records)
    out, report = convert([path], quarantine=tmp_path / "q.jsonl", **kw)
    assert report.lines == len(records) == report.kept + report.repaired + report.quarantined + report.blank
    for rec in out:
        validate_record(rec)
    return path, out, report


def test_alpaca_with_and_without_input(tmp_path):
    _, out, report = run(tmp_path, [ALPACA, KULLM], fmt="alpaca")
    assert out[0]["messages"] == [{"role": "user", "content": "Translate to Korean\n\nGood morning"},
                                  {"role": "assistant", "content": "좋은 아침입니다"}]
    assert out[0]["id"] == 3 and out[1]["messages"][0]["content"] == "한국의 수도는?"
    assert report.kept == 2


def test_sharegpt(tmp_path):
    _, out, _ = run(tmp_path, [SHAREGPT], fmt="sharegpt")
    assert [m["role"] for m in out[0]["messages"]] == ["system", "user", "assistant"]
    assert out[0]["source"] == "sg" and "conversations" not in out[0]


def test_openai_content_parts(tmp_path):
    _, out, report = run(tmp_path, [OPENAI], fmt="openai")
    assert out[0]["messages"][0]["content"] == "Hi" and report.repaired == 1


def test_auto_mixed_file_and_system_prompt(tmp_path):
    path, out, report = run(tmp_path, [ALPACA, SHAREGPT, OPENAI, {"text": "raw"}], system="You are Eden.")
    assert len(out) == 3 and report.problems == [
        f"{path}:4: unrecognised format (expected messages, conversations or instruction/output)"]
    assert out[0]["messages"][0] == {"role": "system", "content": "You are Eden."}
    assert out[1]["messages"][0]["content"] == "Be brief."  # an existing system prompt wins


@pytest.mark.parametrize("fmt, record, reason", [
    ("alpaca", {"instruction": "x"}, "alpaca record needs string 'instruction' and 'output'"),
    ("sharegpt", {"messages": []}, "sharegpt record needs a 'conversations' list"),
    ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}]}, "message 0: unknown sharegpt speaker ('robot')"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
    ("openai", {"instruction": "x", "output": "y"}, "openai record needs 'messages'"),
])
def test_unconvertible_records_are_quarantined(tmp_path, fmt, record, reason):
    path, out, report = run(tmp_path, [record], fmt=fmt)
    assert out == [] and report.problems == [f"{path}:1: {reason}"]


def test_unknown_format_is_a_user_error(tmp_path):
    with pytest.raises(DataError, match="unknown format"):
        convert([write_lines(tmp_path / "a.jsonl", [])], fmt="csv")
