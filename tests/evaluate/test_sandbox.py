"""Planted malicious snippets are stopped, and the machine is not hurt.

The fork bomb is linear (only the parent forks; children sleep), so even if every layer failed it
could not grow exponentially, and the wall timeout kills its whole process group.
"""

import os

import pytest

from edentune.evaluate.sandbox import Limits, run_python

FAST = Limits(cpu_seconds=2, wall_seconds=3, memory_bytes=512 << 20)


def test_ordinary_code_passes_and_can_use_its_own_dir():
    r = run_python("open('out.txt', 'w').write('ok')\nprint(open('out.txt').read())", FAST)
    assert (r.status, r.stdout) == ("pass", "ok\n")


def test_write_outside_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('pwned')", FAST)
    assert r.status == "blocked" and "outside the sandbox" in r.error
    assert not target.exists()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    assert run_python(f"import os; os.remove({str(victim)!r})", FAST).status == "blocked"
    assert victim.exists()


def test_socket_is_blocked():
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)", FAST)
    assert r.status == "blocked" and "socket" in r.error


def test_fork_bomb_is_blocked_and_leaves_nothing_behind():
    before = len(os.listdir("/proc"))
    bomb = "import os, time\nwhile True:\n    if os.fork() == 0:\n        time.sleep(600)\n"
    r = run_python(bomb, FAST)
    assert r.status == "blocked" and "os.fork" in r.error
    assert len(os.listdir("/proc")) < before + 20


def test_caught_violation_still_reported():
    r = run_python("import os\ntry:\n    os.system('id')\nexcept Exception:\n    pass\nprint('fine')", FAST)
    assert r.status == "blocked"


@pytest.mark.parametrize("code", ["import subprocess\nsubprocess.run(['true'])", "import os\nos.execv('/bin/true', ['true'])"])
def test_process_creation_is_blocked(code):
    assert run_python(code, FAST).status == "blocked"


def test_huge_allocation_is_stopped():
    r = run_python("x = bytearray(10 * 1024 ** 3)", FAST)
    assert r.status == "blocked" and "MemoryError" in r.error


def test_sleep_forever_times_out():
    r = run_python("import time\ntime.sleep(10 ** 6)", Limits(wall_seconds=1.5))
    assert r.status == "timeout" and r.seconds < 5


def test_busy_loop_hits_cpu_limit():
    assert run_python("while True: pass", Limits(cpu_seconds=1, wall_seconds=5)).status == "timeout"


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    r = run_python("import os; print(os.environ.get('HF_TOKEN'))", FAST)
    assert r.stdout.strip() == "None"


def test_runtime_error_is_a_failure():
    r = run_python("raise ValueError('boom')", FAST)
    assert r.status == "fail" and "ValueError: boom" in r.error
