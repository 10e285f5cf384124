"""One round per workspace: a second writer is refused while a real `cycle run` holds the lock,
`cycle status` reads beside it, a lock left by a SIGKILLed run is taken over, and rounds left
`running` are never filed over with a new month."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edentune.cycle.lock import LOCK_NAME, read_holder, workspace_lock
from edentune.cycle.round import run_round
from edentune.errors import EdentuneError
from edentune.registry import SHARED, Registry

SRC = str(Path(__file__).resolve().parents[2] / "src")


def edentune(*args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "edentune", *args]
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def snapshot(folder: Path) -> dict:
    """Every workspace file but the lock file (which only the holder writes)."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != LOCK_NAME}


def holder_pid(ws: Path) -> int | None:
    holder = read_holder(ws)
    return holder.get("pid") if holder else None


def test_a_second_writer_is_refused_status_reads_and_a_killed_holder_is_taken_over(make_workspace, cycle_files, tmp_path):
    silent = socket.socket()  # the kernel accepts, nobody answers: the first run waits in its Ollama preflight
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    host = f"http://127.0.0.1:{silent.getsockname()[1]}"
    ws = make_workspace(tmp_path / "ws", host, **{"run.export.ollama_timeout_s": 300})
    month = str(cycle_files["month1"])
    first = edentune("cycle", "run", str(ws), "--new", month, wait=False)
    try:
        deadline = time.monotonic() + 120
        while holder_pid(ws) != first.pid:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        before = snapshot(ws)

        for args in (["cycle", "run", str(ws), "--new", str(cycle_files["month2"])],
                     ["cycle", "rollback", str(ws), "--to", "2026-01"],
                     ["cycle", "init", str(ws), "--model", "embedded", "--force"]):
            second = edentune(*args)
            assert second.returncode != 0, second.stdout
            message = " ".join(second.stderr.split())
            assert f"is in use by `cycle run` (PID {first.pid}, started" in message, second.stderr
            assert "Traceback" not in second.stderr
        assert snapshot(ws) == before  # the refused commands changed nothing

        status = edentune("cycle", "status", str(ws), "--json")  # reads without the lock
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["rows"] == []
        assert first.poll() is None  # still holding it
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
        silent.close()

    assert holder_pid(ws) == first.pid  # the SIGKILLed holder's record is still in the file
    third = edentune("cycle", "run", str(ws), "--new", month)  # the lock is taken over; the port is closed now
    assert third.returncode != 0 and f"cannot reach Ollama at {host}" in third.stderr, third.stderr
    assert "in use by" not in third.stderr
    assert not (ws / LOCK_NAME).exists()  # released on exit: the file is gone too
    with workspace_lock(ws, "test"):  # and free
        assert holder_pid(ws) == os.getpid()


def test_the_lock_is_released_when_the_command_fails(make_workspace, tmp_path):
    ws = make_workspace(tmp_path / "ws", "http://127.0.0.1:9")
    with pytest.raises(EdentuneError, match="no such file"):
        run_round(ws, [tmp_path / "missing.jsonl"])
    with workspace_lock(ws, "cycle run"):
        with pytest.raises(EdentuneError, match=rf"in use by `cycle run` \(PID {os.getpid()}"):
            run_round(ws, [tmp_path / "missing.jsonl"])
    assert not (ws / LOCK_NAME).exists()


def test_unfinished_rounds_are_named_never_filed_over(make_workspace, standin_factory, cycle_files, tmp_path):
    server = standin_factory()
    ws = make_workspace(tmp_path / "ws", server.host)
    with Registry(ws / "registry.sqlite") as reg:  # a run killed after ingesting month 1
        reg.begin_round("2026-01", {})
        reg.record_step("2026-01", SHARED, "ingest", inputs_sha256="0" * 64, outputs={},
                        detail={"files": [str(cycle_files["month1"])]})
    before = snapshot(ws)
    with pytest.raises(EdentuneError, match=r"unfinished round 2026-01 \(started .*new data: .*month1.jsonl\)") as err:
        run_round(ws, [cycle_files["month2"]])
    assert "--round 2026-01" in str(err.value) and "--round NEW_ID" in str(err.value)
    assert snapshot(ws) == before

    with Registry(ws / "registry.sqlite") as reg:  # and a second one, left by a run beside it
        reg.begin_round("2026-01.2", {})
    res = edentune("cycle", "run", str(ws), "--new", str(cycle_files["month1"]))
    assert res.returncode != 0 and "unfinished rounds 2026-01 " in res.stderr and "more than one round is unfinished" in res.stderr
    assert "Traceback" not in res.stderr
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        assert [(r.id, r.status) for r in reg.rounds()] == [("2026-01", "running"), ("2026-01.2", "running")]
