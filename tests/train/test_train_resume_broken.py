"""`--resume` with a damaged checkpoint says which one and continues from the previous complete
one; without optimizer state it never silently starts a fresh optimizer; empty or too-long data
says which it is. Checkpoint files are loaded without unpickling arbitrary objects."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from train_helpers import conversation, make_config, write_jsonl

from edentune.errors import DataError, EdentuneError
from edentune.train import train
from edentune.train.recipe import checkpoint_problem, resume_checkpoint


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path, Path]:
    """A 4-step run with checkpoints 2 and 4: (run dir, train file, validation file)."""
    base = tmp_path_factory.mktemp("resume")
    rng = random.Random(0)
    train_f = write_jsonl(base / "train.jsonl", [conversation(rng, rng.randint(5, 20)) for _ in range(8)])
    val_f = write_jsonl(base / "val.jsonl", [conversation(rng, 8) for _ in range(2)])
    train(make_config(tiny_llama_dir, train_f, val_f, base / "run", max_steps=4, eval_steps=2, save_steps=2))
    return base / "run", Path(train_f), Path(val_f)


def copy_run(finished_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    return run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated adapter weights": (lambda c: truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors: not a readable"),
    "bad trainer_state.json": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, '), "trainer_state.json is unreadable"),
    "trainer_state.json without a step": (lambda c: (c / "trainer_state.json").write_text("{}"), "trainer_state.json has no valid global_step"),
    "truncated optimizer.pt": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated or not a torch file"),
    "garbage scheduler.pt": (lambda c: (c / "scheduler.pt").write_bytes(b"\x80\x04junk" * 100), "scheduler.pt is truncated or not a torch file"),
    "no optimizer.pt": (lambda c: (c / "optimizer.pt").unlink(), "no optimizer.pt: resuming would restart the optimizer"),
}


def recorded(console: Console) -> str:
    return " ".join(console.export_text().split())


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(finished_run, tmp_path, case):
    run = copy_run(finished_run, tmp_path)
    damage, why = DAMAGE[case]
    damage(run / "checkpoint-4")
    assert checkpoint_problem(run / "checkpoint-2") is None
    console = Console(record=True, width=200)
    assert resume_checkpoint(run, console) == str(run / "checkpoint-2")
    out = recorded(console)
    assert "cannot resume from 1 newer checkpoint(s)" in out and f"checkpoint-4: {why}" in out
    assert "resuming from checkpoint-2, the newest complete one" in out
    assert ("--fresh-optimizer" in out) == (case == "no optimizer.pt")
    assert (run / "checkpoint-4").is_dir()  # left in place, replaced when step 4 is saved again


def test_no_optimizer_state_anywhere_is_an_error_unless_fresh_optimizer_is_asked_for(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        (run / ckpt / "optimizer.pt").unlink()
    with pytest.raises(EdentuneError) as exc:
        resume_checkpoint(run, Console(record=True))
    msg = str(exc.value)
    assert "no checkpoint in" in msg and "checkpoint-4: no optimizer.pt" in msg and "checkpoint-2: no optimizer.pt" in msg
    assert "--fresh-optimizer" in msg
    console = Console(record=True, width=200)
    assert resume_checkpoint(run, console, fresh_optimizer=True) == str(run / "checkpoint-4")
    assert "--fresh-optimizer: checkpoint-4 has no optimizer/scheduler state" in recorded(console)


def test_resume_continues_from_the_previous_checkpoint_and_loads_only_weights(finished_run, tiny_llama_dir, tmp_path, monkeypatch):
    import torch

    run = copy_run(finished_run, tmp_path)
    truncate(run / "checkpoint-4" / "optimizer.pt")
    loads = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    _, train_f, val_f = finished_run
    cfg = make_config(tiny_llama_dir, str(train_f), str(val_f), run, max_steps=4, eval_steps=2, save_steps=2)
    console = Console(record=True, width=200)
    result = train(cfg, resume=True, console=console)
    assert "resuming from checkpoint-2" in recorded(console)
    start = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"start"' in line][-1]
    assert start["resume_from"] == str(run / "checkpoint-2")
    assert result.metrics["global_step"] == 4 and checkpoint_problem(run / "checkpoint-4") is None  # rewritten whole
    assert loads and all(w is True for w in loads)  # optimizer, scheduler and RNG state: no arbitrary unpickling


def test_resume_cli_with_every_checkpoint_broken_names_them(finished_run, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from edentune.cli import main

    run = copy_run(finished_run, tmp_path)
    truncate(run / "checkpoint-4" / "adapter_model.safetensors")
    (run / "checkpoint-2" / "trainer_state.json").write_text("not json")
    _, train_f, val_f = finished_run
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(make_config(tiny_llama_dir, str(train_f), str(val_f), run).model_dump(mode="json")))
    monkeypatch.setattr(sys, "argv", ["edentune", "train", str(cfg_file), "--resume"])
    with pytest.raises(SystemExit) as exc:
        main()
    out = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "Traceback" not in out
    assert "checkpoint-4: adapter_model.safetensors: not a readable safetensors file" in out
    assert "checkpoint-2: trainer_state.json is unreadable" in out


# -- empty and too-long training data -----------------------------------------------------------

def test_empty_training_data_says_it_is_empty(tiny_llama_dir, tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    cfg = make_config(tiny_llama_dir, str(empty), None, tmp_path / "run")
    with pytest.raises(DataError, match=rf"no training conversations in {empty}: the data is empty"):
        train(cfg)


def test_training_data_that_is_all_too_long_says_so_with_counts(tiny_llama_dir, tmp_path):
    rng = random.Random(0)
    train_f = write_jsonl(tmp_path / "train.jsonl", [conversation(rng, 60) for _ in range(3)])
    cfg = make_config(tiny_llama_dir, train_f, None, tmp_path / "run").updated({"model.max_seq_len": 32})
    with pytest.raises(DataError) as exc:
        train(cfg)
    msg = str(exc.value)
    assert "none of the 3 training conversation(s) fits model.max_seq_len=32" in msg and "3 dropped" in msg
    longest = int(msg.split("the longest has ")[1].split(" tokens")[0])
    assert longest > 32
