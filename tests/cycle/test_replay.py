"""The replay buffer: built from accepted rounds only, stratified to the quotas, deterministic by
seed, with provenance, and never holding a fixed validation/forgetting record or a suite question."""

from __future__ import annotations

import json
import random

import pytest

from edentune.config import MixConfig
from edentune.cycle.replay import PROVENANCE_KEY, update_buffer
from edentune.cycle.workspace import init_workspace, load_workspace
from edentune.data.mix import mix
from edentune.data.topics import category
from edentune.data.validate import load_valid
from edentune.io import write_jsonl_atomic

QUOTAS = {"persona": 3, "korean": 4, "coding": 4, "general": 2}


def conv(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def month(tag: str, n: int = 6) -> list[dict]:
    """n records of each category, unique to `tag`."""
    out = []
    for i in range(n):
        out.append(conv(f"Tell me about yourself ({tag} {i})", f"I am Eden, variant {tag}-{i}.", category="persona"))
        out.append(conv(f"한국어 존댓말을 설명해 주세요 {tag} {i}", f"존댓말은 높임말입니다 {tag}-{i}."))
        out.append(conv(f"How do I reverse a list in python? {tag} {i}", f"```python\nxs[::-1]  # {tag}-{i}\n```"))
        out.append(conv(f"What is the tallest mountain? {tag} {i}", f"Mount Everest ({tag}-{i})."))
    return out


@pytest.fixture
def ws(tmp_path):
    ws = init_workspace(tmp_path / "ws", model="embedded")
    text = ws.config_path.read_text().replace("persona: 200", "persona: 3").replace("korean: 300", "korean: 4") \
        .replace("coding: 300", "coding: 4").replace("general: 200", "general: 2")
    ws.config_path.write_text(text)
    ws = load_workspace(ws.dir)
    assert ws.config.replay.quotas == QUOTAS
    write_jsonl_atomic(ws.validation_path, [conv("What is the capital of France?", "Paris.")])
    write_jsonl_atomic(ws.forgetting_path, [conv("Name a primary colour.", "Red.")])
    return ws


def add_round(ws, round_id: str, records: list[dict], status: str = "accepted", persona: str = "default") -> None:
    write_jsonl_atomic(ws.new_data_path(round_id, persona), records)
    with ws.open_registry() as reg:
        reg.begin_round(round_id, {})
        reg.set_run(round_id, persona, status=status)
        reg.finish_round(round_id, "accepted" if status == "accepted" else "refused")


def buffer(ws) -> list[dict]:
    return [json.loads(line) for line in ws.buffer_path.read_text().splitlines()]


def test_quotas_provenance_and_only_accepted_rounds(ws):
    add_round(ws, "2026-01", month("jan"))
    add_round(ws, "2026-02", month("feb"), status="refused")
    with ws.open_registry() as reg:
        report = update_buffer(ws, reg)
    recs = buffer(ws)
    assert report.records == len(recs) == sum(QUOTAS.values())
    assert {c: report.categories[c].kept for c in QUOTAS} == QUOTAS
    assert {c: sum(category(r) == c for r in recs) for c in QUOTAS} == QUOTAS
    assert all(r[PROVENANCE_KEY] == {"round": "2026-01", "persona": "default"} for r in recs)
    assert all("jan" in r["messages"][0]["content"] for r in recs)  # nothing of the refused month
    assert report.sources == {"2026-01/default": len(recs)}

    add_round(ws, "2026-03", month("mar"))
    with ws.open_registry() as reg:
        report = update_buffer(ws, reg)
    recs = buffer(ws)
    assert set(report.sources) == {"2026-01/default", "2026-03/default"} and report.records == sum(QUOTAS.values())
    for r in recs:  # provenance names the round whose file holds the record
        src = r[PROVENANCE_KEY]
        assert {k: v for k, v in r.items() if k != PROVENANCE_KEY} in load_valid([ws.new_data_path(src["round"], src["persona"])])


def test_short_categories_keep_what_exists(ws):
    add_round(ws, "2026-01", month("jan", n=2))
    with ws.open_registry() as reg:
        report = update_buffer(ws, reg)
    assert {c: (v.available, v.kept) for c, v in report.categories.items()} == {c: (2, 2) for c in QUOTAS}


def test_deterministic_and_independent_of_file_order(ws):
    records = month("jan")
    add_round(ws, "2026-01", records)
    with ws.open_registry() as reg:
        update_buffer(ws, reg)
        first = ws.buffer_path.read_bytes()
        update_buffer(ws, reg)
        assert ws.buffer_path.read_bytes() == first
        random.Random(7).shuffle(records)
        write_jsonl_atomic(ws.new_data_path("2026-01", "default"), records)
        update_buffer(ws, reg)
        assert ws.buffer_path.read_bytes() == first  # same records, same seed -> byte-identical buffer

    ws.config_path.write_text(ws.config_path.read_text().replace("  seed: 42", "  seed: 43"))
    ws = load_workspace(ws.dir)
    assert ws.config.replay.seed == 43
    with ws.open_registry() as reg:
        update_buffer(ws, reg)
    assert ws.buffer_path.read_bytes() != first


def test_never_holds_fixed_sets_or_suite_questions(ws):
    leaks = [conv("what is the capital of  FRANCE?", "Paris."),  # the validation record, re-cased and re-spaced
             conv("Name a primary colour.", "Red."),  # the forgetting record
             conv("Who are you?", "I am Eden.", category="persona")]  # a question of the evaluation suite
    add_round(ws, "2026-01", month("jan", n=1) + leaks)
    with ws.open_registry() as reg:
        report = update_buffer(ws, reg)
    texts = {r["messages"][0]["content"].casefold() for r in buffer(ws)}
    assert report.excluded_fixed == 3 and report.records == 4
    assert not texts & {"what is the capital of  france?", "name a primary colour.", "who are you?"}


def test_missing_round_file_is_reported_and_buffer_mixes(ws, tmp_path):
    add_round(ws, "2026-01", month("jan"))
    add_round(ws, "2026-02", month("feb"))
    ws.new_data_path("2026-02", "default").unlink()
    with ws.open_registry() as reg:
        report = update_buffer(ws, reg)
    assert report.missing == ["2026-02/default"] and report.sources == {"2026-01/default": report.records}
    new = tmp_path / "new.jsonl"
    write_jsonl_atomic(new, month("apr"))
    mixed = mix([new], [ws.buffer_path], tmp_path / "mix.jsonl", MixConfig(new_ratio=0.5, quotas=QUOTAS, seed=1))
    # All 24 new records, and the whole buffer (13) where a 50/50 mix wants 24: said, not hidden.
    assert (mixed.new, mixed.replay, mixed.replay_wanted) == (24, report.records, 24) and report.records < 24
    assert mixed.shortfalls == [f"the replay buffer holds {report.records} record(s) of the 24 a 50% new mix of 24 new needs: "
                                f"trained {24 / (24 + report.records):.0%} new; the buffer grows with every accepted month"]
    replayed = [r for r in load_valid([tmp_path / "mix.jsonl"]) if PROVENANCE_KEY in r]
    assert replayed and all(r[PROVENANCE_KEY]["round"] == "2026-01" for r in replayed)
