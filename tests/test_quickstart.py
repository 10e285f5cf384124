"""The README's main job end to end, at its smallest size: data -> QLoRA -> compare -> export.

The real quickstart (40 steps, 8 suite cases) is timed in docs/benchmarks.md; this run checks
that every stage is wired and writes what the user is told it writes.
"""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from edentune.config import load_config
from edentune.quickstart import QuickstartOptions, run_quickstart


def test_quickstart_smallest_run(tmp_path):
    console = Console(record=True, width=120)
    opts = QuickstartOptions(out_dir=tmp_path / "qs", max_steps=2, eval_cases=2, max_new_tokens=12, shown_prompts=1)
    result = run_quickstart(opts, console)
    out = console.export_text()

    cfg = load_config(result.config_path)  # the written config is valid and names absolute data
    assert cfg.quantization.load_in_4bit and cfg.training.max_steps == 2
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    assert (tmp_path / "qs" / "loss_curve.png").stat().st_size > 1000
    assert {"report.html", "report.md", "comparison.json"} <= set(result.report_paths)
    verdict = json.loads(result.report_paths["comparison.json"].read_text())
    assert "ship" in verdict
    assert (result.export_dir / "adapter.gguf").exists() and (result.export_dir / "Modelfile").exists()
    assert result.create_commands and result.create_commands[0].startswith("ollama create ")
    # what the user sees: the cleaning summary, before/after answers, the comparison, the command
    for text in ("Validate and clean", "held-out prompt", "base", "fine-tuned", "ollama create"):
        assert text in out


class _StopAfterConfig(Exception):
    """Raised where the quickstart would load the evaluation suite: the config line is printed by then."""


@pytest.mark.parametrize("backend, says, never", [
    ("torch", "QLoRA: bitsandbytes 4-bit NF4 base", "MLX"),
    ("mlx", "QLoRA: MLX affine 4-bit base in groups of 64", "NF4"),
])
def test_quickstart_names_the_quantization_the_backend_runs(tmp_path, monkeypatch, backend, says, never):
    import edentune.evaluate.suite
    import edentune.train.run

    def stop(*_args, **_kwargs):
        raise _StopAfterConfig

    monkeypatch.setattr(edentune.train.run, "select_backend", lambda requested: backend)
    monkeypatch.setattr(edentune.evaluate.suite, "load_suite", stop)
    console = Console(record=True, width=200)
    with pytest.raises(_StopAfterConfig):
        run_quickstart(QuickstartOptions(out_dir=tmp_path / "qs"), console)
    line = next(line for line in console.export_text().splitlines() if line.startswith("run config:"))
    assert says in line and never not in line, line
