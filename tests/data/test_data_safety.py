"""No data command destroys its input or writes half its outputs (issue 9, family 2), and broken
files give a reason per line or one clear error, never a traceback (families 5 and 6)."""

import gzip
import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest
from data_helpers import chat, read_jsonl, write_lines, write_records
from typer.testing import CliRunner

from edentune.cli import app
from edentune.errors import DataError, EdentuneError
from edentune.io import atomic_dir, atomic_outputs, check_outputs, write_jsonl_atomic

runner = CliRunner()
GOOD = [chat("How do I sort a list?", "Use sorted(xs)."), chat("What is a tuple?", "An immutable sequence.")]


def snapshot(root):
    """Every file under root (temporaries included) with its content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def files(tmp_path):
    write_records(tmp_path / "in.jsonl", GOOD + [{"broken": True}])
    write_records(tmp_path / "r.jsonl", GOOD)
    (tmp_path / "d").mkdir()
    write_records(tmp_path / "d" / "kto.jsonl", [{**GOOD[0], "rating": "up"}, {**GOOD[1], "rating": "down"}])
    return tmp_path


REFUSED = {
    "validate -o input": (["validate", "in.jsonl", "-o", "in.jsonl"], "is the input"),
    "validate --quarantine input": (["validate", "in.jsonl", "--quarantine", "in.jsonl"], "is the input"),
    "validate -o X --quarantine X": (["validate", "in.jsonl", "-o", "x.jsonl", "--quarantine", "x.jsonl"], "same file"),
    "validate --report input": (["validate", "in.jsonl", "--report", "in.jsonl"], "is the input"),
    "validate -o X --report X": (["validate", "in.jsonl", "-o", "x.jsonl", "--report", "x.jsonl"], "same file"),
    "validate -o dir": (["validate", "in.jsonl", "-o", "d"], "is a directory"),
    "validate -o inside a file": (["validate", "in.jsonl", "-o", "r.jsonl/out.jsonl"], "is a file, not a directory"),
    "convert -o input": (["convert", "in.jsonl", "-o", "in.jsonl"], "is the input"),
    "convert --quarantine input": (["convert", "in.jsonl", "--quarantine", "in.jsonl"], "is the input"),
    "convert --report X --quarantine X": (["convert", "in.jsonl", "--report", "q", "--quarantine", "q"], "same file"),
    "clean -o input": (["clean", "in.jsonl", "-o", "in.jsonl"], "is the input"),
    "clean --report input": (["clean", "in.jsonl", "--report", "in.jsonl"], "is the input"),
    "clean -o X --quarantine X": (["clean", "in.jsonl", "-o", "x", "--quarantine", "x"], "same file"),
    "stats --json input": (["stats", "in.jsonl", "--json", "in.jsonl"], "is the input"),
    "split --train input": (["split", "r.jsonl", "--train", "r.jsonl", "--val", "v.jsonl"], "is the input"),
    "split --train X --val X": (["split", "r.jsonl", "--train", "tv.jsonl", "--val", "tv.jsonl"], "same file"),
    "mix --new X -o X": (["mix", "--new", "r.jsonl", "-o", "r.jsonl", "--ratio", "1"], "is the input"),
    "mix --replay X -o X": (["mix", "--new", "r.jsonl", "--replay", "in.jsonl", "-o", "in.jsonl"], "is the input"),
    "mix --report input": (["mix", "--new", "r.jsonl", "-o", "m.jsonl", "--report", "r.jsonl"], "is the input"),
    "mix -o X --report X": (["mix", "--new", "r.jsonl", "-o", "m.jsonl", "--report", "m.jsonl"], "same file"),
    "feedback d/kto.jsonl -o d": (["feedback", "d/kto.jsonl", "-o", "d"], "is the input"),
    "feedback -o a file": (["feedback", "d/kto.jsonl", "-o", "r.jsonl"], "is a file, not a directory"),
}


@pytest.mark.parametrize("args, message", REFUSED.values(), ids=REFUSED.keys())
def test_outputs_that_would_destroy_data_are_refused(files, monkeypatch, args, message):
    monkeypatch.chdir(files)
    before = snapshot(files)
    res = runner.invoke(app, ["data", *args])
    assert res.exit_code != 0 and isinstance(res.exception, EdentuneError), res.output
    assert message in str(res.exception)
    assert snapshot(files) == before  # inputs byte-identical, nothing (not even a temporary) written


def test_links_to_an_input_count_as_the_input(files, monkeypatch):
    monkeypatch.chdir(files)
    os.symlink("in.jsonl", "sym.jsonl")
    os.link("in.jsonl", "hard.jsonl")
    before = snapshot(files)
    for out in ("sym.jsonl", "hard.jsonl"):
        res = runner.invoke(app, ["data", "validate", "in.jsonl", "-o", out])
        assert isinstance(res.exception, EdentuneError) and "is the input" in str(res.exception)
    assert snapshot(files) == before


def test_fifo_and_devices_are_never_written_or_replaced(files, monkeypatch):
    monkeypatch.chdir(files)
    os.mkfifo("pipe")
    for out in ("pipe", os.devnull):
        res = runner.invoke(app, ["data", "validate", "in.jsonl", "-o", out])  # a fifo would block if opened
        assert isinstance(res.exception, EdentuneError) and "not a regular file" in str(res.exception)
    assert stat.S_ISFIFO(os.lstat("pipe").st_mode) and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    with pytest.raises(EdentuneError, match="not a regular file"):
        write_jsonl_atomic(files / "pipe", [{}])


def test_split_with_an_unwritable_val_writes_nothing(files):
    """/proc refuses new files even to root: the train file must not appear (or change) either."""
    write_lines(files / "t.jsonl", ["old train file"])
    before = snapshot(files)
    res = runner.invoke(app, ["data", "split", str(files / "r.jsonl"), "--train", str(files / "t.jsonl"),
                              "--val", "/proc/edentune-val.jsonl"])
    assert isinstance(res.exception, EdentuneError) and "cannot write /proc/edentune-val.jsonl" in str(res.exception)
    assert snapshot(files) == before
    assert not os.path.exists("/proc/edentune-val.jsonl")


def test_outputs_appear_together_or_not_at_all(tmp_path, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("old")
    with pytest.raises(RuntimeError), atomic_outputs(outputs=[a, b]) as txn:
        txn.write_text(a, "new")
        txn.write_text(b, "new")
        raise RuntimeError("the command failed after writing")
    assert a.read_text() == "old" and not b.exists() and os.listdir(tmp_path) == ["a.json"]

    # A folder appears where an output goes while the command runs: checked again, nothing moved.
    with pytest.raises(EdentuneError, match="is a directory"), atomic_outputs(outputs=[a, b]) as txn:
        txn.write_text(a, "new")
        txn.write_text(b, "new")
        b.mkdir()
    assert a.read_text() == "old" and b.is_dir() and sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]
    b.rmdir()

    # The second rename fails after the first one succeeded: the first file is put back.
    import edentune.io as io_module
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst) == str(b):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", failing_replace)
    with pytest.raises(OSError), atomic_outputs(outputs=[a, b]) as txn:
        txn.write_text(a, "new")
        txn.write_text(b, "new")
    monkeypatch.undo()
    assert a.read_text() == "old" and not b.exists() and os.listdir(tmp_path) == ["a.json"]


def test_check_outputs_allows_distinct_paths(tmp_path):
    write_records(tmp_path / "in.jsonl", GOOD)
    check_outputs([tmp_path / "in.jsonl"], [tmp_path / "out.jsonl", None, tmp_path / "sub" / "q.jsonl"])


# -- permissions ------------------------------------------------------------------------------
UMASK_SCRIPT = """
import os, sys
from pathlib import Path
from edentune.io import atomic_dir
os.umask(int(sys.argv[1], 8))
from edentune.cli import app
app(["data", "split", sys.argv[2], "--train", sys.argv[3] + "/t.jsonl", "--val", sys.argv[3] + "/v.jsonl"], standalone_mode=False)
with atomic_dir(sys.argv[3] + "/exported", marker=".m") as tmp:
    (tmp / "f").write_text("x")
"""


@pytest.mark.parametrize("umask, file_mode, dir_mode", [("022", 0o644, 0o755), ("027", 0o640, 0o750)], ids=["022", "027"])
def test_created_files_and_folders_follow_the_umask(files, umask, file_mode, dir_mode):
    out = files / "out"
    subprocess.run([sys.executable, "-c", UMASK_SCRIPT, umask, str(files / "r.jsonl"), str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True)
    assert stat.S_IMODE(os.stat(out / "t.jsonl").st_mode) == file_mode
    assert stat.S_IMODE(os.stat(out / "v.jsonl").st_mode) == file_mode
    assert stat.S_IMODE(os.stat(out / "exported").st_mode) == dir_mode


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "private.jsonl"
    path.write_text("old\n")
    path.chmod(0o600)
    write_jsonl_atomic(path, [{"a": 1}])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_jsonl(path) == [{"a": 1}]


# -- broken lines: a reason each, never a traceback ---------------------------------------------
DEEP = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
NESTED = '{"messages": [' + '{"a": ' * 200 + "1" + "}" * 200 + "]}"
HUGE_NUMBER = '{"messages": [], "n": ' + "9" * 5000 + "}"
LONE_SURROGATE = json.dumps(chat("Hi \\ud800 there", "Hello.")).replace("\\\\ud800", "\\ud800")
CONTROL_CHAR = '{"messages": "a\x01b"}'
BROKEN = {"DEEP": "nested too deeply", "NESTED": "nested too deeply",
          "HUGE_NUMBER": "invalid JSON (Exceeds the limit (4300 digits)",
          "LONE_SURROGATE": "lone surrogate", "CONTROL_CHAR": "invalid JSON (Invalid control character at column"}


def test_lone_surrogate_line_is_what_the_test_means():
    assert "\\ud800" in LONE_SURROGATE and "\ud800" in json.loads(LONE_SURROGATE)["messages"][0]["content"]


@pytest.fixture
def broken(tmp_path):
    lines = [json.dumps(GOOD[0]), DEEP, NESTED, HUGE_NUMBER, LONE_SURROGATE, CONTROL_CHAR]
    return write_lines(tmp_path / "broken.jsonl", lines)


@pytest.mark.parametrize("command", ["validate", "convert", "clean"])
def test_broken_lines_are_quarantined_with_a_reason(tmp_path, broken, command):
    out, q, rep = tmp_path / "o.jsonl", tmp_path / "q.jsonl", tmp_path / "r.json"
    res = runner.invoke(app, ["data", command, str(broken), "-o", str(out), "--quarantine", str(q), "--report", str(rep)])
    assert res.exit_code == 0, res.output
    assert read_jsonl(out) == [GOOD[0]]
    reasons = [r["reason"] for r in read_jsonl(q)]
    for expected, got in zip(BROKEN.values(), reasons):
        assert got.startswith(expected), (expected, got)
    assert not any("at at" in r for r in reasons)
    assert json.loads(rep.read_text())["quarantined"] == 5


def test_broken_lines_in_stats_feedback_split_mix_and_train_feedback(tmp_path, broken):
    from edentune.train.preference import read_preferences  # imports torch: only here

    res = runner.invoke(app, ["data", "stats", str(broken), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0 and json.loads((tmp_path / "s.json").read_text())["invalid_lines"] == 5
    res = runner.invoke(app, ["data", "feedback", str(broken), "-o", str(tmp_path / "fb")])
    assert res.exit_code == 0, res.output
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "fb" / "quarantine.jsonl")]
    assert [r.split(" (")[0] for r in reasons[1:]] == ["nested too deeply", "nested too deeply", "invalid JSON",
                                                        "lone surrogate", "invalid JSON"]
    for args in (["split", str(broken), "--train", str(tmp_path / "t"), "--val", str(tmp_path / "v")],
                 ["mix", "--new", str(broken), "-o", str(tmp_path / "m")]):
        res = runner.invoke(app, ["data", *args])
        assert isinstance(res.exception, DataError) and "5 invalid line(s)" in str(res.exception)
        assert "lone surrogate" in str(res.exception)
    for line, reason in zip([DEEP, HUGE_NUMBER, LONE_SURROGATE], ["nested too deeply", "Exceeds the limit", "lone surrogate"]):
        path = write_lines(tmp_path / "kto.jsonl", [line])
        with pytest.raises(DataError, match=reason):
            read_preferences(path, "kto")


# -- encodings: one message naming it ------------------------------------------------------------
@pytest.mark.parametrize("encoding, bom, named", [
    ("utf-16", b"", "is UTF-16 (little-endian)"), ("utf-16-be", b"\xfe\xff", "is UTF-16 (big-endian)"),
    ("utf-16-le", b"", "looks like UTF-16 (little-endian, no byte-order mark)"), ("utf-32", b"", "is UTF-32 (little-endian)"),
])
def test_utf16_and_utf32_files_are_one_clear_error(tmp_path, encoding, bom, named):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in GOOD) + "\n"
    path = tmp_path / "in.jsonl"
    path.write_bytes(bom + text.encode(encoding))
    res = runner.invoke(app, ["data", "validate", str(path), "-o", str(tmp_path / "o.jsonl")])
    assert isinstance(res.exception, DataError) and f"{path} {named}" in str(res.exception)
    assert "iconv -f UTF-" in str(res.exception) and not (tmp_path / "o.jsonl").exists()


def test_gzip_is_read_transparently_and_a_broken_one_is_one_error(tmp_path):
    raw = ("\n".join(json.dumps(r) for r in GOOD) + "\n").encode()
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(raw))
    res = runner.invoke(app, ["data", "validate", str(tmp_path / "in.jsonl.gz"), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 0 and read_jsonl(tmp_path / "o.jsonl") == GOOD
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(raw * 50)[:60])
    res = runner.invoke(app, ["data", "validate", str(tmp_path / "cut.jsonl.gz"), "-o", str(tmp_path / "o2.jsonl")])
    assert isinstance(res.exception, DataError) and "corrupt or truncated gzip" in str(res.exception)
    assert not (tmp_path / "o2.jsonl").exists()
    (tmp_path / "a.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    res = runner.invoke(app, ["data", "stats", str(tmp_path / "a.zip")])
    assert isinstance(res.exception, DataError) and "is a zip archive" in str(res.exception)
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02" * 100)
    res = runner.invoke(app, ["data", "clean", str(tmp_path / "b.bin")])
    assert isinstance(res.exception, DataError) and "is binary data" in str(res.exception)


def test_errors_reach_the_terminal_as_one_line_without_traceback(files):
    """Through the real entry point: the message, a hint, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "edentune.cli", "data", "validate", str(files / "in.jsonl"),
                           "-o", str(files / "in.jsonl")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "200"})
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "is the input" in proc.stdout + proc.stderr and "hint:" in proc.stdout + proc.stderr


# -- settings: data.clean / data.mix are the one source of defaults and limits -------------------
@pytest.mark.parametrize("args, key", [
    (["--near-dup", "-1"], "near_duplicate_threshold"), (["--near-dup", "0"], "near_duplicate_threshold"),
    (["--near-dup", "5"], "near_duplicate_threshold"), (["--near-dup", "nan"], "near_duplicate_threshold"),
    (["--min-chars", "-1"], "min_chars"), (["--max-chars", "-10"], "max_chars"),
    (["--max-turn-chars", "0"], "max_turn_chars"), (["--min-chars", "500", "--max-chars", "100"], "min_chars"),
    (["--scrub", "maybe"], "scrub"),
])
def test_clean_rejects_impossible_settings(files, args, key):
    before = snapshot(files)
    res = runner.invoke(app, ["data", "clean", str(files / "r.jsonl"), "-o", str(files / "o.jsonl"), *args])
    assert isinstance(res.exception, EdentuneError) and key in str(res.exception), res.output
    assert snapshot(files) == before


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2", "nan"])
def test_mix_rejects_impossible_ratios(files, ratio):
    res = runner.invoke(app, ["data", "mix", "--new", str(files / "r.jsonl"), "-o", str(files / "m.jsonl"), "--ratio", ratio])
    assert isinstance(res.exception, EdentuneError) and "new_ratio" in str(res.exception)
    assert not (files / "m.jsonl").exists()


def test_clean_and_mix_read_their_settings_from_a_run_config(tmp_path):
    short = chat("Hi there", "Hello, friend.")  # 22 characters
    src = write_records(tmp_path / "in.jsonl", [short])
    (tmp_path / "run.yaml").write_text("data:\n  clean: {min_chars: 30}\n  mix: {new_ratio: 1.0, seed: 7, quotas: {general: 1}}\n")
    cfg = str(tmp_path / "run.yaml")
    res = runner.invoke(app, ["data", "clean", str(src), "-o", str(tmp_path / "c.jsonl"), "--config", cfg])
    assert res.exit_code == 0 and read_jsonl(tmp_path / "c.jsonl") == [] and "too short" in res.output
    res = runner.invoke(app, ["data", "clean", str(src), "-o", str(tmp_path / "c.jsonl"), "--config", cfg, "--min-chars", "5"])
    assert res.exit_code == 0 and read_jsonl(tmp_path / "c.jsonl") == [short]  # the option wins
    res = runner.invoke(app, ["data", "clean", str(src), "-o", str(tmp_path / "c.jsonl")])
    assert res.exit_code == 0 and read_jsonl(tmp_path / "c.jsonl") == [short]  # default min_chars is 10
    res = runner.invoke(app, ["data", "mix", "--new", str(src), "-o", str(tmp_path / "m.jsonl"), "--config", cfg,
                              "--report", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert (report["ratio"], report["seed"], report["wanted"]) == (1.0, 7, 1) and read_jsonl(tmp_path / "m.jsonl") == [short]


# -- folders -----------------------------------------------------------------------------------
def test_atomic_dir_with_a_marker_replaces_only_its_own_folders(tmp_path, monkeypatch):
    notes = tmp_path / "precious"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(EdentuneError, match="not empty and was not written by edentune"):
        with atomic_dir(notes, marker=".m"):
            pytest.fail("must refuse before the block runs")
    assert (notes / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["precious"]

    out = tmp_path / "out"
    for content in ("first", "second"):
        with atomic_dir(out, marker=".m") as tmp:
            (tmp / "f").write_text(content)
    assert sorted(os.listdir(out)) == [".m", "f"] and (out / "f").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["out", "precious"]  # no temporaries or old copies left

    monkeypatch.chdir(out)
    with pytest.raises(EdentuneError, match="current folder"), atomic_dir(".", marker=".m"):
        pass
    with pytest.raises(EdentuneError, match="overlaps the input"), atomic_dir(tmp_path / "x", inputs=[tmp_path]):
        pass


def test_a_file_name_with_undecodable_bytes_is_written_as_a_json_escape(tmp_path):
    """Python holds such names as lone surrogates; the quarantine and report name them as \\udcXX."""
    src = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jsonl"))
    write_lines(tmp_path / src, ["[1]"])
    res = runner.invoke(app, ["data", "validate", src, "--quarantine", str(tmp_path / "q.jsonl"), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert read_jsonl(tmp_path / "q.jsonl")[0]["source"] == f"{src}:1"
    assert b"caf\\udce9.jsonl:1" in (tmp_path / "r.json").read_bytes()
    res = runner.invoke(app, ["data", "feedback", src, "-o", str(tmp_path / "fb")])
    assert res.exit_code == 0 and json.loads((tmp_path / "fb" / "feedback_stats.json").read_text())["inputs"] == [src]
