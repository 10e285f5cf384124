from collections import Counter

import pytest
from data_helpers import chat, read_jsonl, write_records

from edentune.config import MixConfig
from edentune.data.mix import allocate, mix, mix_records
from edentune.data.split import split, split_records


def corpus(n, prefix="q", **extra):
    return [chat(f"{prefix} {i}", f"answer {i}", **extra) for i in range(n)]


def test_split_is_stable_under_appends(tmp_path):
    old = corpus(400)
    train, val = split_records(old, 0.1)
    assert 20 < len(val) < 60 and len(train) + len(val) == 400
    train2, val2 = split_records(old + corpus(400, prefix="new"), 0.1)
    key = lambda recs: {r["messages"][0]["content"] for r in recs}  # noqa: E731
    assert key(val) <= key(val2) and key(train) <= key(train2)


def test_split_files(tmp_path):
    write_records(tmp_path / "in.jsonl", corpus(100))
    n_train, n_val = split([tmp_path / "in.jsonl"], tmp_path / "train.jsonl", tmp_path / "val.jsonl", 0.2)
    assert n_train + n_val == 100
    assert len(read_jsonl(tmp_path / "train.jsonl")) == n_train and len(read_jsonl(tmp_path / "val.jsonl")) == n_val


@pytest.mark.parametrize("ratio", [0.7, 0.33, 0.5, 1.0])
def test_allocate_hits_ratio_within_one(ratio):
    quotas = {"persona": 7, "korean": 13, "coding": 11, "general": 5}
    new = allocate(quotas, ratio)
    assert abs(sum(new.values()) - sum(quotas.values()) * ratio) <= 0.5
    assert all(abs(new[c] - q * ratio) < 1 for c, q in quotas.items())


def pools():
    cats = ("persona", "korean", "coding", "general")
    new = [r for c in cats for r in corpus(500, prefix=f"new-{c}", category=c)]
    replay = [r for c in cats for r in corpus(500, prefix=f"old-{c}", category=c)]
    return new, replay


def test_mix_hits_ratio_and_quotas():
    new, replay = pools()
    out, report = mix_records(new, replay, MixConfig(seed=1))
    quotas = {"persona": 200, "korean": 300, "coding": 300, "general": 200}
    by_cat = Counter(r["category"] for r in out)
    from_new = sum(r["messages"][0]["content"].startswith("new") for r in out)
    assert all(abs(by_cat[c] - q) <= 1 for c, q in quotas.items())
    assert abs(from_new - 0.7 * len(out)) <= 1 and report.drawn == len(out) == 1000 and not report.shortfalls
    assert mix_records(new, replay, MixConfig(seed=1))[0] == out and mix_records(new, replay, MixConfig(seed=2))[0] != out


def test_mix_reports_shortfall():
    new, replay = pools()
    replay = [r for r in replay if r["category"] != "korean"][:-450]  # no korean, 50 general
    out, report = mix_records(new, replay, MixConfig(seed=0))
    assert "korean from replay: wanted 90, only 0 available (90 short)" in report.shortfalls[0]
    assert "general from replay: wanted 60, only 50 available (10 short)" in report.shortfalls[1]
    assert report.drawn == len(out) == 1000 - 90 - 10


def test_mix_files_and_topic_fallback(tmp_path):
    write_records(tmp_path / "new.jsonl", [chat("Fix my code", "```python\nx = 1\n```") for _ in range(10)])
    write_records(tmp_path / "old.jsonl", [chat("Fix my code", "```js\nlet x = 1\n```") for _ in range(10)])
    report = mix([tmp_path / "new.jsonl"], [tmp_path / "old.jsonl"], tmp_path / "mix.jsonl",
                 MixConfig(quotas={"coding": 10}, new_ratio=0.6))
    assert len(read_jsonl(tmp_path / "mix.jsonl")) == 10 == report.drawn
    assert [(d.source, d.drawn) for d in report.draws] == [("new", 6), ("replay", 4)]
