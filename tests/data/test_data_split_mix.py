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


@pytest.mark.parametrize("total", [0, 1, 7, 100, 857])
def test_allocate_is_proportional_and_adds_up(total):
    weights = {"persona": 7, "korean": 13, "coding": 11, "general": 5}
    parts = allocate(weights, total)
    assert sum(parts.values()) == total
    assert all(abs(parts[c] - w * total / 36) < 1 for c, w in weights.items())


def pools(n_new=500, n_replay=500):
    cats = ("persona", "korean", "coding", "general")
    new = [r for c in cats for r in corpus(n_new, prefix=f"new-{c}", category=c)]
    replay = [r for c in cats for r in corpus(n_replay, prefix=f"old-{c}", category=c)]
    return new, replay


def from_new(records):
    return sum(r["messages"][0]["content"].startswith("new") for r in records)


def test_a_month_of_2000_trains_all_of_it_plus_857_replay():
    new, replay = pools()  # 2,000 new; the buffer: 2,000 earlier records, capped by the quotas to 1,000
    out, report = mix_records(new, replay, MixConfig(seed=1))
    assert from_new(out) == 2000 and len(out) - 2000 == 857 == report.replay == report.replay_wanted
    assert report.realised_ratio == round(2000 / 2857, 4) and abs(report.realised_ratio - 0.7) < 0.001
    assert not report.shortfalls and report.replay_available == 1000
    # Stratified by the buffer's categories (200/300/300/200 of 1,000): 857 split in the same shares.
    replayed = Counter(r["category"] for r in out if r["messages"][0]["content"].startswith("old"))
    assert replayed == {"persona": 171, "korean": 257, "coding": 257, "general": 172}
    assert len({r["messages"][0]["content"] for r in out}) == len(out)  # nothing drawn twice
    assert mix_records(new, replay, MixConfig(seed=1))[0] == out and mix_records(new, replay, MixConfig(seed=2))[0] != out


def test_a_month_of_150_gets_64_replay():
    new, replay = pools(n_new=150 // 4 + 1)
    new = new[:150]
    out, report = mix_records(new, replay, MixConfig(seed=0))
    assert from_new(out) == 150 and report.replay == 64 == len(out) - 150
    assert report.realised_ratio == round(150 / 214, 4)


def test_a_small_buffer_gives_what_it_holds_and_says_so():
    new, replay = pools()
    replay = replay[:100]  # 100 persona records
    out, report = mix_records(new, replay, MixConfig(seed=0))
    assert from_new(out) == 2000 and report.replay == 100 and report.realised_ratio == round(2000 / 2100, 4)
    assert "the replay buffer holds 100 record(s) of the 857" in report.shortfalls[0] and "trained 95% new" in report.shortfalls[0]


def test_a_month_too_small_for_the_ratio_says_so():
    new, replay = pools()
    out, report = mix_records(new[:1], replay, MixConfig(seed=0, new_ratio=0.9))  # 1 × 0.1/0.9 rounds to 0
    assert len(out) == 1 and report.replay == 0 and "too small a month" in report.shortfalls[0]


def test_mix_files_and_topic_fallback(tmp_path):
    write_records(tmp_path / "new.jsonl", [chat("Fix my code", "```python\nx = 1\n```") for _ in range(6)])
    write_records(tmp_path / "old.jsonl", [chat(f"Fix my code {i}", "```js\nlet x = 1\n```") for i in range(10)])
    report = mix([tmp_path / "new.jsonl"], [tmp_path / "old.jsonl"], tmp_path / "mix.jsonl",
                 MixConfig(quotas={"coding": 10}, new_ratio=0.6))
    assert len(read_jsonl(tmp_path / "mix.jsonl")) == 10 == report.drawn
    assert [(d.category, d.source, d.drawn) for d in report.draws] == [("coding", "new", 6), ("coding", "replay", 4)]
