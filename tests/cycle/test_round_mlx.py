"""The cycle on the MLX training backend (mlx[cpu] on Linux): round 2 with `continue_from: live`
must start from round 1's adapter, as on the torch backend. Checked where it shows: the loss of
round 2's first optimizer step is the live adapter's loss on that batch, not the base's."""

from __future__ import annotations

import json
import math

import pytest

from edentune.train.run import mlx_installed

pytestmark = [pytest.mark.slow, pytest.mark.mlx,
              pytest.mark.skipif(not mlx_installed(), reason="needs the mlx extra (mlx[cpu] on Linux); `make test` installs it")]


def first_step_loss(cfg, init_adapter, out_dir) -> float:
    """The loss the MLX engine computes for optimizer step 1 of `cfg`'s run (before any update),
    with its LoRA layers set to `init_adapter` (None: a fresh LoRA, i.e. the base's output)."""
    import mlx.core as mx

    from edentune.train.mlx_backend import MlxEngine, collate, step_order, trained_positions

    cfg = cfg.model_copy(deep=True)
    cfg.training.output_dir = str(out_dir)  # the engine writes its manifest: keep the round's run folder as it is
    engine = MlxEngine(cfg, init_adapter=init_adapter)
    engine.prepare(None)
    run = engine.mlx_run
    run.restore(None, cfg.training.learning_rate)
    batches = [collate([run.train_set[i] for i in mb], run.pad_id) for mb in step_order(run.train_set, cfg, 0)[0]]
    positions = [trained_positions(y) for _, y in batches]
    denom = sum(p.size for p in positions)
    total = sum(run.loss(run.model, mx.array(x), mx.array(y), mx.array(p))[0].item() for (x, y), p in zip(batches, positions))
    engine.close()
    return total / denom


def test_mlx_round_two_continues_the_live_adapter(tmp_path, make_workspace, cycle_files, standin_factory, short_parity):
    from edentune.cycle.round import run_round
    from edentune.cycle.workspace import load_workspace
    from edentune.registry import Registry

    server = standin_factory()
    # Dropout 0: the first step's loss is then a pure function of the weights and the batch.
    ws = make_workspace(tmp_path / "ws", server.host, **{"run.training.backend": "mlx", "run.lora.dropout": 0.0})
    r1 = run_round(ws, [cycle_files["month1"]], round_id="2026-01")
    assert r1.units[0].status in ("accepted", "refused")
    r2 = run_round(ws, [cycle_files["month2"]], round_id="2026-02")
    assert r2.units[0].status in ("accepted", "refused"), r2.units[0].reasons

    live_adapter = ws / "rounds" / "2026-01" / "default" / "run" / "adapter"
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        sft = reg.step("2026-02", "default", "sft").detail
    assert sft["init_adapter"].endswith("2026-01/default/run/adapter")
    assert json.loads((ws / "rounds" / "2026-02" / "default" / "run" / "result.json").read_text())["backend"] == "mlx"

    events = [json.loads(line) for line in (ws / "rounds" / "2026-02" / "default" / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["init_adapter"].endswith("2026-01/default/run/adapter")
    logged = next(e for e in events if e["event"] == "train" and e.get("step") == 1 and "loss" in e)["loss"]

    cfg = load_workspace(ws).round_config("2026-02", "default")
    from_live = first_step_loss(cfg, live_adapter, tmp_path / "probe-live")
    from_base = first_step_loss(cfg, None, tmp_path / "probe-base")
    assert math.isclose(logged, from_live, rel_tol=1e-4), (logged, from_live, from_base)
    assert abs(from_live - from_base) > 1e-2, "round 1's adapter should change the loss of this batch measurably"
