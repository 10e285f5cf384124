"""A round killed with SIGKILL at three different steps, then a full disk during export: each rerun
continues where it stopped, nothing finished is redone, and the round ends with the result of the
uninterrupted round 1 of the months test (same data, same config): the same adapter, bit for bit,
the same verdicts and metrics."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from edentune.cycle.round import run_round
from edentune.errors import EdentuneError
from edentune.io import file_sha256
from edentune.registry import Registry

SRC = Path(__file__).resolve().parents[2] / "src"
# The child process checks export parity on one probe, like the in-process rounds (conftest.one_parity_probe).
RUN = ("import sys; from edentune.export import parity; parity.PROBE_CONVERSATIONS = [parity.PROBE_CONVERSATIONS[2]]; "
       "from edentune.cycle.round import run_round; run_round(sys.argv[1], [sys.argv[2]], round_id='2026-01')")


def finished_steps(ws: Path) -> dict[tuple[str, str], str]:
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        return {(s.persona, s.step): s.record.finished for s in reg.list_steps("2026-01")}


def run_until_killed(ws: Path, month: Path, log: Path, ready) -> None:
    """Run the round in a child process and SIGKILL it as soon as `ready()` is true."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", RUN, str(ws), str(month)], stdout=out, stderr=out, env=env)
    try:
        deadline = time.time() + 900
        while not ready():
            assert proc.poll() is None, f"the round ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def recorded(ws: Path, step: str, persona: str = "default"):
    def ready() -> bool:
        if not (ws / "registry.sqlite").exists():
            return False
        try:
            return (persona, step) in finished_steps(ws)
        except EdentuneError:  # the registry is being created
            return False
    return ready


def test_killed_three_times_and_disk_full_then_same_result(first_round, make_workspace, cycle_files, standin_factory,
                                                            tmp_path, monkeypatch, short_parity):
    server = standin_factory()
    ws = make_workspace(tmp_path / "ws", server.host)
    month, log = cycle_files["month1"], tmp_path / "round.log"
    run_dir = ws / "rounds" / "2026-01" / "default" / "run"

    history = []
    # 1. right after cleaning; 2. in the middle of training (a checkpoint exists); 3. during export.
    for ready in (recorded(ws, "clean", "shared"), lambda: (run_dir / "checkpoint-2" / "trainer_state.json").exists(),
                  recorded(ws, "gate")):
        run_until_killed(ws, month, log, ready)
        history.append(finished_steps(ws))
    assert ("shared", "clean") in history[0] and ("default", "sft") not in history[1]
    assert ("default", "gate") in history[2] and ("default", "export") not in history[2]
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert reg.round("2026-01").status == "running" and reg.live("default") is None

    # 4. the disk fills up while the adapter GGUF is written: a clear error, nothing deployed
    from edentune.export import adapter_gguf

    real_write = adapter_gguf.write_adapter_gguf

    def disk_full(adapter, path, dtype):
        Path(path).write_bytes(b"GGUF partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(adapter_gguf, "write_adapter_gguf", disk_full)
    with pytest.raises(EdentuneError, match="disk is full") as err:
        run_round(ws, [month])
    assert "continues at the step that failed" in str(err.value)
    assert not (ws / "rounds" / "2026-01" / "default" / "export").exists()
    assert not list((ws / "rounds" / "2026-01" / "default").glob(".export.*"))  # no half export left behind
    assert "eden:latest" not in server.models and not [r for r in server.requests if r[1] == "/api/create"]
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert reg.live("default") is None and reg.step("2026-01", "default", "export") is None
        assert not [e for e in reg.events() if e.kind == "deploy"]
        assert reg.run("2026-01", "default").status == "failed"
    history.append(finished_steps(ws))
    monkeypatch.setattr(adapter_gguf, "write_adapter_gguf", real_write)

    # 5. the rerun finishes the round
    result = run_round(ws, [month])  # no --round: the unfinished round is continued
    final = finished_steps(ws)
    for before in history:  # nothing that had finished was done again
        assert {k: final[k] for k in before} == before

    # training resumed from its checkpoint instead of starting over
    starts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert [Path(s["resume_from"]).name if s["resume_from"] else None for s in starts][-1] == "checkpoint-2"

    # the same result as the uninterrupted round
    ref, unit = first_round["result"].units[0], result.units[0]
    assert result.round_id == "2026-01" and result.status == "accepted" == first_round["result"].status
    resumed_w = load_file(ws / "rounds" / "2026-01" / "default" / "run" / "adapter" / "adapter_model.safetensors")
    ref_w = load_file(first_round["ws"] / "rounds" / "2026-01" / "default" / "run" / "adapter" / "adapter_model.safetensors")
    assert resumed_w.keys() == ref_w.keys()
    # bit-identical, although training was killed after checkpoint-2 and resumed from it
    assert unit.adapter_sha256 == ref.adapter_sha256
    assert all(resumed_w[k].equal(ref_w[k]) for k in ref_w)
    gate = json.loads((ws / "rounds" / "2026-01" / "default" / "eval" / "gate.json").read_text(encoding="utf-8"))
    assert gate["ship"] == first_round["gate"]["ship"] and gate["verdicts"] == first_round["gate"]["verdicts"]
    assert gate["metrics"] == first_round["gate"]["metrics"]
    assert server.models["eden:latest"]["adapters"] == {"adapter.gguf": "sha256:" + file_sha256(
        ws / "rounds" / "2026-01" / "default" / "export" / "adapter.gguf")}
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert reg.round("2026-01").status == "accepted" and reg.live("default").round_id == "2026-01"
        assert reg.run("2026-01", "default").status == "accepted"
        assert [e.kind for e in reg.events() if e.kind in ("deploy", "rollback")] == ["deploy"]
        steps = [s.step for s in reg.list_steps("2026-01")]
        assert steps == ["ingest", "clean", "fixed", "replay", "select", "mix", "sft", "evaluate", "gate", "export", "deploy", "live"]
