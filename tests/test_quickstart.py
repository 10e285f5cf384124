"""`make quickstart` at its smallest size: two months of the cycle on the embedded model without
Ollama (`cycle run --no-deploy` twice), then where everything is and how to deploy.

The real quickstart (40 steps a month, 8 suite cases) is timed in docs/benchmarks.md; this run
checks that it is the cycle that runs, month 2 builds on month 1, and the user is shown what the
quickstart says it writes."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from edentune.quickstart import MONTHS, QuickstartOptions, run_quickstart
from edentune.registry import Registry


@pytest.fixture
def one_probe(monkeypatch):
    from edentune.export import parity

    monkeypatch.setattr(parity, "PROBE_CONVERSATIONS", [parity.PROBE_CONVERSATIONS[2]])  # the check itself: tests/export


@pytest.mark.slow
def test_quickstart_two_months_of_the_cycle(tmp_path, one_probe):
    console = Console(record=True, width=200)
    out = tmp_path / "qs"
    result = run_quickstart(QuickstartOptions(out_dir=out, max_steps=2, eval_cases=2, max_new_tokens=12), console)
    text = console.export_text()

    ws = out / "workspace"
    assert result.workspace == ws and [r.round_id for r in result.rounds] == list(MONTHS)
    halves = [(out / "data" / f"{m}.jsonl").read_text(encoding="utf-8").splitlines() for m in MONTHS]
    assert halves[0] and halves[1] and not set(halves[0]) & set(halves[1])
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        runs = {m: reg.run(m, "default") for m in MONTHS}
        steps = [s.step for s in reg.list_steps(MONTHS[1])]
        mix = reg.step(MONTHS[1], "default", "mix").detail
        assert reg.live_rows() == []  # nothing deployed: no Ollama was needed
        assert all(reg.step(m, "default", "deploy") is None for m in MONTHS)
    assert steps[:6] == ["ingest", "clean", "fixed", "replay", "select", "mix"] and "gate" in steps
    if runs[MONTHS[0]].status == "accepted":  # month 2 mixes month 1's records and must beat month 1
        assert mix["sources"].get(f"{MONTHS[0]}/default", 0) > 0 and mix["ratio"] == 0.7
        assert "replayed from month-1/default" in text
        assert runs[MONTHS[1]].verdict["live_val_loss"] == pytest.approx(runs[MONTHS[0]].verdict["val_loss"])
    else:
        assert list(mix["sources"]) == ["new"] and "the replay buffer was empty" in text
    for m in MONTHS:
        assert runs[m].status in ("accepted", "refused") and f"{m}: trained on" in text
        assert result.report_paths[m].is_file() and str(result.report_paths[m]) in text
        gate = json.loads((ws / "rounds" / m / "default" / "eval" / "gate.json").read_text(encoding="utf-8"))
        assert gate["ship"] == (runs[m].status == "accepted")
    assert result.loss_curve.stat().st_size > 1000 and str(result.loss_curve) in text
    accepted = [m for m in MONTHS if runs[m].status == "accepted"]
    assert list(result.export_dirs) == accepted
    for m in accepted:
        assert (result.export_dirs[m] / "adapter.gguf").is_file() and (result.export_dirs[m] / "Modelfile").is_file()
    if accepted:
        assert result.deploy_command == f"edentune cycle deploy {ws} --round {accepted[-1]}" and result.deploy_command in text
    else:
        assert result.deploy_command is None and "nothing to deploy" in text
    assert "accepted, not deployed" in text or not accepted

    # a second run continues: both months are kept, nothing is trained again
    again = run_quickstart(QuickstartOptions(out_dir=out, max_steps=2, eval_cases=2, max_new_tokens=12), Console(record=True, width=200))
    assert again.rounds == [] and again.report_paths == result.report_paths


class _StopAtTheFirstRound(Exception):
    """Raised where the quickstart starts month 1: the workspace and the training line are printed by then."""


@pytest.mark.parametrize("backend, says, never", [
    ("torch", "QLoRA: bitsandbytes 4-bit NF4 base", "MLX"),
    ("mlx", "QLoRA: MLX affine 4-bit base in groups of 64", "NF4"),
])
def test_quickstart_names_the_quantization_the_backend_runs(tmp_path, monkeypatch, backend, says, never):
    import edentune.cycle.round
    import edentune.presets
    import edentune.train.run

    def stop(*_args, **_kwargs):
        raise _StopAtTheFirstRound

    monkeypatch.setattr(edentune.train.run, "select_backend", lambda requested: backend)
    monkeypatch.setattr(edentune.presets, "fast_cpu_4bit", lambda: True)  # the 4-bit recipe, whatever this CPU is
    monkeypatch.setattr(edentune.cycle.round, "run_round", stop)
    console = Console(record=True, width=200)
    with pytest.raises(_StopAtTheFirstRound):
        run_quickstart(QuickstartOptions(out_dir=tmp_path / "qs"), console)
    out = console.export_text()
    line = next(line for line in out.splitlines() if line.startswith("training:"))
    assert says in line and never not in line, line
    assert "edentune cycle init --model embedded" in out and "40 steps a month" in out
    # the workspace is a real cycle workspace, sized as the line says
    from edentune.cycle.workspace import load_workspace

    cfg = load_workspace(tmp_path / "qs" / "workspace").round_config(MONTHS[0], "default")
    assert cfg.training.max_steps == 40 and cfg.model.max_seq_len == 384 and cfg.export.ollama_base == "smollm2:135m"
