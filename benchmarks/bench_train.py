"""Trained tokens/s: edentune's engine vs what a user would run instead, on the same conversations.

Same model (the embedded SmolLM2-135M, the embedded preset: 4-bit NF4 base, LoRA r=32 on seven
projections, batch 4, 8-bit AdamW), same data (the bundled Eden sample: 83-1,174 tokens per
conversation, max_seq_len 1024 so that real length spread is kept), same assistant-only labels,
optimizer and schedule, one epoch each. Engines, each in its own subprocess (peak RSS is its own):

- `edentune`: the recipe (length-grouped batches, trained-position chunked loss, no padding mask).
- `trainer-grouped`: transformers `Trainer` + PEFT with length grouping (`group_by_length`, the
  setting `Trainer` has built in), padded batches, transformers' default loss.
- `trl`: TRL `SFTTrainer` with the loss on assistant tokens only (pre-tokenized rows carrying
  `assistant_masks` from the same labels: what `assistant_only_loss=True` derives from a chat
  template with generation tags, which SmolLM2's lacks), its default batching. SFTConfig turns
  gradient checkpointing on by default (the embedded preset has it off), so `trl-no-gc` runs the
  same with it off: the ratio against each is reported.
- `baseline`: `Trainer` + PEFT with random batches (the first baseline of docs/benchmarks.md).

    python benchmarks/bench_train.py --conversations 64 --out bench_train.json      # quiet machine
    python benchmarks/bench_train.py --quick                                         # proves it runs

Rate = trained (label != -100) tokens / Trainer's train_runtime (all steps, same overheads).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "edentune" / "data" / "sample" / "eden_sample.jsonl"


def data_file(workdir: Path, conversations: int) -> str:
    """A fixed random subset of the bundled sample, trained for exactly one epoch by both sides:
    the same conversations, so only batching and the engine differ (a step budget would compare
    different conversations, and length grouping deliberately starts with the longest)."""
    lines = [ln for ln in SAMPLE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    random.Random(0).shuffle(lines)
    path = workdir / "subset.jsonl"
    path.write_text("\n".join(lines[:conversations]) + "\n", encoding="utf-8")
    return str(path)


def bench_config(data: str, out_dir: Path, max_seq_len: int = 1024):
    from edentune.config import config_for_model

    return config_for_model("embedded").updated({
        "model.max_seq_len": max_seq_len,
        "model.overlong": "truncate",  # keep every conversation: the length spread is what batching is about
        "data.train_files": [data], "data.validation_fraction": 0.0,
        "training.output_dir": str(out_dir), "training.warmup_steps": 1, "training.num_epochs": 1,
        "training.logging_steps": 1, "training.load_best_model_at_end": False, "training.save_steps": 10_000,
    })


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_edentune(cfg) -> dict:
    from rich.console import Console

    from edentune.train import train

    result = train(cfg, console=Console(quiet=True))
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    runtime = next(e for e in map(json.loads, lines) if e["event"] == "summary")["train_runtime"]
    return {"trained_tokens": result.metrics["trained_tokens"], "train_runtime_s": runtime}


def _peer_setup(cfg, args_class=None, **overrides):
    """Model, tokenizer, encoded conversations and Trainer arguments shared by the peer engines."""
    from edentune.models import load_tokenizer, pick_device, pick_dtype, resolve_model_dir
    from edentune.data.encode import encode_all, load_splits
    from edentune.train.recipe import load_training_model, training_arguments

    m = cfg.model
    model_dir = resolve_model_dir(m.name_or_path, m.gguf_file, m.architecture)
    tok = load_tokenizer(model_dir)
    tok.padding_side = "right"
    train_convs, _ = load_splits(cfg.data)
    examples, _ = encode_all(tok, train_convs, m.max_seq_len, m.overlong, m.system_prompt)
    device = pick_device()
    dtype = pick_dtype(cfg.training.precision, device)
    args = training_arguments(cfg, Path(cfg.training.output_dir), device, dtype, has_eval=False, lr=cfg.training.learning_rate,
                              args_class=args_class, **overrides)
    return load_training_model(cfg, model_dir, device, dtype), tok, examples, args


def _counting(collate, counted: dict):
    from edentune.data.encode import IGNORE

    def wrapped(features):  # counts what the model trains on, same definition as edentune
        batch = collate(features)
        counted["trained_tokens"] += int((batch["labels"][..., 1:] != IGNORE).sum())
        return batch
    return wrapped


def run_trainer(cfg, sampling: str) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer

    from edentune.data.encode import IGNORE
    from edentune.train.recipe import to_dataset

    model, tok, examples, args = _peer_setup(cfg)
    args.train_sampling_strategy = sampling  # "random" or "group_by_length"
    counted = {"trained_tokens": 0}
    collate = _counting(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE), counted)
    trainer = Trainer(model=model, args=args, train_dataset=to_dataset(examples), data_collator=collate, processing_class=tok)
    out = trainer.train()
    return {"trained_tokens": counted["trained_tokens"], "train_runtime_s": out.metrics["train_runtime"]}


def run_trl(cfg, **overrides) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from edentune.data.encode import IGNORE

    # max_length=None: the rows are already truncated to max_seq_len
    model, tok, examples, sft_args = _peer_setup(cfg, SFTConfig, max_length=None, dataset_num_proc=None, **overrides)
    rows = Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                              "assistant_masks": [[int(lab != IGNORE) for lab in e.labels] for e in examples]})
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=rows, processing_class=tok)
    counted = {"trained_tokens": 0}
    trainer.data_collator = _counting(trainer.data_collator, counted)
    out = trainer.train()
    return {"trained_tokens": counted["trained_tokens"], "train_runtime_s": out.metrics["train_runtime"]}


ENGINES = {
    "edentune": run_edentune,
    "trainer-grouped": lambda cfg: run_trainer(cfg, "group_by_length"),
    "trl": run_trl,  # SFTConfig's defaults, gradient checkpointing (on in TRL) included
    # TRL with gradient checkpointing off like the embedded preset: the same memory/compute trade
    "trl-no-gc": lambda cfg: run_trl(cfg, gradient_checkpointing=False),
    "baseline": lambda cfg: run_trainer(cfg, "random"),
}


def child(engine: str, conversations: int, max_seq_len: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(data_file(Path(tmp), conversations), Path(tmp) / "run", max_seq_len)
        res = ENGINES[engine](cfg)
    res["trained_tokens_per_s"] = res["trained_tokens"] / res["train_runtime_s"]
    res["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=64, help="subset size, trained for one epoch")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--quick", action="store_true", help="8 conversations at 256 tokens: proves the script runs, times nothing")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--engine", choices=list(ENGINES), help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    if a.quick:
        a.conversations, a.max_seq_len = 8, 256
    if a.engine:
        return child(a.engine, a.conversations, a.max_seq_len)
    results = {}
    for engine in a.engines:
        proc = subprocess.run([sys.executable, __file__, "--engine", engine, "--conversations", str(a.conversations),
                               "--max-seq-len", str(a.max_seq_len)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
        results[engine] = json.loads(line.removeprefix("RESULT "))
        print(f"{engine:16s} {results[engine]['trained_tokens_per_s']:8.1f} trained tokens/s   "
              f"peak RSS {results[engine]['peak_rss_gb']:.2f} GB   ({results[engine]['trained_tokens']} tokens "
              f"in {results[engine]['train_runtime_s']:.1f} s)")
    summary = {"conversations": a.conversations, "max_seq_len": a.max_seq_len, "epochs": 1, "quick": a.quick,
               "data": "eden_sample.jsonl subset", **results}
    if "edentune" in results:
        ours = results["edentune"]["trained_tokens_per_s"]
        for peer in (e for e in results if e != "edentune"):
            summary[f"speedup_vs_{peer}"] = ours / results[peer]["trained_tokens_per_s"]
            print(f"edentune / {peer}: {summary[f'speedup_vs_{peer}']:.2f}x")
        # every engine must have trained the same tokens, or the rates compare different work
        summary["same_trained_tokens"] = len({r["trained_tokens"] for r in results.values()}) == 1
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
