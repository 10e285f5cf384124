"""The validation set's size rule on the embedded preset (its tokenizer, chat template and the
quickstart's max_seq_len 384): counted after the length filter, grown from later months' data
until the minimum is met, never from records already trained."""

from __future__ import annotations

import json
from pathlib import Path

from edentune.cycle.validation import scored_tokens, size_validation
from edentune.cycle.workspace import ValidationPolicy, init_workspace
from edentune.data.clean import clean, dedup_key
from edentune.data.split import bucket

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "edentune" / "data" / "sample"


def test_the_set_is_sized_after_the_length_filter_and_grows_from_later_months(tmp_path):
    ws = init_workspace(tmp_path / "ws", model="embedded")
    cfg = ws.round_config("2026-01", "default")
    assert cfg.model.max_seq_len == 384 and cfg.model.overlong == "drop"  # the quickstart's recipe
    records, _ = clean([SAMPLE / "eden_sample.jsonl"])
    month1 = [r for r in records if bucket(r) < 0.5]
    month2 = [r for r in records if bucket(r) >= 0.5]
    lengths = dict(zip(map(dedup_key, records), scored_tokens(cfg, records)))
    assert sum(n is None for n in lengths.values()) > len(records) // 4  # many sample conversations are too long

    policy = ValidationPolicy(fraction=0.1, min_conversations=30, min_tokens=4000, max_share=0.2)
    val1, train1, size1 = size_validation(cfg, policy, [], month1, policy.fraction)
    keys1 = {dedup_key(r) for r in val1}
    assert all(lengths[k] is not None for k in keys1)  # only conversations training keeps
    assert size1.conversations == len(val1) and size1.tokens == sum(lengths[k] for k in keys1)
    # Month 1 alone cannot meet the minimum within its 20 % share: the whole share is taken, and it says so.
    assert not size1.met and size1.added == int(0.2 * len(month1)) and "below the minimum (30 / 4000)" in size1.warning()
    assert not keys1 & {dedup_key(r) for r in train1} and len(train1) + len(val1) == len(month1)
    assert size1.dropped_for_length > 0  # the 10 % split held long conversations: they stay with training (which drops them)

    val2, train2, size2 = size_validation(cfg, policy, val1, month2)
    keys2 = {dedup_key(r) for r in val2}
    assert keys1 < keys2 and size2.met and size2.warning() is None
    assert keys2 - keys1 <= {dedup_key(r) for r in month2}  # grown from the new month only, never from month 1's training data
    assert not keys2 & {dedup_key(r) for r in train2} and len(train2) + size2.added == len(month2)
    assert size2.conversations >= 30 and size2.tokens >= 4000

    # Met: a later month adds nothing, and the set is unchanged.
    val3, train3, size3 = size_validation(cfg, policy, val2, month2[:10])
    assert val3 == val2 and size3.added == 0 and train3 == [r for r in month2[:10] if dedup_key(r) not in keys2]
    json.dumps(size3.to_json())  # recorded in the registry as is
