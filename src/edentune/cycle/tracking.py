"""Each finished cycle round as a run in the trackers of `training.report_to` (mlflow, wandb): one
run per trained unit (persona, or the shared adapter) with the round's frozen config as parameters,
its metrics, the gate's verdict and reasons, and the adapter's sha256 as tags. The training runs
themselves log through train/trackers.py into the same store (the workspace's mlflow.db)."""

from __future__ import annotations

import json

from ..registry import Registry
from .workspace import Workspace


def log_round(ws: Workspace, reg: Registry, round_id: str) -> None:
    from ..train.trackers import TRAINER_TRACKERS, TrackerSession

    if not any(t in TRAINER_TRACKERS for t in ws.config.run.training.report_to):
        return
    for run in reg.runs(round_id):
        if run.status not in ("accepted", "refused"):
            continue
        cfg = ws.round_config(round_id, run.persona)
        verdict = run.verdict or {}
        session = TrackerSession(cfg, ws.round_dir(round_id, run.persona), f"round {round_id} · {run.persona}",
                                 params=cfg.model_dump(mode="json"),
                                 tags={"edentune.kind": "cycle round", "edentune.round": round_id, "edentune.unit": run.persona})
        metrics = {k: v for k, v in run.metrics.items() if k != "live_at_start"}
        if isinstance(verdict.get("human"), dict):
            metrics["human_win_rate"] = verdict["human"].get("win_rate")
        session.close(metrics, {"edentune.status": run.status, "edentune.verdict": "ship" if verdict.get("ship") else "refused",
                                "edentune.reasons": json.dumps(run.reasons, ensure_ascii=False),
                                "edentune.adapter_sha256": run.adapter_sha256 or ""})
