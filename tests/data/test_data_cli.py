import json

from data_helpers import chat, read_jsonl, write_lines, write_records
from typer.testing import CliRunner

from edentune.cli import app

runner = CliRunner()


def test_validate_clean_stats_split_mix(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [json.dumps(chat("How do I sort a list?", "Use sorted(xs).")), "[1]", ""])
    res = runner.invoke(app, ["data", "validate", str(src), "-o", str(tmp_path / "v.jsonl"), "--quarantine", str(tmp_path / "q.jsonl")])
    assert res.exit_code == 0, res.output
    assert f"{src}:2: not a JSON object (list)" in res.output and "3 lines = 1 kept" in res.output
    res = runner.invoke(app, ["data", "clean", str(src), "-o", str(tmp_path / "c.jsonl"), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and json.loads((tmp_path / "r.json").read_text())["kept"] == 1
    res = runner.invoke(app, ["data", "stats", str(tmp_path / "c.jsonl"), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0 and json.loads((tmp_path / "s.json").read_text())["conversations"] == 1
    res = runner.invoke(app, ["data", "split", str(tmp_path / "c.jsonl"), "--train", str(tmp_path / "t.jsonl"),
                              "--val", str(tmp_path / "val.jsonl")])
    assert res.exit_code == 0
    res = runner.invoke(app, ["data", "mix", "--new", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "m.jsonl"),
                              "--quota", "general=2", "--ratio", "1.0"])
    assert res.exit_code == 0 and len(read_jsonl(tmp_path / "m.jsonl")) == 1
    assert "1 new + 0 replay" in res.output and "realised ratio 100.0% new" in res.output


def test_convert(tmp_path):
    src = write_records(tmp_path / "a.jsonl", [{"instruction": "Say hi", "output": "Hi!"}])
    res = runner.invoke(app, ["data", "convert", str(src), "--from", "alpaca", "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 0 and read_jsonl(tmp_path / "o.jsonl")[0]["messages"][1]["content"] == "Hi!"


def test_stats_counts_tokens_with_a_model_tokenizer(tmp_path, tiny_llama_dir):
    """`--tokenizer` takes what a config's model takes (here a local folder): real ChatML counts."""
    src = write_records(tmp_path / "d.jsonl", [chat("hello there", "a short answer"), chat("q " * 50, "a " * 60)])
    res = runner.invoke(app, ["data", "stats", str(src), "--tokenizer", tiny_llama_dir, "--max-seq-len", "64",
                              "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    st = json.loads((tmp_path / "s.json").read_text())
    assert st["over_max_seq_len"] == 1 and st["chat_template"]


def test_register_gives_each_root_app_its_own_data_group():
    # Stages build their command group inside register(app): registering twice (two root apps,
    # as tests and embedding programs do) must not add a command twice to a shared group.
    import typer

    from edentune.data.cli import register

    roots = [typer.Typer(), typer.Typer()]
    for root in roots:
        register(root)
    groups = [root.registered_groups[0].typer_instance for root in roots]
    assert groups[0] is not groups[1]
    for group in groups:
        names = [c.name or c.callback.__name__ for c in group.registered_commands]
        assert "inspect" not in names and {"validate", "clean", "mix", "feedback"} <= set(names)  # the train stage's command
