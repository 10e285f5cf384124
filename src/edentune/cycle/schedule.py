"""`edentune cycle schedule WS`: run the round every month by itself, with the OS's own scheduler.

    macOS    a launchd agent   ~/Library/LaunchAgents/<name>.plist  (launchctl bootstrap gui/<uid>)
    Linux    a systemd user timer + service  ~/.config/systemd/user/<name>.{timer,service}
    Windows  a Task Scheduler task  (schtasks /Create /XML)

Each runs `python -m edentune.cycle.schedule WS [DB]` on day N of every month at HH:MM (local
time; day 1-28 so that every month has it; a run missed while the computer was off starts at the
next boot/login where the scheduler supports it: launchd and systemd `Persistent=`, Task
Scheduler `StartWhenAvailable`). That runner is `edentune cycle run WS --from-eden [DB]` in a
child process, its output appended to `WS/schedule/cycle.log`, and the outcome (exit code,
round) written to `WS/schedule/last.json`, which `cycle status` shows with the next run time.

Why generated text and not a library: each scheduler's file format is small and documented
(launchd.plist(5) written with `plistlib`, systemd.timer(5)/systemd.service(5), the Task
Scheduler schema written with xml.etree); no Python library installs all three.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import plistlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import EdentuneError
from ..io import write_json_atomic, write_text_atomic

SCHEDULE_DIR = "schedule"
LOG_NAME, LAST_NAME, INFO_NAME = "cycle.log", "last.json", "schedule.json"
PLATFORMS = ("macos", "linux", "windows")
COMMAND_TIMEOUT_S = 60  # launchctl / systemctl / schtasks calls: local, but never wait forever
TASK_NS = "http://schemas.microsoft.com/windows/2004/02/mit/task"


def current_platform() -> str:
    return "macos" if sys.platform == "darwin" else "windows" if sys.platform.startswith("win") else "linux"


def parse_at(at: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", at.strip())
    if not m or int(m[1]) > 23 or int(m[2]) > 59:
        raise EdentuneError(f"--at {at!r} is not a time of day", hint="write HH:MM in 24-hour time, e.g. --at 03:30")
    return int(m[1]), int(m[2])


def check_day(day: int) -> int:
    if not 1 <= day <= 28:
        raise EdentuneError(f"--day {day}: choose a day from 1 to 28", hint="every month has days 1-28; --day 1 runs on the first")
    return day


def next_run(day: int, at: str, now: dt.datetime | None = None) -> dt.datetime:
    """The next local time the schedule fires: day `day` of this month at `at`, else next month's."""
    hour, minute = parse_at(at)
    now = now or dt.datetime.now()
    candidate = now.replace(day=day, hour=hour, minute=minute, second=0, microsecond=0)
    if candidate <= now:
        year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        candidate = candidate.replace(year=year, month=month)
    return candidate


@dataclass
class Schedule:
    workspace: Path
    day: int
    at: str
    platform: str
    db: str | None  # the app's database; None: its default path on this OS
    python: str
    name: str

    @property
    def folder(self) -> Path:
        return self.workspace / SCHEDULE_DIR

    @property
    def log(self) -> Path:
        return self.folder / LOG_NAME

    def argv(self) -> list[str]:
        return [self.python, "-m", "edentune.cycle.schedule", str(self.workspace), *([self.db] if self.db else [])]


def schedule_for(ws_dir: str | Path, *, day: int = 1, at: str = "03:00", platform: str | None = None,
                 db: str | Path | None = None, python: str | None = None) -> Schedule:
    from .workspace import load_workspace

    ws = load_workspace(ws_dir)  # a folder that is not a workspace is refused here
    platform = platform or current_platform()
    if platform not in PLATFORMS:
        raise EdentuneError(f"--platform {platform!r}: expected one of {', '.join(PLATFORMS)}")
    check_day(day)
    parse_at(at)
    # One entry per workspace: its folder name (readable) plus a hash of its path (unique).
    slug = re.sub(r"[^a-z0-9-]+", "-", ws.dir.name.lower()).strip("-")[:40] or "ws"
    name = f"edentune-cycle-{slug}-{hashlib.sha256(str(ws.dir).encode()).hexdigest()[:8]}"
    return Schedule(ws.dir, day, at, platform, str(Path(db).expanduser().resolve()) if db else None,
                    python or sys.executable, name)


# -- the three formats -----------------------------------------------------------------------
def launchd_plist(s: Schedule) -> str:
    hour, minute = parse_at(s.at)
    plist = {"Label": s.name.replace("edentune-cycle-", "io.edentune.cycle."), "ProgramArguments": s.argv(),
             "StartCalendarInterval": {"Day": s.day, "Hour": hour, "Minute": minute},
             "StandardOutPath": str(s.log), "StandardErrorPath": str(s.log),
             "WorkingDirectory": str(s.workspace), "RunAtLoad": False, "ProcessType": "Background"}
    return plistlib.dumps(plist, sort_keys=False).decode("utf-8")


def _systemd_quote(arg: str) -> str:
    # systemd.service(5) "Command lines": double quotes group words, backslash escapes, and "%"
    # starts a specifier, written "%%" for a literal percent sign.
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"' if re.search(r'[\s"\'\\;$]', arg) or not arg else escaped


def systemd_units(s: Schedule) -> dict[str, str]:
    hour, minute = parse_at(s.at)
    ws = str(s.workspace).replace("%", "%%")
    service = (f"[Unit]\nDescription=edentune monthly cycle round for {ws}\n\n"
               "[Service]\nType=oneshot\n"
               f"ExecStart={' '.join(_systemd_quote(a) for a in s.argv())}\n"
               f"WorkingDirectory={ws}\n"  # a path setting: the rest of the line, no quotes
               "Nice=10\n")
    timer = (f"[Unit]\nDescription=Run the edentune cycle round for {ws} on day {s.day} of every month\n\n"
             f"[Timer]\nOnCalendar=*-*-{s.day:02d} {hour:02d}:{minute:02d}:00\nPersistent=true\n"
             f"Unit={s.name}.service\n\n[Install]\nWantedBy=timers.target\n")
    return {f"{s.name}.service": service, f"{s.name}.timer": timer}


def _quote_windows(arg: str) -> str:
    # CommandLineToArgvW rules: quote when needed; backslashes before a quote are doubled.
    if arg and not re.search(r'[\s"]', arg):
        return arg
    return '"' + re.sub(r'(\\*)"', r'\1\1\\"', re.sub(r"(\\+)$", r"\1\1", arg)) + '"'


def task_xml(s: Schedule, start: dt.datetime | None = None) -> str:
    hour, minute = parse_at(s.at)
    start = (start or dt.datetime.now()).replace(hour=hour, minute=minute, second=0, microsecond=0)
    ET.register_namespace("", TASK_NS)

    def el(parent, tag, text=None, **attrib):
        node = ET.SubElement(parent, f"{{{TASK_NS}}}{tag}", attrib)
        if text is not None:
            node.text = str(text)
        return node

    task = ET.Element(f"{{{TASK_NS}}}Task", {"version": "1.2"})
    info = el(task, "RegistrationInfo")
    el(info, "Description", f"edentune monthly cycle round for {s.workspace}")
    trigger = el(el(task, "Triggers"), "CalendarTrigger")
    el(trigger, "StartBoundary", start.isoformat(timespec="seconds"))
    el(trigger, "Enabled", "true")
    by_month = el(trigger, "ScheduleByMonth")
    el(el(by_month, "DaysOfMonth"), "Day", s.day)
    months = el(by_month, "Months")
    for month in ("January", "February", "March", "April", "May", "June", "July", "August", "September",
                  "October", "November", "December"):
        el(months, month)
    principal = el(el(task, "Principals"), "Principal", id="Author")
    el(principal, "LogonType", "InteractiveToken")
    el(principal, "RunLevel", "LeastPrivilege")
    settings = el(task, "Settings")
    for tag, value in (("MultipleInstancesPolicy", "IgnoreNew"), ("DisallowStartIfOnBatteries", "false"),
                       ("StopIfGoingOnBatteries", "false"), ("StartWhenAvailable", "true"),
                       ("ExecutionTimeLimit", "PT0S"), ("Enabled", "true")):
        el(settings, tag, value)
    action = el(el(task, "Actions", Context="Author"), "Exec")
    argv = s.argv()
    el(action, "Command", argv[0])
    el(action, "Arguments", " ".join(_quote_windows(a) for a in argv[1:]))
    el(action, "WorkingDirectory", str(s.workspace))
    ET.indent(task)
    return '<?xml version="1.0" encoding="UTF-16"?>\n' + ET.tostring(task, encoding="unicode") + "\n"


def render(s: Schedule) -> dict[str, str]:
    """File name -> content, as installed."""
    if s.platform == "macos":
        return {f"{s.name.replace('edentune-cycle-', 'io.edentune.cycle.')}.plist": launchd_plist(s)}
    if s.platform == "linux":
        return systemd_units(s)
    return {f"{s.name}.xml": task_xml(s)}


def install_dir(platform: str, home: Path | None = None) -> Path:
    home = home or Path.home()
    if platform == "macos":
        return home / "Library" / "LaunchAgents"
    if platform == "linux":
        base = os.environ.get("XDG_CONFIG_HOME", "")
        return (Path(base) if base.startswith("/") else home / ".config") / "systemd" / "user"
    return Path()  # Windows: the task lives in Task Scheduler; the XML stays in WS/schedule/


def _run(cmd: list[str]) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise EdentuneError(f"{cmd[0]} not found: cannot register the schedule",
                            hint="use `edentune cycle schedule WS --print` and install the file by hand") from None
    except subprocess.TimeoutExpired:
        raise EdentuneError(f"`{' '.join(cmd)}` did not finish in {COMMAND_TIMEOUT_S}s") from None
    if res.returncode != 0:
        raise EdentuneError(f"`{' '.join(cmd)}` failed: {(res.stderr or res.stdout).strip().splitlines()[-1:] or res.returncode}",
                            hint="use `edentune cycle schedule WS --print` and install the file by hand")


def _commands(s: Schedule, files: dict[str, Path], remove: bool) -> list[list[str]]:
    if s.platform == "macos":
        target = f"gui/{os.getuid()}" if hasattr(os, "getuid") else "gui"
        plist = next(iter(files.values()))
        return [["launchctl", "bootout", target, str(plist)]] if remove else [["launchctl", "bootstrap", target, str(plist)]]
    if s.platform == "linux":
        timer = f"{s.name}.timer"
        return ([["systemctl", "--user", "disable", "--now", timer], ["systemctl", "--user", "daemon-reload"]] if remove
                else [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", timer]])
    xml = next(iter(files.values()))
    return [["schtasks", "/Delete", "/TN", s.name, "/F"]] if remove else [["schtasks", "/Create", "/TN", s.name, "/XML", str(xml), "/F"]]


def install(s: Schedule, *, register: bool = True) -> list[Path]:
    """Write the files and register them with the OS scheduler; the schedule is recorded in the workspace."""
    texts = render(s)
    where = install_dir(s.platform) if s.platform != "windows" else s.folder
    files = {name: where / name for name in texts}
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if s.platform == "windows":
            with open(path, "w", encoding="utf-16") as fh:  # the encoding its declaration names
                fh.write(texts[name])
        else:
            write_text_atomic(path, texts[name])
    s.folder.mkdir(parents=True, exist_ok=True)
    if register:
        for cmd in _commands(s, files, remove=False):
            _run(cmd)
    write_json_atomic(s.folder / INFO_NAME, {**asdict(s), "workspace": str(s.workspace), "files": [str(p) for p in files.values()],
                                             "installed": dt.datetime.now().astimezone().isoformat(timespec="seconds")})
    return list(files.values())


def remove_schedule(ws_dir: str | Path, *, register: bool = True) -> list[Path]:
    """Unregister and delete the files a previous `install` wrote (only those); returns them."""
    info = recorded(ws_dir)
    if info is None:
        raise EdentuneError(f"{ws_dir}: no schedule installed for this workspace", hint="nothing to remove")
    s = Schedule(**{k: info[k] for k in ("day", "at", "platform", "db", "python", "name")}, workspace=Path(info["workspace"]))
    files = {Path(p).name: Path(p) for p in info["files"]}
    if register:
        for cmd in _commands(s, files, remove=True):
            _run(cmd)
    for path in files.values():
        path.unlink(missing_ok=True)
    (s.folder / INFO_NAME).unlink()
    return list(files.values())


def recorded(ws_dir: str | Path) -> dict | None:
    path = Path(ws_dir) / SCHEDULE_DIR / INFO_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def status_lines(ws_dir: str | Path, now: dt.datetime | None = None) -> list[str]:
    """For `cycle status`: the next scheduled run and the last scheduled run's outcome."""
    lines = []
    info = recorded(ws_dir)
    if info is not None:
        when = next_run(info["day"], info["at"], now)
        lines.append(f"schedule: next run {when:%Y-%m-%d %H:%M} ({info['platform']}, day {info['day']} at {info['at']})")
    last = _last(ws_dir)
    if last is not None:
        outcome = "ok" if last.get("exit_code") == 0 else f"failed (exit {last.get('exit_code')})"
        lines.append(f"last scheduled run: {last.get('started')} {outcome}; log {last.get('log')}")
    return lines


def _last(ws_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(ws_dir) / SCHEDULE_DIR / LAST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def scheduled_run(ws_dir: str | Path, db: str | None = None, python: str | None = None) -> int:
    """What the scheduler starts: the round with --from-eden, its output appended to the log."""
    folder = Path(ws_dir).resolve() / SCHEDULE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / LOG_NAME
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    cmd = [python or sys.executable, "-m", "edentune", "cycle", "run", str(Path(ws_dir).resolve()), "--from-eden", *([db] if db else [])]
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n=== {started} {' '.join(cmd)}\n")
        fh.flush()
        # No timeout: a round trains for hours; the scheduler's own limits apply.
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"}).returncode
        finished = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        fh.write(f"=== {finished} exit {code}\n")
    write_json_atomic(folder / LAST_NAME, {"started": started, "finished": finished, "exit_code": code, "log": str(log)})
    return code


def schedule_command(ws_dir: str | Path, *, day: int = 1, at: str = "03:00", db: str | Path | None = None,
                     remove: bool = False, print_only: bool = False, platform: str | None = None) -> list[str]:
    """`edentune cycle schedule`: what to print."""
    if remove:
        files = remove_schedule(ws_dir)
        return [f"removed {p}" for p in files] or ["schedule removed"]
    if platform is not None and not print_only and platform != current_platform():
        raise EdentuneError(f"--platform {platform} is for --print: this computer runs {current_platform()}")
    s = schedule_for(ws_dir, day=day, at=at, platform=platform, db=db)
    if print_only:
        out = []
        for name, text in render(s).items():
            out += [f"# {name}", text]
        return out
    files = install(s)
    return [*(f"installed {p}" for p in files),
            f"next run {next_run(s.day, s.at):%Y-%m-%d %H:%M}; log {s.log}; undo with `edentune cycle schedule {ws_dir} --remove`"]


if __name__ == "__main__":  # python -m edentune.cycle.schedule WS [DB]
    if len(sys.argv) not in (2, 3):
        print("usage: python -m edentune.cycle.schedule WORKSPACE [EDEN_DB]", file=sys.stderr)
        sys.exit(2)
    sys.exit(scheduled_run(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
