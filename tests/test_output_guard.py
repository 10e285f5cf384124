"""No command overwrites its own inputs or a file edentune manages: `eval -o` over its suite,
config, validation or forgetting file or the adapter it scores, `cycle status --html` inside the
workspace, an empty output path, all refused through the real entry point (exit 2, one message)
with every file byte-identical. (`export -o` over an export holding a user's file:
tests/export/test_export_outdir.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edentune.cli import main
from edentune.config import RunConfig, render_config_yaml
from edentune.evaluate.suite import resolve_suite_path

CONVERSATION = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["edentune", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 1 if code else 0), " ".join((out.out + out.err).split())


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def eval_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suite.yaml").write_bytes(resolve_suite_path("default").read_bytes())
    for name in ("val.jsonl", "forget.jsonl", "train.jsonl"):
        (tmp_path / name).write_text(json.dumps(CONVERSATION) + "\n")
    cfg = RunConfig()
    cfg.data.train_files, cfg.data.replay_files = [str(tmp_path / "train.jsonl")], [str(tmp_path / "forget.jsonl")]
    (tmp_path / "run.yaml").write_text(render_config_yaml(cfg))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["-m", "base", "--suite", "suite.yaml", "-o", "suite.yaml"], "is the input suite.yaml"),
    (["-m", "base", "-c", "run.yaml", "-o", "run.yaml"], "is the input run.yaml"),
    (["-m", "base", "--validation", "val.jsonl", "-o", "val.jsonl"], "is the input val.jsonl"),
    (["-m", "base", "--replay", "forget.jsonl", "-o", "forget.jsonl"], "is the input forget.jsonl"),
    (["-m", "base", "-c", "run.yaml", "-o", "forget.jsonl"], "forget.jsonl"),  # the config's forgetting set
    (["-m", "adapter", "-o", "adapter/adapter_config.json"], "adapter_config.json"),
    (["-m", "adapter", "-o", "adapter/results.json"], "is inside the adapter folder"),
    (["-m", "base", "-o", ""], "an empty path"),
])
def test_eval_never_writes_over_what_it_reads(eval_inputs, monkeypatch, capsys, args, message):
    before = snapshot(eval_inputs)
    code, out = run_main(monkeypatch, capsys, "eval", *args)
    assert code == 2 and message in out and "Traceback" not in out, out
    assert snapshot(eval_inputs) == before  # refused before any model loads: nothing written


@pytest.fixture
def workspace(tmp_path):
    from edentune.cycle.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws", model="embedded").dir
    export = ws / "rounds" / "2026-01" / "default" / "export"
    export.mkdir(parents=True)
    (export / "adapter.gguf").write_bytes(b"GGUF the live round's adapter")
    (export / ".edentune-export").write_text("Written by edentune\n")
    (ws / "fixed" / "validation.jsonl").write_text(json.dumps(CONVERSATION) + "\n")
    return ws


@pytest.mark.parametrize("target", ["rounds/2026-01/default/export/adapter.gguf", "fixed/validation.jsonl",
                                    "rounds/2026-01/new.html", "cycle.yaml", "registry.sqlite"])
def test_cycle_status_html_never_writes_inside_the_workspace(workspace, monkeypatch, capsys, target):
    before = snapshot(workspace)
    code, out = run_main(monkeypatch, capsys, "cycle", "status", workspace, "--html", workspace / target)
    assert code == 2 and "whose files edentune manages" in out, out
    assert snapshot(workspace) == before


def test_cycle_status_html_beside_the_workspace_files(workspace, monkeypatch, capsys):
    code, out = run_main(monkeypatch, capsys, "cycle", "status", workspace, "--html", workspace / "report.html")
    assert code == 0, out
    assert "<html" in (workspace / "report.html").read_text()


@pytest.mark.parametrize("command", [["data", "feedback", "-o", "", "fb.jsonl"], ["data", "validate", "fb.jsonl", "--report", ""],
                                     ["data", "mix", "--new", "fb.jsonl", "-o", ""], ["compare", "--base", "a.json",
                                                                                       "--candidate", "b.json", "--out-dir", ""]])
def test_an_empty_path_is_an_error_and_nothing_lands_in_the_current_folder(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fb.jsonl").write_text(json.dumps({**CONVERSATION, "rating": "up"}) + "\n")
    code, out = run_main(monkeypatch, capsys, *command)
    assert code == 2 and "an empty path" in out, out
    assert [p.name for p in tmp_path.iterdir()] == ["fb.jsonl"]


def test_data_outputs_never_land_in_an_export_folder(tmp_path, monkeypatch, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / ".edentune-export").write_text("Written by edentune\n")
    (tmp_path / "fb.jsonl").write_text(json.dumps({**CONVERSATION, "rating": "up"}) + "\n")
    code, out = run_main(monkeypatch, capsys, "data", "feedback", "-o", export, tmp_path / "fb.jsonl")
    assert code == 2 and "is inside the export folder" in out, out
    assert [p.name for p in export.iterdir()] == [".edentune-export"]
