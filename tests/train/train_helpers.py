"""Helpers shared by the training tests (importable: pytest puts this directory on sys.path)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from edentune.config import parse_config

WORDS = "apple river stone cloud quick blue seven lamp paper music garden window silver tiger honey road".split()


def conversation(rng: random.Random, n_words: int, answer: str | None = None) -> dict:
    question = " ".join(rng.choice(WORDS) for _ in range(3))
    reply = answer or " ".join(rng.choice(WORDS) for _ in range(n_words))
    return {"messages": [{"role": "user", "content": f"Say something about {question}?"}, {"role": "assistant", "content": reply}]}


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def make_config(model_dir: str, train_file: str, val_file: str | None, output_dir: Path, **training):
    """A fast config: plain fp32 LoRA unless overridden, no gradient checkpointing, no early stopping."""
    t = dict(output_dir=str(output_dir), max_steps=8, per_device_batch_size=2, gradient_accumulation_steps=2,
             warmup_steps=0, learning_rate=1e-3, logging_steps=1, eval_steps=2, save_steps=2, save_total_limit=10,
             optimizer="adamw_torch", lr_scheduler="constant_with_warmup", gradient_checkpointing=False,
             early_stopping_patience=None, seed=0)
    t.update(training)
    return parse_config({
        "preset": "embedded",
        "model": {"name_or_path": model_dir, "max_seq_len": 256},
        "quantization": {"load_in_4bit": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": t,
        "data": {"train_files": [train_file], "validation_files": [val_file] if val_file else []},
    })
