import json

from data_helpers import chat, read_jsonl, write_lines, write_records

from edentune.config import CleanConfig
from edentune.data.clean import clean

STORY = ("The quick brown fox jumps over the lazy dog near the river bank while the farmer watches "
         "from his porch and the children play football in the green field behind the old barn")


def run(tmp_path, records, **kw):
    path = write_records(tmp_path / "in.jsonl", records)
    kept, report = clean([path], write=tmp_path / "out.jsonl", quarantine=tmp_path / "q.jsonl", config=CleanConfig(**kw))
    q = read_jsonl(tmp_path / "q.jsonl")
    assert report.lines == len(records) == report.kept + report.repaired + report.quarantined + report.blank
    assert len(q) == report.quarantined == sum(report.reasons.values())
    assert read_jsonl(tmp_path / "out.jsonl") == kept
    return path, kept, report, q


def test_exact_duplicates_after_normalisation(tmp_path):
    a = chat("What is a fox?", STORY)
    b = chat("what  is a FOX?", STORY.replace(" ", "\u3000", 3), system="different system prompt")  # NFKC space
    path, kept, report, q = run(tmp_path, [a, b])
    assert kept == [a] and report.reasons == {"exact duplicate": 1}
    assert q[0] == {"source": f"{path}:2", "reason": f"exact duplicate (of {path}:1)",
                    "raw": json.dumps(b, ensure_ascii=False)}


def test_near_duplicates(tmp_path):
    a = chat("Tell me a story about a fox.", STORY)
    b = chat("Tell me a story about a fox.", STORY.replace("football", "soccer"))
    c = chat("How do I sort a list in Python?", "Use sorted(xs) for a new list or xs.sort() in place.")
    path, kept, report, _ = run(tmp_path, [a, b, c])
    assert kept == [a, c] and report.reasons == {"near duplicate": 1}
    assert report.problems[0].startswith(f"{path}:2: near duplicate (of {path}:1, jaccard ~")
    _, kept, _, _ = run(tmp_path, [a, b, c], near_duplicate_threshold=1.0)  # disabled
    assert len(kept) == 3


def test_language_mismatch_both_directions(tmp_path):
    ko_q, en_a = "파이썬에서 리스트를 정렬하는 방법을 알려주세요.", "Use sorted() to get a new sorted list."
    en_q, ko_a = "How do I sort a list in Python?", "sorted() 함수를 사용하면 정렬된 새 리스트를 얻을 수 있습니다."
    ok = chat(ko_q, ko_a)
    path, kept, report, _ = run(tmp_path, [chat(ko_q, en_a), chat(en_q, ko_a), ok])
    assert kept == [ok]
    assert report.problems == [f"{path}:1: message 1: language mismatch (user ko, assistant en)",
                               f"{path}:2: message 1: language mismatch (user en, assistant ko)"]
    _, kept, _, _ = run(tmp_path, [chat(ko_q, en_a)], language_mismatch=False)
    assert len(kept) == 1


def test_length_limits_and_broken_text(tmp_path):
    recs = [chat("hi", "yo"), chat("x" * 50, "y" * 60), chat("q" * 10, "a" * 30), chat("Is this ok?", "Sure \ufffd\ufffd."),
            chat("fine question", "fine answer")]
    path, kept, report, _ = run(tmp_path, recs, min_chars=5, max_chars=100, max_turn_chars=25)
    assert kept == [recs[4]]
    assert report.problems == [f"{path}:1: too short (4 < 5 chars)", f"{path}:2: too long (110 > 100 chars)",
                               f"{path}:3: message 1: turn too long (30 > 25 chars)",
                               f"{path}:4: message 1: broken text (U+FFFD replacement character)"]


def test_invalid_lines_and_cleaning_add_up(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [json.dumps(chat("Hello there", STORY)), "", "{bad",
                                               json.dumps(chat("Hello there", STORY))])
    kept, report = clean([path], quarantine=tmp_path / "q.jsonl")
    assert (report.lines, len(kept), report.blank, report.quarantined) == (4, 1, 1, 2)
    assert report.reasons == {"invalid JSON": 1, "exact duplicate": 1}
