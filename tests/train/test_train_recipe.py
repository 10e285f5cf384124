"""The recipe end to end on a tiny model: best checkpoint + early stopping, NaN rollback, atomic
checkpoints, kill-and-resume equality, and a QLoRA run through the CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import WORDS, conversation, make_config, write_jsonl
from transformers import TrainerCallback

from edentune.train import train
from edentune.train.trainer import EdenTrainer


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def test_early_stopping_keeps_the_min_eval_checkpoint(tiny_llama_dir, tmp_path):
    # Train always answers "apple apple ..."; validation answers other words, which the model
    # unlearns as it memorises "apple": validation loss falls briefly, then rises.
    rng = random.Random(0)
    train_f = write_jsonl(tmp_path / "t.jsonl", [conversation(rng, 0, answer="apple " * 8) for _ in range(16)])
    val_f = write_jsonl(tmp_path / "v.jsonl", [conversation(rng, 0, answer=" ".join(WORDS[1:9])) for _ in range(4)])
    cfg = make_config(tiny_llama_dir, train_f, val_f, tmp_path / "run", max_steps=40, learning_rate=1e-2,
                      early_stopping_patience=2, eval_steps=2, save_steps=2, save_total_limit=2)
    result = train(cfg)
    evals = events(result.run_dir, "eval")  # periodic evaluations only: the curve and the health checks
    (final_eval,) = events(result.run_dir, "final_eval")  # the loaded best, scored once more after training
    best = min(evals, key=lambda e: e["eval_loss"])
    assert result.metrics["stopped_early"] and result.metrics["global_step"] < 40
    assert result.best_checkpoint.name == f"checkpoint-{best['step']}"
    assert evals[-1]["step"] == best["step"] + 2 * 2  # stopped after `patience` evals without improvement
    # The final adapter is the best checkpoint's, not the last step's.
    final, kept = adapter(result.adapter_dir), adapter(result.best_checkpoint)
    assert all(torch.equal(final[k], kept[k]) for k in kept)
    assert result.metrics["final_eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-5)
    assert final_eval["eval_loss"] == result.metrics["final_eval_loss"] and final_eval["step"] == evals[-1]["step"]


class InjectNaN(TrainerCallback):
    """Makes the embeddings output NaN during optimizer step `at` (1-based), once."""

    def __init__(self, at: int):
        self.at, self.done, self.handle = at, False, None

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.at and not self.done:
            self.done = True
            emb = model.get_input_embeddings()
            self.handle = emb.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_step_end(self, args, state, control, **kw):
        if self.handle:
            self.handle.remove()
            self.handle = None


def test_nan_rolls_back_halves_lr_and_finishes(tiny_llama_dir, small_data, tmp_path):
    cfg = make_config(tiny_llama_dir, *small_data, tmp_path / "run", max_steps=8, learning_rate=1e-3)
    result = train(cfg, callbacks=[InjectNaN(at=5)])
    [rollback] = events(result.run_dir, "nan_rollback")
    assert rollback["checkpoint"].endswith("checkpoint-4") and rollback["learning_rate"] == pytest.approx(5e-4)
    assert result.metrics["nan_rollbacks"] == 1 and result.metrics["global_step"] == 8
    lrs = {e["step"]: e["learning_rate"] for e in events(result.run_dir, "train")}  # later entries win
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(5e-4) and lrs[8] == pytest.approx(5e-4)
    assert all(torch.isfinite(t).all() for t in adapter(result.adapter_dir).values())


def test_nan_retries_are_bounded(tiny_llama_dir, small_data, tmp_path):
    from edentune.errors import EdentuneError

    cfg = make_config(tiny_llama_dir, *small_data, tmp_path / "run", max_steps=4, nan_max_retries=0)
    with pytest.raises(EdentuneError, match="diverged"):
        train(cfg, callbacks=[InjectNaN(at=3)])


def test_checkpoint_appears_atomically_and_a_crash_mid_save_leaves_none(tiny_llama_dir, small_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = make_config(tiny_llama_dir, *small_data, run, max_steps=6)
    original = EdenTrainer._save_rng_state
    seen = []

    def save_rng_then_maybe_crash(self, output_dir):
        original(self, output_dir)
        step = self.state.global_step
        seen.append((run / f"checkpoint-{step}").exists())  # must not be visible while being written
        if step == 4:
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(EdenTrainer, "_save_rng_state", save_rng_then_maybe_crash)
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    assert seen == [False, False]
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert (run / "checkpoint-2" / "trainer_state.json").exists()


RUN_SLOWLY = textwrap.dedent("""
    import sys, time
    import yaml
    from transformers import TrainerCallback
    from edentune.config import parse_config
    from edentune.train import train

    class Slow(TrainerCallback):
        def on_step_end(self, *a, **k):
            time.sleep(0.5)

    train(parse_config(yaml.safe_load(open(sys.argv[1]))), callbacks=[Slow()])
""")


def test_kill_and_resume_equals_uninterrupted(tiny_llama_dir, small_data, tmp_path):
    import yaml

    # 16 conversations / (2 x 2) = 4 steps per epoch: the kill lands mid-epoch 2, so resuming
    # must restore the per-epoch data order, optimizer, scheduler and RNG (dropout is on).
    def cfg(name):
        c = make_config(tiny_llama_dir, *small_data, tmp_path / name, max_steps=12, eval_steps=3, save_steps=3)
        c.lora.dropout = 0.1
        return c

    reference = train(cfg("reference"))

    killed = cfg("killed")
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(killed.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-c", RUN_SLOWLY, str(cfg_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "killed" / "checkpoint-6").exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists()

    resumed = train(killed, resume=True)
    a, b = adapter(reference.adapter_dir), adapter(resumed.adapter_dir)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_qlora_resume_after_an_evaluation_is_exact(tiny_qwen2_dir, small_data, tmp_path):
    # Evaluating and saving at step 2 must not change what steps 3-4 compute: on AVX512-BF16 CPUs
    # bitsandbytes repacks 4-bit weights at the first no-grad eval forward and the checkpoint save
    # converts them back with re-quantized scales, unless edentune keeps one layout
    # (recipe.keep_cpu_4bit_layout); the resumed run (a fresh base) then trained on another base.
    def cfg(name):
        c = make_config(tiny_qwen2_dir, *small_data, tmp_path / name, max_steps=4, eval_steps=2, save_steps=2,
                        optimizer="adamw_8bit")
        c.quantization.load_in_4bit = True
        c.lora.dropout = 0.1
        return c

    reference = train(cfg("reference"))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "reference" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")  # as if killed after it
    resumed = train(cfg("resumed"), resume=True)
    assert events(tmp_path / "resumed", "start")[0]["resume_from"].endswith("checkpoint-2")
    assert (reference.adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (resumed.adapter_dir / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("max_steps", [4, 6], ids=["at-epoch-end", "mid-epoch"])
def test_resume_at_max_steps_trains_no_further_step(tiny_llama_dir, small_data, tmp_path, max_steps):
    # 16 conversations / (2 x 2) = 4 steps per epoch: checkpoint-6 lies mid-epoch, where Trainer
    # alone trained a 7th step on every --resume. Resuming at max_steps must only finish the run.
    run = tmp_path / "run"
    cfg = make_config(tiny_llama_dir, *small_data, run, max_steps=max_steps, eval_steps=2, save_steps=2)
    first = train(cfg)
    weights = adapter(first.adapter_dir)
    for kill_before_final_save in (False, True):  # --resume on a finished run; a kill after the last checkpoint
        if kill_before_final_save:
            shutil.rmtree(run / "adapter")
            (run / "result.json").unlink()
        resumed = train(cfg, resume=True)
        assert resumed.metrics["global_step"] == max_steps
        assert resumed.metrics["trained_tokens"] == first.metrics["trained_tokens"]
        assert json.loads((run / "result.json").read_text())["global_step"] == max_steps
        assert not (run / f"checkpoint-{max_steps + 1}").exists()
        kinds = [e["event"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
        since_resume = kinds[len(kinds) - 1 - kinds[::-1].index("start"):]
        assert "train" not in since_resume, since_resume
        after = adapter(resumed.adapter_dir)
        assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)


def test_qlora_end_to_end_through_the_cli(tiny_qwen2_dir, small_data, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from edentune.cli import app

    cfg = make_config(tiny_qwen2_dir, *small_data, tmp_path / "run", max_steps=4, optimizer="paged_adamw_8bit",
                      gradient_checkpointing=True, early_stopping_patience=3, lr_scheduler="cosine", warmup_steps=1)
    cfg.quantization.load_in_4bit = True
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    out = CliRunner().invoke(app, ["train", str(cfg_file)])
    assert out.exit_code == 0, out.output
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packages"]["bitsandbytes"] and manifest["chat_template"] and len(manifest["datasets"]) == 2
    train_events = events(run, "train")
    assert len(train_events) == 4 and all(e["trained_tokens_per_s"] > 0 and e["peak_memory_gb"] > 0 for e in train_events)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # Rerunning without --resume refuses to overwrite; --resume on a finished run is a no-op that keeps the adapter.
    out = CliRunner().invoke(app, ["train", str(cfg_file)])
    assert out.exit_code != 0 and "--resume" in str(out.exception)


def test_inspect_highlights_trained_tokens(tiny_llama_dir, small_data, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from edentune.cli import app

    cfg = make_config(tiny_llama_dir, *small_data, tmp_path / "run")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = CliRunner().invoke(app, ["inspect", str(cfg_file), "--index", "1"])
    assert out.exit_code == 0, out.output
    assert "train.jsonl:2" in out.output and "trained" in out.output and "<|im_end|>" in out.output
