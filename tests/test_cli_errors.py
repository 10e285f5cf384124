"""The root `main()`: every way a command ends is one clear message, never a traceback.

User mistakes and broken files (EdentuneError), OS-level failures on outputs (permission,
read-only, a directory or file in the way, no space, /proc) exit with 2 and name the path; a bug
prints one line and leaves the full traceback in a log file (exit 70).
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

import edentune.config
from edentune.cli import EX_SOFTWARE, main


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the real entry point in-process: (exit code, everything printed)."""
    monkeypatch.setattr(sys, "argv", ["edentune", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 1 if code else 0), out.out + out.err


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_an_internal_error_is_one_line_and_the_trace_goes_to_a_log(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EDENTUNE_CACHE", str(tmp_path / "cache"))

    def broken(path):
        raise RuntimeError("boom in the loader\nsecond line of the message")

    monkeypatch.setattr(edentune.config, "load_config", broken)
    code, out = run_main(monkeypatch, capsys, "config", "check", "run.yaml")
    assert code == EX_SOFTWARE == 70
    assert "Traceback" not in out
    [line] = lines(out)
    assert line.startswith("internal error: RuntimeError: boom in the loader; full trace written to ")
    [log] = (tmp_path / "cache" / "logs").glob("edentune-crash-*.log")
    assert str(log) in line
    trace = log.read_text()
    assert "Traceback (most recent call last)" in trace and "in broken" in trace
    assert "second line of the message" in trace and "config check run.yaml" in trace


def test_the_crash_log_falls_back_to_the_temp_folder(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("EDENTUNE_CACHE", str(blocker))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(edentune.config, "load_config", lambda path: 1 / 0)
    code, out = run_main(monkeypatch, capsys, "config", "check", "run.yaml")
    assert code == 70 and "Traceback" not in out
    [log] = (tmp_path / "tmp").glob("edentune-crash-*.log")
    assert str(log) in out and "ZeroDivisionError" in log.read_text()


@pytest.mark.parametrize("err, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/srv/out/run"), "/srv/out/run: permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), "/mnt/ro/run: read-only file system"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/report.json"), "/data/report.json: is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file.txt/run"), "/data/file.txt/run: a part of this path is a file"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoint-4"), "/data/run/checkpoint-4: no space left on device"),
    (FileExistsError(errno.EEXIST, "File exists", "/data/run"), "/data/run: already exists"),
    (FileExistsError(errno.EEXIST, "File exists", __file__), f"{__file__}: is a file, but a folder is needed there"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/edentune/out"), "/proc/edentune/out: no such file or directory"),
])
def test_os_errors_become_one_clear_message_naming_the_path(monkeypatch, capsys, err, expected):
    def fail(path):
        raise err

    monkeypatch.setattr(edentune.config, "load_config", fail)
    code, out = run_main(monkeypatch, capsys, "config", "check", "run.yaml")
    assert code == 2 and "Traceback" not in out and "internal error" not in out
    assert out.startswith(f"error: {expected}") and "hint:" in out


def test_a_user_error_message_with_brackets_is_printed_verbatim(monkeypatch, capsys):
    from edentune.errors import ConfigError

    def fail(path):
        raise ConfigError("bad value [/v1] in [bold]run.yaml", hint="see [docs]")

    monkeypatch.setattr(edentune.config, "load_config", fail)
    code, out = run_main(monkeypatch, capsys, "config", "check", "run.yaml")
    assert code == 2 and "bad value [/v1] in [bold]run.yaml" in out and "hint: see [docs]" in out


def test_usage_errors_keep_clicks_message(monkeypatch, capsys):
    code, out = run_main(monkeypatch, capsys, "plan", "x.yaml", "--no-such-option")
    assert code == 2 and "No such option" in out and "Traceback" not in out


def test_ctrl_c_exits_130_without_a_trace(monkeypatch, capsys):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(edentune.config, "load_config", interrupted)
    code, out = run_main(monkeypatch, capsys, "config", "check", "run.yaml")
    assert code == 130 and "Traceback" not in out


# -- real outputs that cannot be written ------------------------------------------------------

def test_init_onto_a_directory_is_refused(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "configs"
    (folder / "keep").mkdir(parents=True)
    code, out = run_main(monkeypatch, capsys, "init", "--model", "embedded", "-o", str(folder), "--force")
    assert code == 2 and "is a directory" in out and "Traceback" not in out
    assert folder.is_dir() and (folder / "keep").is_dir()


def _embedded_config(tmp_path: Path, output_dir: str) -> Path:
    from edentune.config import config_for_model, render_config_yaml

    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    cfg = config_for_model("embedded").updated({"training.output_dir": output_dir, "data.train_files": [str(data)]})
    path = tmp_path / "run.yaml"
    path.write_text(render_config_yaml(cfg))
    return path


def test_train_output_dir_that_is_a_file(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("my notes")
    code, out = run_main(monkeypatch, capsys, "train", str(_embedded_config(tmp_path, str(blocker))))
    assert code == 2 and f"training.output_dir {blocker} is a file" in out and "Traceback" not in out
    assert blocker.read_text() == "my notes"


def test_train_output_dir_under_proc(monkeypatch, capsys, tmp_path):
    code, out = run_main(monkeypatch, capsys, "train", str(_embedded_config(tmp_path, "/proc/edentune-test/run")))
    assert code == 2 and "/proc/edentune-test" in out and "Traceback" not in out


def test_quickstart_out_that_is_a_file(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "qs"
    blocker.write_text("my notes")
    code, out = run_main(monkeypatch, capsys, "quickstart", "--out", str(blocker))
    assert code == 2 and "exists and is not a folder" in out and "Traceback" not in out
    assert blocker.read_text() == "my notes"


def test_quickstart_out_under_proc(monkeypatch, capsys):
    code, out = run_main(monkeypatch, capsys, "quickstart", "--out", "/proc/edentune-test/qs")
    assert code == 2 and "/proc/edentune-test" in out and "no such file or directory" in out.lower() and "Traceback" not in out
