"""The human steps in real rounds on the embedded model (Ollama stand-in), in one workspace with
`review: required`, a blind comparison gate and every tracker on:

month 1: stops after cleaning until every conversation is decided; continues and trains on the
decisions (rejected out, edit in, the blind prompts held out); waits at the gate for the picks;
ships on picks for the candidate. The training run and the round are in the workspace's MLflow
store; W&B wrote offline run files. Month 2: its preference step trains on month 1's picks (DPO
pairs with provenance); picks for the live model refuse it, with the win rate as the reason."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
from rich.console import Console

from edentune.cycle import human
from edentune.cycle.round import run_round
from edentune.cycle.workspace import load_workspace
from edentune.registry import Registry


def _run(ws, month, **kw):
    out = io.StringIO()
    result = run_round(ws, [month], console=Console(file=out, width=300), **kw)
    return result, out.getvalue()


def _steps(ws, round_id):
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        return [s.step for s in reg.list_steps(round_id)]


def _pick_all(ws, round_id, winner):
    with Registry(ws / "registry.sqlite") as reg:
        pairs = reg.blind_pairs(round_id)
        for p in pairs:
            reg.set_pick(p.pair_id, "a" if p.first_side == winner else "b")
        return reg.blind_pairs(round_id)


@pytest.mark.slow
def test_review_required_and_the_human_gate(tmp_path, make_workspace, cycle_files, standin_factory, short_parity):
    server = standin_factory()
    ws = make_workspace(tmp_path / "ws", server.host, review="required",
                        **{"gate.human_prompts": 3, "gate.human_min_win_rate": 0.5,
                           "run.training.report_to": ["tensorboard", "mlflow", "wandb"],
                           # the subject is the human gate: two steps, and no validation-loss condition
                           "run.training.max_steps": 2, "run.training.warmup_steps": 0, "run.training.eval_steps": 1,
                           "gate.require_val_loss_improvement": False})

    # -- month 1, first run: stops after cleaning
    r, out = _run(ws, cycle_files["month1"], round_id="2026-01")
    assert r.status == "waiting" and r.units == []
    assert f"waiting for review: edentune review {ws}" in " ".join(out.split())
    assert _steps(ws, "2026-01") == ["ingest", "clean", "fixed", "replay"]

    # the user decides (the browser test drives the same registry calls through the page)
    w = load_workspace(ws)
    with Registry(ws / "registry.sqlite") as reg:
        items = [i for i in human.review_items(w, reg, "2026-01") if i.status == "clean"]
        blind = {b["conv_id"] for b in human.blind_sample(w, "2026-01")}
        trainable = [i for i in items if not i.flags]
        rejected, edited = trainable[0], trainable[1]
        reg.set_review("2026-01", [i.conv_id for i in items], decision="approved")
        reg.set_review("2026-01", [rejected.conv_id], decision="rejected")
        reg.set_review("2026-01", [edited.conv_id],
                       edited=[*edited.messages[:-1], {"role": "assistant", "content": "A reviewer's better answer."}])
    assert len(blind) == 3

    # -- second run: the same round continues, trains on the decisions, waits at the gate for the picks
    r, out = _run(ws, cycle_files["month1"])
    assert r.round_id == "2026-01" and r.status == "waiting"
    assert "waiting for the blind comparison: edentune review" in " ".join(out.split()) and "0 of 3 pairs picked" in out
    new = [json.loads(line) for line in (ws / "rounds/2026-01/default/data/new.jsonl").read_text(encoding="utf-8").splitlines()]
    ids = {human.conv_id({"messages": rec["messages"]}) for rec in new}
    assert rejected.conv_id not in ids and not ids & blind
    assert [rec["messages"][-1]["content"] for rec in new if rec.get("review_edited") == edited.conv_id] == ["A reviewer's better answer."]
    assert _steps(ws, "2026-01")[-2:] == ["evaluate", "blind"]

    # -- picks for the candidate: the third run ships
    pairs = _pick_all(ws, "2026-01", "candidate")
    assert len(pairs) == 3 and {p.winner for p in pairs} == {"candidate"}
    r, out = _run(ws, cycle_files["month1"])
    assert r.status == "accepted", r.units[0].reasons
    gate = json.loads((ws / "rounds/2026-01/default/eval/gate.json").read_text(encoding="utf-8"))
    assert gate["human"]["win_rate"] == 1.0 and gate["human"]["picked"] == 3 and gate["ship"]

    # -- trackers: the training run and the round in the workspace's MLflow store; W&B offline files
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("edentune")
    runs = client.search_runs([exp.experiment_id])
    rounds = [x for x in runs if x.data.tags.get("edentune.kind") == "cycle round"]
    training = [x for x in runs if "train_loss" in x.data.metrics or "loss" in x.data.metrics]
    assert len(rounds) == 1 and training
    rnd = rounds[0]
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        run_row = reg.run("2026-01", "default")
    assert rnd.data.tags["edentune.verdict"] == "ship" and rnd.data.tags["edentune.adapter_sha256"] == run_row.adapter_sha256
    assert rnd.data.metrics["final/val_loss"] == pytest.approx(run_row.metrics["val_loss"])
    assert rnd.data.metrics["final/human_win_rate"] == 1.0
    assert rnd.data.params["training.learning_rate"] == "0.001"
    history = client.get_metric_history(training[0].info.run_id, "loss" if "loss" in training[0].data.metrics else "train_loss")
    assert len(history) >= 1
    offline = list((ws / "rounds/2026-01/default/run/wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0
    assert list((ws / "rounds/2026-01/default/wandb").glob("offline-run-*/run-*.wandb"))  # the round's own run
    assert not (ws.parent / "mlruns").exists() and not os.path.exists("mlruns")

    # -- the dashboard of this workspace (and the README's picture of it)
    if shutil.which("chromium") or os.environ.get("CI"):
        _dashboard(ws)

    # -- month 2: month 1's picks train its preference step; picks for the live model refuse it
    r, out = _run(ws, cycle_files["month2"], round_id="2026-02")
    assert r.status == "waiting" and "waiting for review" in out
    w = load_workspace(ws)
    with Registry(ws / "registry.sqlite") as reg:
        reg.set_review("2026-02", [i.conv_id for i in human.review_items(w, reg, "2026-02") if i.status == "clean"], decision="approved")
    dpo = [json.loads(line) for line in (ws / "rounds/2026-02/shared/human/human_dpo.jsonl").read_text(encoding="utf-8").splitlines()]
    assert dpo and all(d["provenance"]["round"] == "2026-01" and d["provenance"]["chosen_model"] == "candidate" for d in dpo)
    assert {d["chosen"][0]["content"] for d in dpo} <= {p.candidate_answer for p in pairs}
    r, out = _run(ws, cycle_files["month2"])
    assert r.status == "waiting", out
    assert "preference" in _steps(ws, "2026-02")
    _pick_all(ws, "2026-02", "live")
    r, out = _run(ws, cycle_files["month2"])
    assert r.status == "refused"
    assert any("win rate 0%" in reason and "human_min_win_rate 50%" in reason for reason in r.units[0].reasons), r.units[0].reasons
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert reg.live("default").round_id == "2026-01"


def _dashboard(ws):
    from playwright.sync_api import sync_playwright

    from edentune.review.server import serve

    running = serve(ws, background=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(running.url.replace("/review", "/dashboard"))
            assert "deployed" in page.inner_text("#rounds") and page.locator(".plots img").count() >= 1
            if os.environ.get("EDENTUNE_SCREENSHOT_DIR"):
                page.screenshot(path=os.path.join(os.environ["EDENTUNE_SCREENSHOT_DIR"], "dashboard.png"), full_page=True)
            page.click("a:has-text('answers')")
            assert "live model" in page.inner_text("main") and page.locator("table tr").count() == 4  # header + 3 cases
            browser.close()
    finally:
        running.stop()


class _StopBeforeTraining(Exception):
    pass


def test_required_review_stops_then_the_round_trains_on_the_decisions(tmp_path, make_workspace, cycle_files, standin_factory,
                                                                        monkeypatch):
    """The fast half of the test above (no model): stop after cleaning, resume into select and mix."""
    from edentune.cycle import round as round_mod

    server = standin_factory()
    ws = make_workspace(tmp_path / "ws", server.host, review="required", **{"gate.human_prompts": 2})
    r, out = _run(ws, cycle_files["month1"], round_id="2026-03")
    assert r.status == "waiting" and f"waiting for review: edentune review {ws}" in " ".join(out.split())
    again, _ = _run(ws, cycle_files["month1"])  # nothing decided yet: still waiting, nothing redone
    assert again.status == "waiting" and _steps(ws, "2026-03") == ["ingest", "clean", "fixed", "replay"]

    w = load_workspace(ws)
    with Registry(ws / "registry.sqlite") as reg:
        items = [i for i in human.review_items(w, reg, "2026-03") if i.status == "clean"]
        blind = {b["conv_id"] for b in human.blind_sample(w, "2026-03")}
        free = [i for i in items if not i.flags]
        reg.set_review("2026-03", [i.conv_id for i in items[:-1]], decision="approved")
    r, out = _run(ws, cycle_files["month1"])
    assert r.status == "waiting" and "(1 of" in out  # one left undecided
    with Registry(ws / "registry.sqlite") as reg:
        reg.set_review("2026-03", [items[-1].conv_id, free[0].conv_id], decision="rejected")
        reg.set_review("2026-03", [free[1].conv_id], edited=[*free[1].messages[:-1], {"role": "assistant", "content": "Edited."}])

    def stop(*a, **kw):
        raise _StopBeforeTraining
    monkeypatch.setattr(round_mod, "_sft", stop)
    with pytest.raises(_StopBeforeTraining):
        _run(ws, cycle_files["month1"])
    assert _steps(ws, "2026-03")[-2:] == ["select", "mix"]
    new = [json.loads(line) for line in (ws / "rounds/2026-03/default/data/new.jsonl").read_text(encoding="utf-8").splitlines()]
    ids = {human.conv_id({"messages": rec["messages"]}) for rec in new}
    assert free[0].conv_id not in ids and items[-1].conv_id not in ids and not ids & blind and len(blind) == 2
    assert [rec["messages"][-1]["content"] for rec in new if rec.get("review_edited") == free[1].conv_id] == ["Edited."]
    # Trained: every clean conversation except the rejected and the held-out ones (blind sample, or
    # frozen into the fixed validation set; a conversation can be both, so the union counts).
    held = blind | {i.conv_id for i in items if "held out: fixed" in " ".join(i.flags)}
    assert len(new) == len({i.conv_id for i in items} - {items[-1].conv_id, free[0].conv_id} - held)
    # Changing a decision makes select (and what follows) run again on the next `cycle run`.
    with Registry(ws / "registry.sqlite") as reg:
        reg.set_review("2026-03", [free[0].conv_id], decision="approved")
    with pytest.raises(_StopBeforeTraining):
        _run(ws, cycle_files["month1"])
    new = (ws / "rounds/2026-03/default/data/new.jsonl").read_text(encoding="utf-8")
    assert any(human.conv_id({"messages": json.loads(line)["messages"]}) == free[0].conv_id for line in new.splitlines())


def test_the_human_gate_waits_for_picks_then_decides_by_them(tmp_path, make_workspace, cycle_files, standin_factory):
    """human_verdict on real registry rows: waits (HumanWait) until enough picks, then ships or refuses."""
    server = standin_factory()
    ws = make_workspace(tmp_path / "ws", server.host, **{"gate.human_prompts": 4, "gate.human_min_win_rate": 0.6})
    w = load_workspace(ws)
    with Registry(ws / "registry.sqlite") as reg:
        reg.begin_round("r", {})
        reg.add_blind_pairs("r", "default", [{"pair_id": f"p{i}", "seq": i, "prompt": [{"role": "user", "content": "q"}],
                                              "first_side": "live" if i % 2 else "candidate", "live_answer": f"L{i}",
                                              "candidate_answer": f"C{i}"} for i in range(4)])
        with pytest.raises(human.HumanWait, match="0 of 4 pairs picked"):
            human.human_verdict(w, reg, "r", "default")
        for p in reg.blind_pairs("r")[:3]:
            reg.set_pick(p.pair_id, "a" if p.first_side == "candidate" else "b")
        with pytest.raises(human.HumanWait, match="3 of 4"):
            human.human_verdict(w, reg, "r", "default")
        last = reg.blind_pairs("r")[3]
        reg.set_pick(last.pair_id, "a" if last.first_side == "live" else "b")  # the live model wins this one
        verdict = human.human_verdict(w, reg, "r", "default")
        assert verdict["ship"] and verdict["win_rate"] == 0.75 and not verdict["reasons"]
        second = reg.blind_pairs("r")[1]
        reg.set_pick(second.pair_id, "a" if second.first_side == "live" else "b")  # the user changes their mind
        reg.set_pick(reg.blind_pairs("r")[2].pair_id, "both_bad")
        verdict = human.human_verdict(w, reg, "r", "default")  # 1 win + ½ (both bad) of 4
        assert not verdict["ship"] and verdict["win_rate"] == 0.375
        assert verdict["reasons"] == [f"the blind comparison's win rate 38% (95% CI {verdict['ci_low']:.0%}–{verdict['ci_high']:.0%}, "
                                      "4 picks) is below gate.human_min_win_rate 60%"]
