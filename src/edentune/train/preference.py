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
from edentune.errors import DataError
from edentune.models import load_tokenizer, pick_device, pick_dtype, resolve_model_dir

from edentune.data.encode import with_system_prompt
from .monitor import MetricsLog, RichProgressCallback
from .recipe import engine_model, oom_error, training_arguments
from .run import RunDir, run_training


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


class _LogToMetrics(TrainerCallback):
    """Every Trainer log (loss, rewards, margins, KL, LR) as a `train` event in metrics.jsonl."""

    def __init__(self, log: MetricsLog):
        self.log = log

    def on_log(self, args, state, control, logs=None, **kw):
        self.log.write("train", step=state.global_step, **{k: v for k, v in (logs or {}).items()})


class PreferenceEngine:
    """TRL's KTOTrainer / DPOTrainer on the config's QLoRA model, behind the run skeleton."""

    output_key, main, init_adapter = "preference.output_dir", True, None

    def __init__(self, cfg: RunConfig, rows: list[dict], data_file: str | Path, adapter: str | Path | None, console: Console):
        self.cfg, self.rows, self.data_file, self.adapter, self.console = cfg, rows, data_file, adapter, console
        p = cfg.preference
        self.method, self.label = p.method, f"{p.method.upper()} "
        self.tracker_tags = {"step": p.method}
        self.run = RunDir(p.output_dir or f"{cfg.training.output_dir}-{p.method}")

    def resume_checkpoint(self) -> None:
        return None  # one short pass (save_strategy "no"): a killed one starts again

    def prepare(self, checkpoint: None) -> dict:
        from datasets import Dataset
        from trl import DPOConfig, KTOConfig

        cfg, p, rows = self.cfg, self.cfg.preference, self.rows
        device = pick_device()
        dtype = pick_dtype(cfg.training.precision, device)
        model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.architecture)
        tok = self.tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.dataset = Dataset.from_list([{**r, "prompt": with_system_prompt(r["prompt"], cfg.model.system_prompt)} for r in rows])
        extra: dict = {"beta": p.beta, "max_length": cfg.model.max_seq_len}
        if p.method == "kto":
            up = sum(bool(r["label"]) for r in rows)
            extra["desirable_weight"], extra["undesirable_weight"] = kto_weights(up, len(rows) - up)
        self.args = training_arguments(
            cfg, self.run.path, device, dtype, has_eval=False, lr=p.learning_rate, args_class=KTOConfig if p.method == "kto" else DPOConfig,
            num_train_epochs=p.num_epochs, max_steps=p.max_steps or -1, warmup_steps=p.warmup_steps,
            load_best_model_at_end=False, save_strategy="no", **extra,
        )
        self.model = engine_model(cfg, model_dir, device, dtype, self.adapter)  # the SFT adapter continues, when given
        return {"method": p.method, "examples": len(rows), "data": str(self.data_file), "adapter": str(self.adapter) if self.adapter else None,
                "weights": [extra["desirable_weight"], extra["undesirable_weight"]] if p.method == "kto" else None}

    def fit(self, checkpoint: None, lr: float | None) -> None:
        from transformers import PrinterCallback, ProgressCallback
        from trl import DPOTrainer, KTOTrainer

        progress = RichProgressCallback(self.console)
        trainer_class = KTOTrainer if self.method == "kto" else DPOTrainer
        self.trainer = trainer_class(model=self.model, args=self.args, train_dataset=self.dataset, processing_class=self.tokenizer,
                                     callbacks=[_LogToMetrics(self.metrics_log), progress])
        for default in (PrinterCallback, ProgressCallback):
            self.trainer.remove_callback(default)
        try:
            self.out = self.trainer.train()
        except torch.OutOfMemoryError:
            raise oom_error(self.cfg) from None
        finally:
            progress.close()
        return None  # TRL's trainers report no non-finite step to roll back from

    def base_lr(self) -> float:
        return self.cfg.preference.learning_rate

    def finish(self) -> dict:
        logged = [e for e in self.trainer.state.log_history if "loss" in e]
        return {"method": self.method, "examples": len(self.rows), "global_step": self.trainer.state.global_step,
                "train_loss": self.out.training_loss, "last_log": logged[-1] if logged else {},
                "continued_from": str(self.adapter) if self.adapter else None}

    def write_adapter(self, folder: Path) -> None:
        # Only the trained adapter: the frozen "ref" copy TRL added is not part of the result.
        self.trainer.model.save_pretrained(folder, selected_adapters=["default"])

    def close(self) -> None:
        pass


def train_preferences(cfg: RunConfig, data_file: str | Path, *, adapter: str | Path | None = None,
                      console: Console | None = None) -> PreferenceResult:
    engine = PreferenceEngine(cfg, read_preferences(data_file, cfg.preference.method), data_file, adapter, console or Console(stderr=True))
    result = run_training(engine)
    return PreferenceResult(result.run_dir, result.adapter_dir, engine.method, len(engine.rows), result.metrics)
