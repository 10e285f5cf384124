"""Trained tokens/s: edentune's engine vs a plain transformers Trainer + PEFT baseline.

Same model (the embedded SmolLM2-135M, the embedded preset: 4-bit NF4 base, LoRA r=32 on seven
projections, batch 4), same data (the bundled Eden sample: 83-1,174 tokens per conversation,
max_seq_len 1024 so that real length spread is kept), same assistant-only labels, optimizer and
schedule. The difference is the engine: edentune groups batches by length and computes the loss
on trained positions only; the baseline is a plain `Trainer` with random batches, each padded to
its longest sample (already kinder than padding to max_length, which many baselines do), and
transformers' default loss. Each side runs in its own subprocess so peak RSS is its own.

    python benchmarks/bench_train.py --conversations 64 --out bench_train.json

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


def bench_config(data: str, out_dir: Path):
    from edentune.config import config_for_model

    return config_for_model("embedded").updated({
        "model.max_seq_len": 1024,
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


def run_baseline(cfg) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer

    from edentune.models import load_tokenizer, pick_device, pick_dtype, resolve_model_dir
    from edentune.train.data import IGNORE, encode_all, load_splits, to_dataset
    from edentune.train.recipe import load_training_model, training_arguments

    m = cfg.model
    model_dir = resolve_model_dir(m.name_or_path, m.gguf_file, m.architecture)
    tok = load_tokenizer(model_dir)
    tok.padding_side = "right"
    train_convs, _ = load_splits(cfg.data)
    examples, _ = encode_all(tok, train_convs, m.max_seq_len, m.overlong, m.system_prompt)
    device = pick_device()
    dtype = pick_dtype(cfg.training.precision, device)
    pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE)
    counted = {"trained_tokens": 0}

    def collate(features):  # counts what the model trains on, same definition as edentune
        batch = pad(features)
        counted["trained_tokens"] += int((batch["labels"][:, 1:] != IGNORE).sum())
        return batch

    args = training_arguments(cfg, Path(cfg.training.output_dir), device, dtype, has_eval=False, lr=cfg.training.learning_rate)
    args.train_sampling_strategy = "random"
    trainer = Trainer(model=load_training_model(cfg, model_dir, device, dtype), args=args,
                      train_dataset=to_dataset(examples), data_collator=collate, processing_class=tok)
    out = trainer.train()
    return {"trained_tokens": counted["trained_tokens"], "train_runtime_s": out.metrics["train_runtime"]}


def child(engine: str, conversations: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(data_file(Path(tmp), conversations), Path(tmp) / "run")
        res = (run_edentune if engine == "edentune" else run_baseline)(cfg)
    res["trained_tokens_per_s"] = res["trained_tokens"] / res["train_runtime_s"]
    res["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=64, help="subset size, trained for one epoch")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--engine", choices=["edentune", "baseline"], help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    if a.engine:
        return child(a.engine, a.conversations)
    results = {}
    for engine in ("baseline", "edentune"):
        proc = subprocess.run([sys.executable, __file__, "--engine", engine, "--conversations", str(a.conversations)],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
        results[engine] = json.loads(line.removeprefix("RESULT "))
        print(f"{engine:9s} {results[engine]['trained_tokens_per_s']:8.1f} trained tokens/s   "
              f"peak RSS {results[engine]['peak_rss_gb']:.2f} GB   ({results[engine]['trained_tokens']} tokens "
              f"in {results[engine]['train_runtime_s']:.1f} s)")
    ratio = results["edentune"]["trained_tokens_per_s"] / results["baseline"]["trained_tokens_per_s"]
    summary = {"conversations": a.conversations, "epochs": 1, "data": "eden_sample.jsonl subset", **results,
               "speedup": ratio, "memory_ok": results["edentune"]["peak_rss_gb"] <= results["baseline"]["peak_rss_gb"]}
    print(f"speedup {ratio:.2f}x (target >= 1.5x); peak memory not above baseline: {summary['memory_ok']}")
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
