"""Learning from thumbs up/down: TRL's KTO (unpaired ratings) or DPO (pairs) on the QLoRA adapter.

The data comes from `edentune data feedback` (kto.jsonl / dpo.jsonl in TRL's conversational
format). Training continues the SFT adapter when one is given: TRL copies it into a frozen "ref"
adapter, so the reference policy is the SFT model (not the bare base) and the KL pull keeps the
model near what SFT taught. Without an adapter a fresh LoRA is trained against the base.

TRL's trainers do the preference losses; edentune adds what its SFT recipe has: the config's
QLoRA model and optimizer settings, KTO's class weights from the counts (KTO paper Eq. 8), the
chat template the export writes, metrics.jsonl + progress with ETA, and an atomic adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from transformers import TrainerCallback

from edentune.config import RunConfig
from edentune.data.feedback import kto_weights
from edentune.data.records import read_lines
from edentune.errors import DataError, EdentuneError
from edentune.io import atomic_dir, ensure_dir, write_json_atomic
from edentune.models import load_tokenizer, pick_device, pick_dtype, resolve_model_dir

from .monitor import MetricsLog, RichProgressCallback
from .recipe import engine_model, oom_error, training_arguments
from .trackers import TrackerSession


@dataclass
class PreferenceResult:
    run_dir: Path
    adapter_dir: Path
    method: str
    examples: int
    metrics: dict


def read_preferences(path: str | Path, method: str) -> list[dict]:
    """Rows of kto.jsonl ({prompt, completion, label}) or dpo.jsonl ({prompt, chosen, rejected})."""
    keys = {"kto": ("prompt", "completion", "label"), "dpo": ("prompt", "chosen", "rejected")}[method]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such preference file", hint="write it with `edentune data feedback FEEDBACK.jsonl -o DIR`")
    rows = []
    # The data stage's reader: encodings, gzip, deep nesting, huge numbers and lone surrogates
    # become one line's reason here too, never a traceback.
    for item in read_lines(path):
        if item.blank:
            continue
        if item.error is not None:
            raise DataError(f"{item.source}: not JSON ({item.error})", hint="regenerate it with `edentune data feedback`")
        row = item.record
        missing = [k for k in keys if k not in row]
        if missing:
            raise DataError(f"{item.source}: missing {', '.join(missing)} for {method.upper()}",
                            hint=f"{method} needs {'kto.jsonl' if method == 'kto' else 'dpo.jsonl'} from `edentune data feedback`")
        rows.append({k: row[k] for k in keys})
    if not rows:
        raise DataError(f"{path}: no preferences", hint="collect thumbs up/down first")
    if method == "kto" and len({r["label"] for r in rows}) < 2:
        raise DataError(f"{path}: only {'thumbs-up' if rows[0]['label'] else 'thumbs-down'} ratings",
                        hint="KTO learns from the contrast: it needs both thumbs up and thumbs down")
    return rows


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    # Training always states the system prompt; preference rows get the same one the SFT data had.
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


class _LogToMetrics(TrainerCallback):
    """Every Trainer log (loss, rewards, margins, KL, LR) as a `train` event in metrics.jsonl."""

    def __init__(self, log: MetricsLog):
        self.log = log

    def on_log(self, args, state, control, logs=None, **kw):
        self.log.write("train", step=state.global_step, **{k: v for k, v in (logs or {}).items()})


def train_preferences(cfg: RunConfig, data_file: str | Path, *, adapter: str | Path | None = None,
                      console: Console | None = None) -> PreferenceResult:
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    console = console or Console(stderr=True)
    p = cfg.preference
    rows = read_preferences(data_file, p.method)
    run_dir = Path(p.output_dir or f"{cfg.training.output_dir}-{p.method}")
    if (run_dir / "adapter").exists():
        raise EdentuneError(f"{run_dir} already holds a trained adapter", hint="set preference.output_dir to a new directory")
    ensure_dir(run_dir)

    device = pick_device()
    dtype = pick_dtype(cfg.training.precision, device)
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.architecture)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list([{**r, "prompt": _with_system(r["prompt"], cfg.model.system_prompt)} for r in rows])
    extra: dict = {"beta": p.beta, "max_length": cfg.model.max_seq_len}
    if p.method == "kto":
        up = sum(bool(r["label"]) for r in rows)
        extra["desirable_weight"], extra["undesirable_weight"] = kto_weights(up, len(rows) - up)
    args = training_arguments(
        cfg, run_dir, device, dtype, has_eval=False, lr=p.learning_rate, args_class=KTOConfig if p.method == "kto" else DPOConfig,
        num_train_epochs=p.num_epochs, max_steps=p.max_steps or -1, warmup_steps=p.warmup_steps,
        load_best_model_at_end=False, save_strategy="no", **extra,
    )
    trainer_class = KTOTrainer if p.method == "kto" else DPOTrainer
    model = engine_model(cfg, model_dir, device, dtype, adapter)  # the SFT adapter continues, when given
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    metrics_log.write("start", method=p.method, examples=len(rows), data=str(data_file), adapter=str(adapter) if adapter else None,
                      weights=[extra["desirable_weight"], extra["undesirable_weight"]] if p.method == "kto" else None)
    progress = RichProgressCallback(console)
    tracking = TrackerSession(cfg, run_dir, run_dir.name, params=cfg.model_dump(mode="json"), tags={"step": p.method})
    metrics = None
    try:
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                callbacks=[_LogToMetrics(metrics_log), progress])
        for default in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(default)
        try:
            out = trainer.train()
        except torch.OutOfMemoryError:
            raise oom_error(cfg) from None
        finally:
            progress.close()
        adapter_dir = run_dir / "adapter"
        with atomic_dir(adapter_dir) as tmp:
            # Only the trained adapter: the frozen "ref" copy TRL added is not part of the result.
            trainer.model.save_pretrained(tmp, selected_adapters=["default"])
            tokenizer.save_pretrained(tmp)
        logged = [e for e in trainer.state.log_history if "loss" in e]
        metrics = {"method": p.method, "examples": len(rows), "global_step": trainer.state.global_step,
                   "train_loss": out.training_loss, "last_log": logged[-1] if logged else {}, "continued_from": str(adapter) if adapter else None}
        write_json_atomic(run_dir / "result.json", metrics)
        metrics_log.write("end", **metrics)
    finally:
        metrics_log.close()
        tracking.close(metrics, failed=metrics is None)
    console.print(f"[green]done[/]: {p.method.upper()} adapter at {adapter_dir}")
    return PreferenceResult(run_dir, adapter_dir, p.method, len(rows), metrics)
