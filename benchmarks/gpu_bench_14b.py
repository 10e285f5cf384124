"""Issue 11's side-by-side: Qwen2.5-14B QLoRA at batch 4 x 2048, edentune vs what users pick instead.

Engines, each in its own subprocess (its own peak memory; an OOM in one does not end the others),
all on the Qwen2.5-14B architecture with random weights built directly in NF4 + double quant
(`gpu_train.build_qlora_base`: the bf16 model never exists), LoRA r=32 / alpha 64 / dropout 0.05
on the seven projections, gradient checkpointing (non-reentrant), paged 8-bit AdamW, bf16,
batch 4, the same synthetic conversations (lengths 512-2048, the first quarter of each is the
prompt with label -100, the rest the assistant reply):

- `edentune` (packed) and `edentune-padded` (length-grouped): the recipe's model path (bf16 residual stream: no fp32 upcast; Liger RMSNorm/RoPE/
  SwiGLU via `training.kernels`; trained-position loss through Liger's fused linear
  cross-entropy), `EdenTrainer`, padding-free packed batches (flash-attn varlen when installed,
  else SDPA with the block-diagonal mask transformers builds from restarting position_ids).
- `edentune-offload`: `edentune` with `training.offload_checkpoints` (the layer inputs saved by
  gradient checkpointing wait in pinned host RAM, `edentune.train.offload`).
- `trl`: TRL `SFTTrainer` with `use_liger_kernel=True`, `padding_free=True`, the loss on the
  assistant tokens only (pre-tokenized rows with `assistant_masks`, which TRL folds into labels:
  what `assistant_only_loss=True` produces from a chat template), `peft_config`.
- `trainer`: plain transformers `Trainer` + PEFT after `prepare_model_for_kbit_training`,
  `group_by_length`, padded batches, transformers' default loss.
- `unsloth`: reported as skipped unless importable (its loader wants a saved checkpoint).

Reports per engine: trained (label != -100) tokens/s over the timed steps (the first 2 are
warm-up: triton autotuning), MFU (4N + 6·L·s·d per token over the 989 TFLOP/s bf16 spec and a
measured matmul peak, s = mean sequence length), peak allocated and reserved, and `edentune plan`'s
estimate for the same settings. JSON to --out (default $OUT/gpu_bench_14b.json).

The GPU machine has no internet: bring the wheels it lacks. On a machine with PyPI access:

    pip download --no-deps -d benchmarks/wheels bitsandbytes==0.50.2 trl==1.16.0 liger-kernel==0.8.5
    # run, carrying benchmarks/wheels (~45 MB):
    pip install --no-deps benchmarks/wheels/*.whl && python benchmarks/gpu_bench_14b.py

    python benchmarks/gpu_bench_14b.py --tiny      # CPU, a tiny Qwen2: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

# edentune-padded: the same recipe with length-grouped padded batches, in case packing under SDPA
# (no flash-attn wheel on the GPU machine) costs more than the padding it saves.
# edentune-offload: the recipe with `training.offload_checkpoints` (layer inputs in pinned host RAM),
# the setting that is predicted to bring 4 x 2048 under the 17 GB.
ENGINES = ("edentune", "edentune-offload", "edentune-padded", "trl", "trainer", "unsloth")
NEEDED = {"bitsandbytes": "bitsandbytes==0.50.2", "trl": "trl==1.16.0", "peft": "peft", "datasets": "datasets"}
NEEDED_GPU = {"liger_kernel": "liger-kernel==0.8.5", "triton": "triton"}
SPEC_PEAK = 989e12  # H100/H200 SXM bf16 dense


def missing_modules(tiny: bool) -> list[str]:
    need = {**NEEDED, **({} if tiny else NEEDED_GPU)}
    return [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]


def conversations(n: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token ids with assistant masks: lengths uniform in [max_len/4, max_len], first quarter prompt."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(max_len // 4, max_len)
        prompt = length // 4
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        mask = [0] * prompt + [1] * (length - prompt)
        out.append({"input_ids": ids, "assistant_masks": mask, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return out


class StepClock:
    """A TrainerCallback (built lazily: transformers is imported in the child only)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.marks: list[float] = []

            def on_step_begin(self, args, state, control, **kw):
                if not self.marks:
                    self.marks.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks.append(time.perf_counter())

        return _Clock()


def counting(collate, counts: list[int]):
    def wrapped(features):
        batch = collate(features)
        counts.append(int((batch["labels"][..., 1:] != -100).sum()))
        return batch
    return wrapped


def base_model(tiny: bool, device: str):
    import torch
    from gpu_train import QWEN25_14B, SMOKE, build_qlora_base
    from transformers import Qwen2Config

    config = Qwen2Config(**(SMOKE if tiny else QWEN25_14B), use_sliding_window=False)
    attn = "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = build_qlora_base(config, device)
    model.config.use_cache = False
    return model, config


def edentune_config(a):
    from edentune.config import config_for_model

    return config_for_model("qwen2.5-14b").updated({
        "model.max_seq_len": a.seq, "training.per_device_batch_size": a.batch, "training.gradient_accumulation_steps": 1,
        "training.max_steps": a.steps, "training.warmup_steps": 1, "training.logging_steps": 1, "training.save_steps": 10**6,
        "training.eval_steps": 10**6, "training.load_best_model_at_end": False, "training.early_stopping_patience": None,
        "training.optimizer": "paged_adamw_8bit" if not a.tiny else "adamw_8bit", "training.batching": "packed",
        "training.kernels": "auto" if not a.tiny else "none",
    })


def run_engine(engine: str, a) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments

    from edentune.data.encode import to_dataset

    device = "cpu" if a.tiny else "cuda"
    if engine == "unsloth":
        if importlib.util.find_spec("unsloth") is None:
            return {"skipped": "unsloth is not installed (bring its wheels to compare it)"}
        return {"skipped": "unsloth's FastLanguageModel loads saved checkpoints; the random NF4 build is not one"}
    model, config = base_model(a.tiny, device)
    data = conversations(a.batch * a.steps, a.seq, config.vocab_size)
    lora = dict(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"], bias="none", task_type="CAUSAL_LM")
    common = dict(output_dir=str(Path(a.work) / engine), per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                  max_steps=a.steps, learning_rate=2e-5, warmup_steps=1, logging_steps=1, save_strategy="no",
                  report_to="none", disable_tqdm=True, bf16=not a.tiny, use_cpu=a.tiny, seed=0,
                  optim="paged_adamw_8bit" if not a.tiny else "adamw_torch", gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0, remove_unused_columns=False)
    counts: list[int] = []
    clock = StepClock()
    info: dict = {"attn": config._attn_implementation}
    if engine.startswith("edentune"):
        from edentune.train.recipe import apply_kernels, training_arguments
        from edentune.train.trainer import EdenTrainer

        cfg = edentune_config(a)
        model.requires_grad_(False)  # the bf16 stream: load_training_model's path without the fp32 upcast
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        info["liger"] = model.edentune_liger = apply_kernels(model, cfg, device)
        model = get_peft_model(model, LoraConfig(**lora))
        args = training_arguments(cfg, Path(common["output_dir"]), device, torch.bfloat16 if not a.tiny else torch.float32,
                                  has_eval=False, lr=2e-5, optim=common["optim"], gradient_checkpointing=False)
        packed = engine != "edentune-padded"
        collate = (DataCollatorWithFlattening(return_position_ids=True) if packed
                   else DataCollatorForSeq2Seq(pad_tokenizer(), padding="longest", label_pad_token_id=-100))
        trainer = EdenTrainer(model=model, args=args, train_dataset=to_dataset_from(data), length_grouped=not packed,
                              data_collator=counting(collate, counts), offload_checkpoints=engine == "edentune-offload")
    elif engine == "trl":
        from trl import SFTConfig, SFTTrainer

        from datasets import Dataset

        liger = not a.tiny
        args = SFTConfig(**common, max_length=None, padding_free=True,  # rows are already <= seq tokens
                         use_liger_kernel=liger, dataset_num_proc=None)
        rows = Dataset.from_dict({"input_ids": [d["input_ids"] for d in data], "assistant_masks": [d["assistant_masks"] for d in data]})
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, peft_config=LoraConfig(**lora),
                             processing_class=pad_tokenizer())
        trainer.data_collator = counting(trainer.data_collator, counts)
        info["liger"] = liger
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(**lora))
        args = TrainingArguments(**common, train_sampling_strategy="group_by_length")
        collate = DataCollatorForSeq2Seq(pad_tokenizer(), padding="longest", label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=to_dataset(_encoded(data)), data_collator=counting(collate, counts))
    trainer.add_callback(clock)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    warm = min(2, max(0, a.steps - 2))
    step_times = [b - e for e, b in zip(clock.marks, clock.marks[1:])]
    timed_s = sum(step_times[warm:])
    timed_tokens = sum(counts[warm:len(step_times)])
    mean_len = sum(len(d["input_ids"]) for d in data) / len(data)
    from gpu_train import base_params

    N, L, d = base_params(config), config.num_hidden_layers, config.hidden_size
    tps = timed_tokens / timed_s if timed_s else None
    out = {**info, "steps": a.steps, "timed_steps": len(step_times) - warm, "train_s": total, "trained_tokens_per_s": tps,
           "mean_seq_len": mean_len, "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)}
    if tps:
        out["model_flops_per_token"] = 4 * N + 6 * L * mean_len * d
        out["mfu_spec"] = tps * out["model_flops_per_token"] / SPEC_PEAK
    if device == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        import resource

        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def pad_tokenizer():
    """A tokenizer that only pads: the rows are pre-tokenized (random ids), but TRL and transformers'
    collators read pad_token_id / padding_side from one. Built locally: no hub access on the GPU."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="<pad>", unk_token="<unk>")
    tok.padding_side = "right"
    return tok


def _encoded(data):
    from edentune.data.encode import Encoded

    return [Encoded(f"synthetic:{i}", d["input_ids"], d["labels"]) for i, d in enumerate(data)]


def to_dataset_from(data):
    from edentune.data.encode import to_dataset

    return to_dataset(_encoded(data))


def planner(a) -> dict:
    try:
        from edentune.train.plan import KNOWN_ARCHITECTURES, estimate

        arch = KNOWN_ARCHITECTURES["Qwen/Qwen2.5-14B-Instruct"]
        plans = {"edentune": estimate(edentune_config(a), arch, 24),
                 "edentune-offload": estimate(edentune_config(a).updated({"training.offload_checkpoints": True}), arch, 24)}
        return {k: {"total_gb": p.total_gb, "terms": p.terms} for k, p in plans.items()}
    except Exception as err:  # report, never lose the measurement for it
        return {"error": repr(err)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny Qwen2, a few steps: checks the script only")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_bench_14b.json")
    ap.add_argument("--work", default="/tmp/gpu_bench_14b")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    if a.tiny:
        a.steps, a.seq = min(a.steps, 4), min(a.seq, 128)
    if a.engine:
        if a.tiny:
            import torch

            torch.set_num_threads(min(2, os.cpu_count() or 1))
        print("RESULT " + json.dumps(run_engine(a.engine, a)), flush=True)
        return
    missing = missing_modules(a.tiny)
    if missing:
        sys.exit("missing packages: " + ", ".join(missing) + "\nbring their wheels (no internet on the GPU machine): on a machine "
                 "with PyPI, `pip download --no-deps -d benchmarks/wheels " + " ".join(missing) + "`, carry benchmarks/wheels, "
                 "and `pip install --no-deps benchmarks/wheels/*.whl` before this script")
    if not a.tiny:
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny on CPU")
    t_start = time.time()
    results = {}
    for engine in a.engines:
        cmd = [sys.executable, __file__, "--engine", engine, "--steps", str(a.steps), "--seq", str(a.seq),
               "--batch", str(a.batch), "--work", a.work] + (["--tiny"] if a.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        results[engine] = json.loads(line.removeprefix("RESULT ")) if line else {"failed": proc.stderr[-2500:]}
        print(engine, json.dumps(results[engine])[:600], flush=True)
    import torch

    summary = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.tiny else "cpu",
        "tiny": a.tiny, "batch": a.batch, "seq": a.seq, "steps": a.steps, "torch": torch.__version__,
        "packages": {p: _version(p) for p in ("transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "flash-attn", "accelerate")},
        "git_commit": _git(), "engines": results, "planner_24gb": planner(a), "total_s": time.time() - t_start,
    }
    ok = {k: v["trained_tokens_per_s"] for k, v in results.items() if v.get("trained_tokens_per_s")}
    if "edentune" in ok and "trl" in ok:
        summary["edentune_over_trl"] = ok["edentune"] / ok["trl"]  # target >= 1.2
    if "edentune-offload" in ok and "trl" in ok:
        summary["edentune_offload_over_trl"] = ok["edentune-offload"] / ok["trl"]
    if "edentune" in ok and "trainer" in ok:
        summary["edentune_over_trainer"] = ok["edentune"] / ok["trainer"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {a.out} in {summary['total_s']:.0f} s")


def _version(pkg: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    main()
