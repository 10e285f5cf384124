"""Progress without a terminal: a long run writes plain lines with step, losses and ETA."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from edentune.train.monitor import RichProgressCallback


def run_steps(console: Console, clock: list[float], monkeypatch) -> None:
    import edentune.train.monitor as monitor

    monkeypatch.setattr(monitor.time, "monotonic", lambda: clock[0])
    cb = RichProgressCallback(console)
    state = SimpleNamespace(global_step=0, max_steps=10)
    cb.on_train_begin(None, state, None)
    for step in range(1, 11):
        clock[0] += 10.0  # 10 s per step
        state.global_step = step
        cb.on_step_end(None, state, None)
        logs = {"loss": 2.0 / step, "learning_rate": 1e-3}
        if step == 5:
            logs = {"eval_loss": 1.5}
        cb.on_log(None, state, None, logs=logs)
    cb.on_train_end(None, state, None)


def test_plain_lines_with_eta_when_not_a_terminal(monkeypatch):
    out = io.StringIO()
    run_steps(Console(file=out, force_terminal=False, width=200), [1000.0], monkeypatch)
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("train step")]
    # at most every 30 s, and at the evaluation (step 5), which restarts the 30 s
    assert [ln.split()[2] for ln in lines] == ["3/10", "5/10", "8/10"]
    assert "val 1.500" in lines[1] and "eta 0:00:50" in lines[1]  # 5 steps left at 10 s each
    assert "loss 0.667" in lines[0] and "elapsed 0:00:30" in lines[0]
    assert "train finished at step 10/10 in 0:01:40" in out.getvalue()


def test_no_plain_lines_on_a_terminal(monkeypatch):
    out = io.StringIO()
    run_steps(Console(file=out, force_terminal=True, width=200), [1000.0], monkeypatch)
    assert "train step" not in out.getvalue() and "train finished" not in out.getvalue()
