"""`edentune cycle init/run/status/rollback` through the real command line: arguments reach the
API, tables/JSON/HTML come out, user mistakes are one-line errors that change nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import month_records, write_jsonl  # tests/cycle/conftest.py: at import, while it is the `conftest` module
from typer.testing import CliRunner

from edentune.cli import app
from edentune.cycle.workspace import load_workspace

SRC = str(Path(__file__).resolve().parents[2] / "src")
runner = CliRunner()


def edentune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edentune.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200"})


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_init_with_personas(tmp_path):
    res = runner.invoke(app, ["cycle", "init", str(tmp_path / "ws"), "--model", "embedded",
                              "--persona", "professional=eden-pro", "--persona", "friendly"])
    assert res.exit_code == 0, res.output
    assert "eden-pro" in res.output and "eden-friendly" in res.output
    ws = load_workspace(tmp_path / "ws")
    assert ws.persona_names == ["professional", "friendly"] and ws.ollama_model("professional") == "eden-pro"
    assert ws.config.run.preset == "embedded"


def test_init_embedded_takes_the_quickstart_recipe_and_host(tmp_path):
    from edentune.config import config_for_model
    from edentune.presets import quickstart_recipe

    res = runner.invoke(app, ["cycle", "init", str(tmp_path / "ws"), "--model", "embedded", "--host", "http://10.0.0.7:11434"])
    assert res.exit_code == 0, res.output
    run = load_workspace(tmp_path / "ws").config
    assert run.ollama.host == "http://10.0.0.7:11434"
    quick = config_for_model("embedded").updated(quickstart_recipe())  # what `edentune quickstart` starts from
    for section in ("model", "training", "lora", "quantization"):
        ours, theirs = getattr(run.run, section).model_dump(), getattr(quick, section).model_dump()
        ours.pop("output_dir", None), theirs.pop("output_dir", None)
        assert ours == theirs, section
    assert run.run.model.max_seq_len == 384 != config_for_model("embedded").model.max_seq_len
    res = runner.invoke(app, ["cycle", "init", str(tmp_path / "ws2"), "--host", "http://bad host"])
    assert res.exit_code != 0 and not (tmp_path / "ws2").exists()


def test_version():
    from importlib.metadata import version

    res = edentune("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"edentune {version('edentune')}"


@pytest.mark.parametrize("args, message", [
    (["--persona", "=x"], "expected NAME or NAME=OLLAMA_MODEL"),
    (["--persona", "a", "--persona", "a=b"], "given twice"),
    (["--persona", "Bad Name"], "personas.0.name"),
])
def test_init_bad_personas_are_one_line_errors(tmp_path, args, message):
    res = edentune("cycle", "init", str(tmp_path / "ws"), *args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "ws").exists()


def test_init_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    res = edentune("cycle", "init", str(tmp_path), "--force")
    assert res.returncode == 2 and "not empty and is not a cycle workspace" in res.stderr and "Traceback" not in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.fixture
def ws(tmp_path):
    res = runner.invoke(app, ["cycle", "init", str(tmp_path / "ws"), "--model", "embedded"])
    assert res.exit_code == 0, res.output
    ws = load_workspace(tmp_path / "ws")
    with ws.open_registry() as reg:
        reg.begin_round("2026-01", {})
        reg.set_run("2026-01", "default", status="accepted", metrics={"val_loss": 1.8765, "korean_consistency": 0.9})
        reg.set_live("default", "2026-01", "eden:latest")
        reg.finish_round("2026-01", "accepted")
        reg.begin_round("2026-02", {})
        reg.set_run("2026-02", "default", status="refused", metrics={"val_loss": 2.5}, reasons=["val loss [worse] 2.5 > 1.8765"])
        reg.finish_round("2026-02", "refused")
    return ws


def test_status_table_json_and_html(ws, tmp_path):
    res = edentune("cycle", "status", str(ws.dir), "--html", str(tmp_path / "report.html"))
    assert res.returncode == 0, res.stderr
    assert "2026-01" in res.stdout and "1.8765" in res.stdout and "90.0%" in res.stdout and "●" in res.stdout
    assert "refused: val loss [worse] 2.5 > 1.8765" in res.stdout  # reasons are text, not Rich markup
    assert "live: default -> round 2026-01 (eden:latest" in res.stdout
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()

    res = runner.invoke(app, ["cycle", "status", str(ws.dir), "--json"])
    data = json.loads(res.stdout)
    assert [(r["round_id"], r["status"]) for r in data["rows"]] == [("2026-01", "accepted"), ("2026-02", "refused")]
    assert data["live"]["default"]["round_id"] == "2026-01"


def test_bad_workspace_config_is_a_clear_error_and_changes_nothing(ws, tmp_path):
    ws.config_path.write_text(ws.config_path.read_text().replace("adapter_mode: per_persona", "adapter_mode: several"))
    new = tmp_path / "new.jsonl"
    new.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    before = snapshot(ws.dir)
    for args in (["run", str(ws.dir), "--new", str(new)], ["rollback", str(ws.dir), "--to", "2026-01"]):
        res = edentune("cycle", *args)
        assert res.returncode == 2 and "adapter_mode: got 'several'" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert snapshot(ws.dir) == before
    assert "2026-01" in edentune("cycle", "status", str(ws.dir)).stdout  # status reads the registry only


def test_rollback_errors_change_nothing(ws):
    before = snapshot(ws.dir)
    res = edentune("cycle", "rollback", str(ws.dir), "--to", "2026-02", "--host", "http://127.0.0.1:9")
    assert res.returncode == 2 and "was refused" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = edentune("cycle", "rollback", str(ws.dir), "--host", "http://127.0.0.1:9")
    assert res.returncode == 2 and "no accepted round before 2026-01" in res.stderr, res.stderr
    assert snapshot(ws.dir) == before


def test_run_passes_its_arguments_and_prints_the_round(ws, tmp_path, monkeypatch):
    import edentune.cycle.round as round_mod

    calls = []

    def fake_run_round(ws_dir, new_files, *, feedback=None, round_id=None, console=None, host=None, deploy=True):
        calls.append((Path(ws_dir), [Path(f) for f in new_files], feedback, round_id, host, deploy))
        return SimpleNamespace(round_id="2026-02", status="refused")

    monkeypatch.setattr(round_mod, "run_round", fake_run_round)
    res = runner.invoke(app, ["cycle", "run", str(ws.dir), "--new", "a.jsonl", "--new", "b.jsonl",
                              "--feedback", "r.jsonl", "--round", "2026-02", "--host", "http://10.0.0.2:11434"])
    assert res.exit_code == 0, res.output
    assert calls == [(ws.dir, [Path("a.jsonl"), Path("b.jsonl")], [Path("r.jsonl")], "2026-02", "http://10.0.0.2:11434", True)]
    assert "round 2026-02: refused" in res.stdout and "2026-01" not in res.stdout


def test_run_preflight_against_a_trickling_ollama_ends_at_the_deadline(tmp_path, trickle_server):
    """Ollama's headers at once, then one byte every 0.25 s: the preflight ends at
    export.ollama_deadline_s with a message naming it; nothing in the workspace changes."""
    from edentune.cycle.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws", model="embedded")
    text = ws.config_path.read_text(encoding="utf-8")
    assert text.count("ollama_deadline_s: 60.0\n") == 1 and text.count("\nollama:\n  host: null\n") == 1
    text = text.replace("ollama_deadline_s: 60.0\n", "ollama_deadline_s: 1.5\n")
    ws.config_path.write_text(text.replace("\nollama:\n  host: null\n", f"\nollama:\n  host: {trickle_server.url}\n"), encoding="utf-8")
    new = write_jsonl(tmp_path / "new.jsonl", month_records(1))
    before = snapshot(ws.dir)
    res = edentune("cycle", "run", str(ws.dir), "--new", str(new))
    message = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "did not finish GET /api/version within the deadline of 1.5 s" in message and "nothing was started" in message
    assert snapshot(ws.dir) == before


@pytest.mark.parametrize("model", ["../../etc/x", "$(id)", "eden pro", "a/b/c/d", "ns.x/eden", ":latest", "eden:" + "t" * 72])
def test_init_refuses_names_ollama_would_refuse(tmp_path, model):
    res = edentune("cycle", "init", str(tmp_path / "ws"), "--model", "embedded", "--persona", f"pro={model}")
    message = " ".join(res.stderr.split())
    assert res.returncode == 2 and "personas.0.ollama_model" in message and "Traceback" not in res.stderr, res.stderr
    assert repr(model) in message
    assert not (tmp_path / "ws").exists()


def test_names_in_a_config_are_checked_against_ollamas_rules(tmp_path):
    import yaml

    from edentune.config import load_config
    from edentune.errors import ConfigError
    from edentune.cycle.workspace import init_workspace

    for key, value in (("model_name", "$(id)"), ("ollama_base", "../../etc/x"), ("personas", {"eden/../x": "hi"})):
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({"export": {key: value}}))
        with pytest.raises(ConfigError, match=rf"export.{key}: .*not valid for Ollama|export.{key}: .*at most host"):
            load_config(path)
    for ok in ("eden", "eden-pro:v2", "hf.co/bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M", "localhost:5000/team/eden:latest"):
        path = tmp_path / "ok.yaml"
        path.write_text(yaml.safe_dump({"export": {"model_name": ok, "ollama_base": ok}}))
        assert load_config(path).export.model_name == ok
    ws = init_workspace(tmp_path / "ws", model="embedded")
    text = ws.config_path.read_text(encoding="utf-8")
    ws.config_path.write_text(text.replace("ollama:\n  host: null\n  base: null", "ollama:\n  host: null\n  base: $(id)"))
    with pytest.raises(ConfigError, match=r"ollama.base: '\$\(id\)': its model"):
        load_workspace(ws.dir)


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    """A log file (cron, `2> log`) would get one redrawn weight-loading bar line per tick."""
    from edentune.cli import main

    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["edentune", "--version"])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None) and capsys.readouterr().out.startswith("edentune ")
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
