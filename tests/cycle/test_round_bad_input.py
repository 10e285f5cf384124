"""Bad input stops a round before anything happens: a clear error, no round in the registry, the
live model in Ollama untouched. (A full disk during export is in test_round_resume.py, where a
round reaches the export.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edentune.cycle.round import run_round
from edentune.errors import ConfigError, DataError, EdentuneError
from edentune.registry import Registry


@pytest.fixture
def workspace(make_workspace, standin_factory, tmp_path):
    server = standin_factory()
    server.models["eden:latest"] = {"from": "smollm2:135m", "system": "the live model"}
    return make_workspace(tmp_path / "ws", server.host), server


def nothing_happened(ws, server) -> None:
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert reg.rounds() == [] and reg.events() == [] and reg.live_rows() == []
    assert not list((ws / "rounds").iterdir())
    assert server.models["eden:latest"]["system"] == "the live model"
    assert not [r for r in server.requests if r[0] == "POST" and r[1] != "/api/show"]


def test_config_with_errors(workspace, cycle_files):
    ws, server = workspace
    data = yaml.safe_load((ws / "cycle.yaml").read_text(encoding="utf-8"))
    data["run"]["training"]["learning_rate"] = "fast"
    data["replay"]["new_ratoi"] = 0.5
    (ws / "cycle.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        run_round(ws, [cycle_files["month1"]])
    message = str(err.value)
    assert "run.training.learning_rate" in message and "replay.new_ratoi: unknown key" in message
    nothing_happened(ws, server)


def test_new_file_that_is_all_garbage(workspace, tmp_path):
    ws, server = workspace
    garbage = tmp_path / "export.jsonl"
    garbage.write_bytes(b"not json\n{\"messages\": 3}\n[1, 2]\n{\"text\": \"no conversation\"}\n")
    with pytest.raises(DataError, match=r"no usable conversation in 4 line\(s\)") as err:
        run_round(ws, [garbage])
    assert "nothing was started" in str(err.value)
    binary = tmp_path / "dump.jsonl"
    binary.write_bytes(b"\x00\x01\x02 a binary file\n")
    with pytest.raises(DataError, match="binary data"):
        run_round(ws, [binary])
    with pytest.raises(DataError, match="no such file"):
        run_round(ws, [tmp_path / "missing.jsonl"])
    nothing_happened(ws, server)


def test_feedback_that_gives_nothing_to_learn_stops_before_the_sft_step(workspace, cycle_files, tmp_path):
    """`--feedback garbage.bin` used to train the whole SFT step and only then fail at the
    preference step: every input is checked before the first expensive step."""
    import json

    ws, server = workspace
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(1, 256)) * 4)  # no NUL byte: read as lines, none of them a rating
    with pytest.raises(DataError, match=r"garbage.bin: no usable rating in 5 line\(s\): invalid JSON \(1\), invalid UTF-8 \(4\)"):
        run_round(ws, [cycle_files["month1"]], feedback=garbage)
    res = subprocess.run([sys.executable, "-m", "edentune.cli", "cycle", "run", str(ws), "--new", str(cycle_files["month1"]),
                          "--feedback", str(garbage)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "COLUMNS": "200"})
    assert res.returncode == 2 and "garbage.bin: no usable rating" in res.stderr and "Traceback" not in res.stderr, res.stderr
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="garbage.bin is binary data"):
        run_round(ws, [cycle_files["month1"]], feedback=garbage)
    text = tmp_path / "notes.txt"
    text.write_text("not json\n{\"messages\": 3}\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes.txt: no usable rating in 3 line\(s\)") as err:
        run_round(ws, [cycle_files["month1"]], feedback=text)
    assert "nothing was started" in str(err.value)
    liked = tmp_path / "liked.jsonl"
    liked.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                                         "rating": "up"}) + "\n" for i in range(4)), encoding="utf-8")
    with pytest.raises(DataError, match=r"only thumbs-up ratings \(4\): KTO learns from the contrast"):
        run_round(ws, [cycle_files["month1"]], feedback=liked)
    nothing_happened(ws, server)
    assert server.requests == []  # refused before the Ollama preflight, too


def test_ollama_down(make_workspace, standin_factory, cycle_files, tmp_path):
    from ollama_standin import OllamaStandIn

    with OllamaStandIn() as gone:
        host = gone.host  # the port is closed after the block
    ws = make_workspace(tmp_path / "ws", host)
    with pytest.raises(EdentuneError, match=f"cannot reach Ollama at {host}") as err:
        run_round(ws, [cycle_files["month1"]])
    assert "ollama serve" in str(err.value)
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert reg.rounds() == [] and reg.live_rows() == []


def test_base_not_pulled(workspace, cycle_files):
    ws, server = workspace
    del server.models["smollm2:135m"]
    with pytest.raises(EdentuneError, match="base model 'smollm2:135m' is not in Ollama") as err:
        run_round(ws, [cycle_files["month1"]])
    assert "ollama pull smollm2:135m" in str(err.value)
    nothing_happened(ws, server)
