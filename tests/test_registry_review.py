"""Registry schema v2 (review decisions, blind pairs): a v1 registry upgrades in place, keeping its
rows; decisions and picks are stored as asked; the win rate and its Wilson interval."""

from __future__ import annotations

import sqlite3

import pytest

from edentune.cycle.human import dpo_pairs, win_rate, wilson
from edentune.registry import MIGRATIONS, Registry


def test_a_version_1_registry_upgrades_and_keeps_its_rows(tmp_path):
    path = tmp_path / "registry.sqlite"
    raw = sqlite3.connect(path)
    raw.executescript(MIGRATIONS[0])
    raw.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (1, 'then')")
    raw.execute("INSERT INTO rounds (id, seq, created, status, config_json) VALUES ('2026-01', 1, 'then', 'accepted', '{}')")
    raw.commit()
    raw.close()
    with Registry(path) as reg:
        assert [r.id for r in reg.rounds()] == ["2026-01"]
        reg.set_review("2026-01", ["c1", "c2"], decision="rejected")
        reg.set_review("2026-01", ["c1"], edited=[{"role": "assistant", "content": "better"}])
        reg.set_review("2026-01", ["c2"], decision="approved")
        rows = reg.reviews("2026-01")
        assert (rows["c1"].decision, rows["c1"].edited) == ("rejected", [{"content": "better", "role": "assistant"}])
        assert (rows["c2"].decision, rows["c2"].edited) == ("approved", None)
        reg.set_review("2026-01", ["c1"], clear_edit=True)
        assert reg.reviews("2026-01")["c1"].edited is None and reg.reviews("2026-01")["c1"].decision == "rejected"
        with pytest.raises(ValueError):
            reg.set_review("2026-01", ["c1"], decision="maybe")
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS) == 2


def test_picks_are_stored_by_what_the_user_saw(tmp_path):
    with Registry(tmp_path / "r.sqlite") as reg:
        reg.begin_round("r", {})
        reg.add_blind_pairs("r", "default", [
            {"pair_id": f"p{i}", "seq": i, "prompt": [{"role": "user", "content": f"q{i}"}], "first_side": side,
             "live_answer": f"live {i}", "candidate_answer": f"cand {i}"}
            for i, side in enumerate(["live", "candidate", "live", "candidate"])])
        assert reg.set_pick("p0", "b") and reg.set_pick("p1", "a") and reg.set_pick("p2", "a") and reg.set_pick("p3", "tie")
        assert not reg.set_pick("nope", "a")
        with pytest.raises(ValueError):
            reg.set_pick("p0", "candidate")
        pairs = reg.blind_pairs("r")
    assert [p.winner for p in pairs] == ["candidate", "candidate", "live", "tie"]
    rate = win_rate(pairs)
    assert rate["win_rate"] == pytest.approx(2.5 / 4) and (rate["candidate"], rate["live"], rate["tie"]) == (2, 1, 1)
    rows = dpo_pairs(pairs)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("cand 0", "live 0"), ("cand 1", "live 1"),
                                                                                        ("live 2", "cand 2")]


def test_wilson_interval():
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 0) is None and wilson(3, 3)[1] == 1.0
