"""`edentune cycle schedule`: the launchd agent, systemd user units and Task Scheduler XML parse
(and pass `systemd-analyze verify` where it exists); install/remove write and delete only their
files; `cycle status` shows the next run and the last scheduled run's outcome."""

from __future__ import annotations

import datetime as dt
import os
import plistlib
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edentune.cli import app
from edentune.cycle.schedule import TASK_NS, install, next_run, remove_schedule, schedule_for, scheduled_run, status_lines
from edentune.cycle.workspace import init_workspace

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[2] / "src")


def edentune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edentune.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "300"})


@pytest.fixture
def ws(tmp_path) -> Path:
    path = tmp_path / "my eden%ws"  # a space and a percent sign: both need quoting in systemd units
    init_workspace(path, model="embedded")
    return path


def printed(ws: Path, platform: str, *extra: str) -> dict[str, str]:
    res = runner.invoke(app, ["cycle", "schedule", str(ws), "--print", "--platform", platform, "--day", "15", "--at", "04:30",
                              "--db", "/data/eden data.db", *extra], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    files, name = {}, None
    for line in res.output.splitlines(keepends=True):
        if line.startswith("# ") and not line.startswith("# ", 1) and re.fullmatch(r"# \S+\n", line):
            name = line[2:].strip()
            files[name] = ""
        elif name:
            files[name] += line
    return files


def test_launchd_plist_parses(ws):
    (name, text), = printed(ws, "macos").items()
    plist = plistlib.loads(text.encode("utf-8"))
    assert name == f"{plist['Label']}.plist" and plist["Label"].startswith("io.edentune.cycle.my-eden-ws-")
    assert plist["ProgramArguments"] == [sys.executable, "-m", "edentune.cycle.schedule", str(ws.resolve()), "/data/eden data.db"]
    assert plist["StartCalendarInterval"] == {"Day": 15, "Hour": 4, "Minute": 30}
    assert plist["StandardOutPath"] == str(ws.resolve() / "schedule" / "cycle.log")


def test_systemd_units_verify(ws, tmp_path):
    files = printed(ws, "linux")
    service, timer = sorted(files)
    assert service.endswith(".service") and timer.endswith(".timer")
    assert "OnCalendar=*-*-15 04:30:00" in files[timer] and "Persistent=true" in files[timer]
    assert '"/data/eden data.db"' in files[service] and "%%ws" in files[service]
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name, text in files.items():
        (unit_dir / name).write_text(text, encoding="utf-8")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the units were only checked textually")
    res = subprocess.run([analyze, "verify", str(unit_dir / service), str(unit_dir / timer)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # What systemd will run: the arguments as the scheduler passes them.
    exec_line = next(line for line in files[service].splitlines() if line.startswith("ExecStart="))
    assert str(ws.resolve()).replace("%", "%%") in exec_line


def test_task_scheduler_xml_parses(ws):
    (name, text), = printed(ws, "windows").items()
    root = ET.fromstring(text.encode("utf-16"))
    ns = {"t": TASK_NS}
    assert root.tag == f"{{{TASK_NS}}}Task" and name.endswith(".xml")
    trigger = root.find("t:Triggers/t:CalendarTrigger", ns)
    assert trigger.find("t:ScheduleByMonth/t:DaysOfMonth/t:Day", ns).text == "15"
    assert len(trigger.find("t:ScheduleByMonth/t:Months", ns)) == 12
    assert trigger.find("t:StartBoundary", ns).text.endswith("T04:30:00")
    action = root.find("t:Actions/t:Exec", ns)
    assert action.find("t:Command", ns).text == sys.executable
    assert action.find("t:Arguments", ns).text == f'-m edentune.cycle.schedule "{ws.resolve()}" "/data/eden data.db"'
    assert root.find("t:Settings/t:StartWhenAvailable", ns).text == "true"


@pytest.mark.parametrize("args, message", [(["--day", "31"], "choose a day from 1 to 28"), (["--at", "25:00"], "not a time of day"),
                                           (["--platform", "beos"], "expected one of")])
def test_bad_schedule_is_one_line_error(ws, args, message):
    res = edentune("cycle", "schedule", str(ws), "--print", *args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_not_a_workspace(tmp_path):
    res = edentune("cycle", "schedule", str(tmp_path), "--print")
    assert res.returncode == 2 and "Traceback" not in res.stderr and str(tmp_path) in res.stderr, res.stderr


def test_next_run():
    assert next_run(1, "03:00", dt.datetime(2026, 1, 15, 12, 0)) == dt.datetime(2026, 2, 1, 3, 0)
    assert next_run(15, "03:00", dt.datetime(2026, 1, 15, 2, 59)) == dt.datetime(2026, 1, 15, 3, 0)
    assert next_run(1, "03:00", dt.datetime(2026, 12, 1, 3, 0)) == dt.datetime(2027, 1, 1, 3, 0)


def test_install_remove_and_status(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    s = schedule_for(ws, day=2, at="05:00", platform="linux")
    files = install(s, register=False)  # registering needs a running systemd user manager
    assert sorted(p.name for p in files) == sorted([f"{s.name}.service", f"{s.name}.timer"])
    assert all(p.parent == tmp_path / "config" / "systemd" / "user" and p.is_file() for p in files)
    res = runner.invoke(app, ["cycle", "status", str(ws)])
    assert res.exit_code == 0 and f"schedule: next run {next_run(2, '05:00'):%Y-%m-%d %H:%M}" in res.output, res.output
    assert remove_schedule(ws, register=False) == files and not any(p.exists() for p in files)
    assert status_lines(ws) == []


def test_scheduled_run_logs_the_outcome(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    missing = tmp_path / "no-such" / "data.db"
    code = scheduled_run(ws, str(missing))
    assert code == 2
    log = (ws / "schedule" / "cycle.log").read_text(encoding="utf-8")
    assert "--from-eden" in log and "no such database file" in log and "exit 2" in log
    assert re.search(r"last scheduled run: \S+ failed \(exit 2\)", "\n".join(status_lines(ws)))
