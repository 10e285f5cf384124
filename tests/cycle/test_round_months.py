"""Three months on the embedded model against the Ollama stand-in: round 1 deploys; round 2 (with
thumbs up/down) deploys and mixes in the replay buffer of round 1; round 3, with a learning rate
that breaks the model, is refused with its reasons and the live model stays; then rollback to
round 1. Checked in Ollama (the stand-in) and in the registry."""

from __future__ import annotations

import json
import math

import yaml

from edentune.cycle import rollback, status
from edentune.cycle.round import run_round
from edentune.io import file_sha256
from edentune.registry import SHARED, Registry


def live_digest(server, model: str = "eden:latest") -> str:
    return next(iter(server.models[model]["adapters"].values()))


def gguf_digest(ws, round_id: str) -> str:
    return "sha256:" + file_sha256(ws / "rounds" / round_id / "default" / "export" / "adapter.gguf")


def test_three_months_then_rollback(first_round, cycle_files, short_parity):
    ws, server = first_round["ws"], first_round["server"]

    # -- month 1: trained from the base, better than the base on the fixed validation set, deployed
    r1 = first_round["result"]
    assert r1.status == "accepted" and [u.status for u in r1.units] == ["accepted"]
    u1 = r1.units[0]
    assert u1.val_loss < u1.live_val_loss and u1.models == ["eden"]
    assert first_round["eden"]["adapters"] == {"adapter.gguf": gguf_digest(ws, "2026-01")}
    assert first_round["eden"]["from"] == "smollm2:135m"
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        steps = [s.step for s in reg.list_steps("2026-01")]
        assert steps == ["ingest", "clean", "fixed", "replay", "select", "mix", "sft", "evaluate", "gate", "export", "deploy", "live"]
        assert all(s.record.detail["seconds"] >= 0 for s in reg.list_steps("2026-01"))
        assert reg.step("2026-01", "default", "evaluate").detail["baseline"] == "base model"
    val_records = (ws / "fixed" / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    assert val_records and not set(val_records) & set((ws / "rounds" / "2026-01" / "default" / "data" / "new.jsonl").read_text(encoding="utf-8").splitlines())
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        # The 6 given validation conversations are below the minimum of 9: grown from month 1 (before
        # training), after the length filter; the best checkpoint was chosen on all of them.
        size = reg.step("2026-01", SHARED, "fixed").detail["validation"]
        assert size["met"] and size["conversations"] == len(val_records) >= 9 and size["added"] == len(val_records) - 6
        sft = reg.step("2026-01", "default", "sft").detail
        assert sft["data"]["validation"]["kept"] == len(val_records) and sft["data"]["validation"]["dropped_overlong"] == 0
        run1 = reg.run("2026-01", "default")
        assert run1.metrics["started_from"] == "base" and run1.metrics["realised_new_ratio"] == 1.0
        assert run1.metrics["trained_records"] + run1.metrics["dropped_for_length"] == run1.metrics["train_records"]
    # One validation loss per adapter: the registry, the gate, the status table and the evaluation agree.
    candidate = json.loads((ws / "rounds" / "2026-01" / "default" / "eval" / "candidate.json").read_text(encoding="utf-8"))
    (row,) = [r for r in status(ws).rows if r.round_id == "2026-01"]
    assert u1.val_loss == run1.metrics["val_loss"] == first_round["gate"]["val_loss"] == row.metrics["val_loss"]
    assert u1.val_loss == math.log(candidate["metrics"]["perplexity_validation"])
    assert row.step_seconds["sft"] > 0 and row.wall_s > 0

    # -- month 2: continues from the live adapter, mixes 70/30 with round 1 from the buffer, KTO on ratings
    buffer = [json.loads(line) for line in (ws / "replay" / "buffer.jsonl").read_text(encoding="utf-8").splitlines()]
    assert buffer and all(r["replay_source"] == {"round": "2026-01", "persona": "default"} for r in buffer)
    quotas = {"persona": 3, "korean": 3, "coding": 4, "general": 3}
    by_cat = {}
    for r in buffer:
        by_cat[r["category"]] = by_cat.get(r["category"], 0) + 1
    assert all(by_cat[c] <= quotas[c] for c in by_cat) and set(by_cat) <= set(quotas)

    r2 = run_round(ws, [cycle_files["month2"]], feedback=cycle_files["ratings2"], round_id="2026-02")
    assert r2.status == "accepted", r2.units[0].reasons
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        mix = reg.step("2026-02", "default", "mix").detail
        assert mix["ratio"] == 0.7 and mix["sources"].get("2026-01/default", 0) > 0
        # Every new record trained, replay = 3/7 of it (capped by the buffer), the realised ratio recorded.
        new2 = reg.step("2026-02", "default", "select").detail["records"]
        assert mix["new"] == new2 and mix["replay"] == min(round(new2 * 3 / 7), len(buffer)) == mix["sources"]["2026-01/default"]
        run2 = reg.run("2026-02", "default")
        assert run2.metrics["realised_new_ratio"] == round(new2 / (new2 + mix["replay"]), 4)
        assert run2.metrics["started_from"] == "round 2026-01" and run2.metrics["forgetting_base"] is not None
        assert reg.step("2026-02", "default", "sft").detail["init_adapter"].endswith("2026-01/default/run/adapter")
        assert reg.step("2026-02", "default", "preference").detail["method"] == "kto"
        assert reg.step("2026-02", "default", "evaluate").detail["baseline_reused_from"] == "rounds/2026-01/default/eval/candidate.json"
        assert reg.live("default").round_id == "2026-02"
        assert reg.run("2026-02", "default").metrics["live_val_loss"] == r1.units[0].val_loss
    assert live_digest(server) == gguf_digest(ws, "2026-02") != gguf_digest(ws, "2026-01")

    # -- month 3: someone set a learning rate that breaks the model: refused, nothing deployed
    data = yaml.safe_load((ws / "cycle.yaml").read_text(encoding="utf-8"))
    data["run"]["training"]["learning_rate"] = 0.05
    (ws / "cycle.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    creates_before = [r for r in server.requests if r[1] == "/api/create"]
    r3 = run_round(ws, [cycle_files["month3"]], round_id="2026-03")
    u3 = r3.units[0]
    assert r3.status == "refused" and u3.status == "refused" and not u3.ship
    assert any("validation loss did not improve" in reason for reason in u3.reasons), u3.reasons
    assert u3.val_loss > u3.live_val_loss
    assert [r for r in server.requests if r[1] == "/api/create"] == creates_before
    assert live_digest(server) == gguf_digest(ws, "2026-02")
    assert not (ws / "rounds" / "2026-03" / "default" / "export").exists()
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert reg.round("2026-03").status == "refused"
        run3 = reg.run("2026-03", "default")
        assert run3.status == "refused" and run3.reasons == u3.reasons and run3.verdict["ship"] is False
        assert reg.live("default").round_id == "2026-02"
        assert reg.step("2026-03", "default", "export") is None and reg.step("2026-03", "default", "deploy") is None
    buffer_after = (ws / "replay" / "buffer.jsonl").read_text(encoding="utf-8")
    assert "2026-03" not in buffer_after  # a refused month never enters the replay buffer

    # -- rollback to month 1: its own export back in Ollama, recorded
    (done,) = rollback(ws, to_round="2026-01")
    assert (done["persona"], done["round_id"], done["from_round"], done["model"]) == ("default", "2026-01", "2026-02", "eden:latest")
    assert live_digest(server) == gguf_digest(ws, "2026-01")
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert reg.live("default").round_id == "2026-01"
        kinds = [(e.kind, e.round_id) for e in reg.events() if e.kind in ("deploy", "rollback")]
        assert kinds == [("deploy", "2026-01"), ("deploy", "2026-02"), ("rollback", "2026-01")]
