import pytest
from data_helpers import chat, read_jsonl, write_records

from edentune.config import CleanConfig
from edentune.data.clean import clean
from edentune.data.scrub import luhn_ok, scrub_text

SK = "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
GH = "ghp_" + "aB3dE6" * 6
PLANTED = {  # kind -> (text, the secret inside it)
    "openai_key": (f"use {SK} please", SK),
    "aws_access_key": ("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    "aws_secret_key": ('aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"',
                       "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    "github_token": (f"token {GH}", GH),
    "slack_token": ("hook xoxb-1234567890-abcdefghijKLMN", "xoxb-1234567890-abcdefghijKLMN"),
    "private_key": ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n-----END OPENSSH PRIVATE KEY-----",
                    "b3BlbnNzaC1rZXktdjEAAAA"),
    "secret": ("SECRET=Zx9Qw3Er7Ty2Ui8Op4As6Df1Gh5Jk0LmNbV", "Zx9Qw3Er7Ty2Ui8Op4As6Df1Gh5Jk0LmNbV"),
    "email": ("메일은 kim.minsu+ml@example.co.kr 로 주세요", "kim.minsu+ml@example.co.kr"),
    "rrn": ("주민등록번호 990101-1234567 입니다", "990101-1234567"),
    "card": ("카드 4539 1488 0343 6467 결제", "4539 1488 0343 6467"),
}
PHONES = ["010-1234-5678", "01012345678", "+82 10 1234 5678", "+82-10-1234-5678", "02-345-6789", "+1 415 555 2671",
          "+44 20 7946 0958"]
NOT_SECRETS = [
    "def get_user_account_settings(user_id: int) -> dict:\n    return self.cache[user_id]",
    "class UserAccountSettingsRepositoryFactoryImpl: pass",
    "Fixed in commit 3f786850e387550fdab836ed7e6dc881de23001b yesterday.",
    "Order number 4539148803436468 was shipped.",  # 16 digits, Luhn-invalid
    "The request id is 123e4567-e89b-12d3-a456-426614174000.",
    "Timestamp 1712345678901 and version 1.2.3, year 2024, price 12,000원.",
    "Run pip install torch==2.3.0 then python -m pytest tests/data -q",
    "Birthday-like 991332-1234567 is not a valid date.",
    "/usr/local/lib/python3.11/site-packages/transformers/models/llama",
    "Use the @property decorator and user@localhost for tests.",
]


@pytest.mark.parametrize("kind", PLANTED)
def test_each_kind_is_redacted_by_default(tmp_path, kind):
    text, secret = PLANTED[kind]
    write_records(tmp_path / "in.jsonl", [chat("please check this: " + text, "Okay, noted.")])
    records, report = clean([tmp_path / "in.jsonl"], write=tmp_path / "out.jsonl")
    content = records[0]["messages"][0]["content"]
    assert f"[REDACTED_{kind.upper()}]" in content
    assert report.repaired == 1 and report.repairs == {f"redacted {kind}": 1}
    assert report.findings == [{"kind": kind, "source": f"{tmp_path / 'in.jsonl'}:1", "message": 0}]
    assert secret not in (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    assert secret not in str(report.model_dump())  # findings never carry the secret


@pytest.mark.parametrize("phone", PHONES)
def test_phone_numbers(phone):
    assert scrub_text(f"연락처 {phone} 입니다") == ("연락처 [REDACTED_PHONE] 입니다", ["phone"])


@pytest.mark.parametrize("text", NOT_SECRETS)
def test_no_false_positives(text):
    assert scrub_text(text) == (text, [])


def test_luhn():
    assert luhn_ok("4539148803436467") and not luhn_ok("4539148803436468")


def test_drop_mode_quarantines_without_leaking(tmp_path):
    recs = [chat("my mail is a.b@example.com", "ok noted"), chat("nothing here at all", "fine thanks")]
    write_records(tmp_path / "in.jsonl", recs)
    records, report = clean([tmp_path / "in.jsonl"], quarantine=tmp_path / "q.jsonl", config=CleanConfig(scrub="drop"))
    assert len(records) == 1 and report.quarantined == 1
    assert report.problems == [f"{tmp_path / 'in.jsonl'}:1: contains secrets or personal data (email)"]
    q = read_jsonl(tmp_path / "q.jsonl")
    assert "a.b@example.com" not in q[0]["raw"] and "[REDACTED_EMAIL]" in q[0]["raw"]


def test_scrub_off_keeps_text(tmp_path):
    write_records(tmp_path / "in.jsonl", [chat("my mail is a.b@example.com", "ok noted")])
    records, report = clean([tmp_path / "in.jsonl"], config=CleanConfig(scrub="off"))
    assert "a.b@example.com" in records[0]["messages"][0]["content"] and not report.findings


def test_tool_call_arguments_are_scrubbed(tmp_path):
    rec = {"messages": [{"role": "user", "content": "send it"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "1", "type": "function",
                             "function": {"name": "mail", "arguments": '{"to": "lee@example.org"}'}}]}]}
    write_records(tmp_path / "in.jsonl", [rec])
    records, report = clean([tmp_path / "in.jsonl"], config=CleanConfig(min_chars=1))
    assert "[REDACTED_EMAIL]" in records[0]["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert report.findings[0]["message"] == 1
