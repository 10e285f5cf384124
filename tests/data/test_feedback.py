import json
import subprocess
import sys

import pytest
from data_helpers import read_jsonl, write_lines, write_records
from typer.testing import CliRunner

from edentune.cli import app
from edentune.data.feedback import prepare_feedback
from edentune.errors import DataError

KEY = "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"


def rated(question, answer, rating="up", *, system=None, key="rating"):
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": msgs, key: rating}


def run(tmp_path, records=None, lines=None):
    """prepare_feedback on one input file; checks the invariants every run must keep."""
    src = write_lines(tmp_path / "fb.jsonl", lines) if lines is not None else write_records(tmp_path / "fb.jsonl", records)
    out = tmp_path / "out"
    res = prepare_feedback([src], out)
    kto, dpo, q = read_jsonl(out / "kto.jsonl"), read_jsonl(out / "dpo.jsonl"), read_jsonl(out / "quarantine.jsonl")
    stats = json.loads((out / "feedback_stats.json").read_text())
    assert res.lines == res.kept + res.repaired + res.quarantined + res.blank
    assert len(kto) == res.kept + res.repaired == res.desirable + res.undesirable
    assert len(q) == res.quarantined == sum(stats["reasons"].values()) and len(dpo) == res.pairs
    assert (stats["lines"], stats["desirable"], stats["undesirable"], stats["pairs"]) == \
           (res.lines, res.desirable, res.undesirable, res.pairs)
    return src, res, kto, dpo, q, stats


@pytest.mark.parametrize("value, label", [
    ("up", True), ("UP", True), (" Up ", True), ("👍", True), ("👍\ufe0f", True), ("Thumbs_Up", True), ("good", True),
    (True, True), (1, True),
    ("down", False), ("Down", False), ("👎", False), ("thumbs_down", False), ("BAD", False),
    (False, False), (-1, False), (0, False),
])
def test_each_rating_spelling(tmp_path, value, label):
    _, res, kto, _, q, _ = run(tmp_path, [rated("Is the sky blue?", "Yes, on a clear day.", value)])
    assert q == [] and [row["label"] for row in kto] == [label]


@pytest.mark.parametrize("key", ["rating", "feedback", "thumbs", "label"])
def test_each_rating_key(tmp_path, key):
    _, _, kto, _, q, _ = run(tmp_path, [rated("Q", "A", "down", key=key)])
    assert q == [] and kto[0]["label"] is False


def test_kto_rows_are_trl_conversational_unpaired_preferences(tmp_path):
    recs = [rated("What is 2+2?", "4", "up", system="You are terse."),
            {"messages": [{"role": "user", "content": "Capital of France?"}], "completion": "Lyon", "feedback": "down"}]
    _, res, kto, _, q, _ = run(tmp_path, recs)
    assert q == [] and res.kept == 2
    assert kto == [
        {"prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
         "completion": [{"role": "assistant", "content": "4"}], "label": True},
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "completion": [{"role": "assistant", "content": "Lyon"}], "label": False},
    ]


def test_secrets_are_redacted_and_counted_as_repaired(tmp_path):
    recs = [rated("Set up my client", f"Use api_key='{KEY}' and mail admin@example.com"),
            rated("Hi", "Hello!", "down"),
            rated(f"is {KEY} safe?", "No.", "meh")]  # quarantined, and still scrubbed
    _, res, kto, _, q, stats = run(tmp_path, recs)
    answer = kto[0]["completion"][0]["content"]
    assert KEY not in answer and "admin@example.com" not in answer
    assert "[REDACTED_OPENAI_KEY]" in answer and "[REDACTED_EMAIL]" in answer
    assert (res.kept, res.repaired, res.quarantined) == (1, 1, 1)
    assert stats["repairs"] == {"redacted openai_key": 1, "redacted email": 1}
    out = (tmp_path / "out")
    assert not any(KEY in p.read_text() for p in out.iterdir())  # no output file leaks the key
    assert q[0]["reason"] == "unknown rating (rating='meh')"


def test_bad_lines_are_quarantined_with_reasons_and_counts_add_up(tmp_path):
    good = json.dumps(rated("How are you?", "Fine, thanks."))
    lines = [
        b"\xef\xbb\xbf" + good.encode() + b"\r",  # BOM + CRLF: repaired
        "",  # blank
        '{"messages": [',  # cut off
        "{not json}",
        json.dumps(rated("Q?", "A.", "meh")),
        json.dumps(rated("Q?", "A.", 5)),
        json.dumps({"messages": [{"role": "user", "content": "Q?"}], "rating": "up"}),  # no answer
        json.dumps({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."},
                                 {"role": "user", "content": "thanks"}], "rating": "up"}),  # answer not last
        json.dumps(rated("Q?", "   ")),  # empty content
        json.dumps({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}),
        json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A."}],
                    "rating": "up"}),  # no user
    ]
    src, res, kto, _, q, stats = run(tmp_path, lines=lines)
    assert (res.lines, res.kept, res.repaired, res.quarantined, res.blank) == (11, 0, 1, 9, 1)
    assert stats["repairs"] == {"stripped CRLF": 1, "stripped BOM": 1}
    assert [(x["source"], x["reason"]) for x in q] == [
        (f"{src}:3", "truncated JSON"),
        (f"{src}:4", "invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
        (f"{src}:5", "unknown rating (rating='meh')"),
        (f"{src}:6", "unknown rating (rating=5)"),
        (f"{src}:7", "no assistant turn"),
        (f"{src}:8", "last turn is not the assistant's"),
        (f"{src}:9", "message 1: empty content"),
        (f"{src}:10", "missing rating (expected one of: rating, feedback, thumbs, label)"),
        (f"{src}:11", "message 1: assistant turn after system"),
    ]
    assert q[2]["raw"] == lines[4]  # verbatim
    assert kto[0]["completion"][0]["content"] == "Fine, thanks."


def test_duplicates_and_conflicting_ratings(tmp_path):
    recs = [rated("Q1", "A1", "up"), rated("Q1", "A1", "👍"),  # duplicate: the same rating spelled differently
            rated("Q2", "A2", "up"), rated("Q2", "A2", "down"),  # conflict: both go
            rated("Q2", "A3", "down")]
    src, res, kto, _, q, stats = run(tmp_path, recs)
    assert [(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in kto] == [("Q1", "A1"), ("Q2", "A3")]
    assert stats["reasons"] == {"exact duplicate": 1, "conflicting ratings": 2}
    assert q[0] == {"source": f"{src}:2", "reason": f"exact duplicate (of {src}:1)", "raw": json.dumps(recs[1], ensure_ascii=False)}
    conflict = f"conflicting ratings (same prompt and answer rated up at {src}:3 and down at {src}:4)"
    assert [(x["source"], x["reason"]) for x in q[1:]] == [(f"{src}:3", conflict), (f"{src}:4", conflict)]


def test_dpo_pairs_capped_per_prompt_and_only_where_both_ratings_exist(tmp_path):
    recs = [rated("Explain DNS", "up-1", "up", system="S"), rated("Explain DNS", "down-1", "down", system="S"),
            rated("Explain DNS", "down-2", "down", system="S"), rated("Explain DNS", "up-2", "up", system="S"),
            rated("Explain DNS", "down-3", "down", system="S"),
            rated("Explain DNS", "other system", "down", system="T"),  # a different prompt: never paired with S's
            rated("Only liked", "yes-1", "up"), rated("Only liked", "yes-2", "up")]
    _, res, _, dpo, _, _ = run(tmp_path, recs)
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Explain DNS"}]
    assert all(p["prompt"] == prompt for p in dpo)
    assert [(p["chosen"], p["rejected"]) for p in dpo] == [
        ([{"role": "assistant", "content": up}], [{"role": "assistant", "content": down}])
        for up, down in [("up-1", "down-1"), ("up-1", "down-2"), ("up-1", "down-3"), ("up-2", "down-1")]]
    assert res.pairs == 4 and set(dpo[0]) == {"prompt", "chosen", "rejected"}


@pytest.mark.parametrize("n_up, n_down", [(1, 1), (3, 4), (4, 3), (1, 9), (9, 1), (7, 100), (100, 7), (50, 51), (51, 37)])
def test_kto_weights_put_the_ratio_in_range(tmp_path, n_up, n_down):
    recs = [rated(f"q{i}", "a", "up") for i in range(n_up)] + [rated(f"q{i}", "b", "down") for i in range(n_down)]
    _, res, _, _, _, stats = run(tmp_path, recs)
    w_up, w_down = stats["kto_weights"]["desirable_weight"], stats["kto_weights"]["undesirable_weight"]
    assert (w_up, w_down) == (res.desirable_weight, res.undesirable_weight)
    assert 1.0 in (w_up, w_down) and min(w_up, w_down) >= 1.0  # the larger class stays at 1.0
    assert 1 <= w_up * n_up / (w_down * n_down) <= 4 / 3


def test_warnings(tmp_path):
    _, res, _, _, _, stats = run(tmp_path, [rated("Q", "A", "up")])
    assert len(res.warnings) == 3 and stats["warnings"] == res.warnings
    assert any("no thumbs-down" in w for w in res.warnings) and any("too few" in w for w in res.warnings)
    assert any("dpo.jsonl is empty" in w for w in res.warnings)
    recs = [rated(f"q{i % 30}", f"a{i}", "up" if i < 30 else "down") for i in range(60)]
    _, res, *_ = run(tmp_path, recs)
    assert res.warnings == [] and res.pairs == 30


def test_cli_writes_outputs_and_prints_the_count_line(tmp_path):
    src = write_lines(tmp_path / "fb.jsonl", [json.dumps(rated("Q", "good answer", "up")),
                                              json.dumps(rated("Q", "bad answer", "down")), "", "oops"])
    res = CliRunner().invoke(app, ["data", "feedback", str(src), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "4 lines = 2 kept + 0 repaired + 1 quarantined + 1 blank" in res.output
    assert "DPO pairs: 1" in res.output and "warning: only 2 usable rating(s)" in res.output
    assert read_jsonl(tmp_path / "out" / "dpo.jsonl")[0]["chosen"][0]["content"] == "good answer"


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="cannot read .*nope.jsonl") as err:
        prepare_feedback([missing], tmp_path / "out")
    assert err.value.hint and not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["data", "feedback", str(missing), "-o", str(tmp_path / "out")])
    assert res.exit_code != 0 and isinstance(res.exception, DataError)
    # The installed entry point prints the message and hint, no traceback.
    proc = subprocess.run([sys.executable, "-m", "edentune.cli", "data", "feedback", str(missing), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
