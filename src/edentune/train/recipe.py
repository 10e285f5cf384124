"""The training recipe: config in, adapter out.

    data -> token ids with assistant-only labels -> base (4-bit NF4 or plain) + LoRA
         -> EdenTrainer (length-grouped batches, eval/save/early stopping, NaN rollback)
         -> best checkpoint loaded -> <run>/adapter

Everything the run needs to be reproduced or audited goes to `<run>/manifest.json`; every logged
event to `<run>/metrics.jsonl` and TensorBoard (`<run>/tensorboard`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from edentune.config import RunConfig
from edentune.errors import EdentuneError
from edentune.io import atomic_dir, file_sha256, write_json_atomic
from edentune.models import load_base_model, load_tokenizer, pick_device, pick_dtype, resolve_model_dir

from .data import encode_all, load_splits, to_dataset
from .dropout import use_cheap_lora_dropout
from .monitor import MetricsLog, MonitorCallback, RichProgressCallback

log = logging.getLogger(__name__)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "trl", "edentune")


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    best_checkpoint: Path | None
    metrics: dict = field(default_factory=dict)


# -- components ---------------------------------------------------------------------------------
def load_training_model(cfg: RunConfig, model_dir: str, device: str, dtype: torch.dtype, adapter: str | Path | None = None):
    """Base model (4-bit NF4 for QLoRA, else plain) wrapped with a fresh LoRA adapter, or with
    `adapter` (a saved PEFT adapter, made trainable: e.g. the SFT adapter for preference tuning)."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise EdentuneError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)",
                            hint="pass a run's adapter folder, e.g. runs/eden/adapter")
    q, gc = cfg.quantization, cfg.training.gradient_checkpointing
    model = load_base_model(model_dir, load_in_4bit=q.load_in_4bit, quant_type=q.quant_type, double_quant=q.double_quant,
                            compute_dtype=q.compute_dtype, dtype=dtype, device=device,
                            trust_remote_code=cfg.model.trust_remote_code)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    ckpt_kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs, no input-grad hack
    if q.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=ckpt_kwargs)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if adapter is not None:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    lora = cfg.lora
    set_seed(cfg.training.seed)  # LoRA A is initialised from the global RNG: same seed, same adapter
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_rslora=lora.use_rslora, bias="none", task_type="CAUSAL_LM",
    ))


def engine_model(cfg: RunConfig, model_dir: str, device: str, dtype: torch.dtype, adapter: str | Path | None = None):
    """The training model as edentune's engine runs it: on CPU, LoRA inputs use `CheapDropout`."""
    model = load_training_model(cfg, model_dir, device, dtype, adapter)
    if device == "cpu":
        use_cheap_lora_dropout(model)
    return model


def packing_supported(device: str) -> bool:
    # Packing is only leak-free with flash-attention's varlen kernels (FACTS: sdpa/eager leak).
    return device == "cuda" and importlib.util.find_spec("flash_attn") is not None


def training_arguments(cfg: RunConfig, run_dir: Path, device: str, dtype: torch.dtype, has_eval: bool, lr: float,
                       args_class=None, **overrides):
    """Trainer arguments from the config; `args_class` (e.g. TRL's KTOConfig) and `overrides` for other trainers."""
    from transformers import TrainingArguments

    t = cfg.training
    return (args_class or TrainingArguments)(**{**dict(
        output_dir=str(run_dir), seed=t.seed, data_seed=t.seed,
        per_device_train_batch_size=t.per_device_batch_size, per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_epochs, max_steps=t.max_steps or -1,
        learning_rate=lr, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim=t.optimizer,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device == "cpu",
        logging_steps=t.logging_steps, eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_steps,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end and has_eval,
        metric_for_best_model="eval_loss", greater_is_better=False,
        restore_callback_states_from_checkpoint=True,  # early-stopping patience survives --resume
        remove_unused_columns=False, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    ), **overrides})


def last_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def write_manifest(run_dir: Path, cfg: RunConfig, tokenizer, device: str, dtype: torch.dtype, data_stats: dict, resumed: bool) -> None:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    files = [*cfg.data.train_files, *cfg.data.validation_files]
    write_json_atomic(run_dir / "manifest.json", {
        "config": cfg.model_dump(mode="json"),
        "datasets": {f: file_sha256(f) for f in files},
        "data": data_stats,
        "chat_template": tokenizer.chat_template,
        "packages": {p: version(p) for p in PACKAGES},
        "seed": cfg.training.seed,
        "device": device if device != "cuda" else f"cuda ({torch.cuda.get_device_name(0)})",
        "dtype": str(dtype).removeprefix("torch."),
        "git_commit": git_commit(),
        "resumed": resumed,
    })


def oom_error(cfg: RunConfig) -> EdentuneError:
    t = cfg.training
    msg = (f"out of GPU memory (batch {t.per_device_batch_size} x {cfg.model.max_seq_len} tokens, "
           f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}, optimizer {t.optimizer})")
    if importlib.util.find_spec("edentune.train.plan") is not None and torch.cuda.is_available():
        try:
            from transformers import AutoConfig

            from edentune.train.plan import estimate

            model_config = AutoConfig.from_pretrained(resolve_model_dir(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.architecture))
            plan = estimate(cfg, model_config, torch.cuda.get_device_properties(0).total_memory / 2**30)
            msg += f"; the planner estimates {plan.total_gb:.1f} GB for this config"
        except Exception as err:  # the planner is advice: never mask the OOM itself
            log.warning("memory planner failed: %s", err)
    return EdentuneError(msg, hint=(
        "halve training.per_device_batch_size and double gradient_accumulation_steps (same effective batch); "
        "turn on training.gradient_checkpointing; use optimizer paged_adamw_8bit; lower model.max_seq_len; "
        "`edentune plan CONFIG` shows the memory budget"))


def prepare_data(cfg: RunConfig, tokenizer, console: Console):
    """Encoded train and validation examples, with overlong handling reported (never silent)."""
    m = cfg.model
    train_convs, val_convs = load_splits(cfg.data)
    train_set, train_stats = encode_all(tokenizer, train_convs, m.max_seq_len, m.overlong, m.system_prompt)
    val_set, val_stats = encode_all(tokenizer, val_convs, m.max_seq_len, m.overlong, m.system_prompt)
    if not train_set:
        raise EdentuneError("no training conversation fits model.max_seq_len", hint="raise model.max_seq_len or use overlong: truncate")
    for name, s in (("train", train_stats), ("validation", val_stats)):
        if s.dropped_overlong or s.truncated:
            console.print(f"{name}: {s.dropped_overlong} conversation(s) longer than max_seq_len={m.max_seq_len} dropped, "
                          f"{s.truncated} truncated (model.overlong={m.overlong})")
    if not val_set:
        console.print("[yellow]no validation data[/]: evaluation, best-checkpoint selection and early stopping are off")
    stats = {name: {k: v for k, v in vars(st).items() if k != "dropped_sources"}
             for name, st in (("train", train_stats), ("validation", val_stats))}
    return train_set, val_set, stats


# -- the recipe ---------------------------------------------------------------------------------
def train(cfg: RunConfig, resume: bool = False, callbacks: list | tuple = (), console: Console | None = None,
          init_adapter: str | Path | None = None) -> TrainResult:
    """Train `cfg`'s LoRA from scratch, or continue `init_adapter` (a saved PEFT adapter, e.g. the
    live round's in `edentune cycle`) on this data; `resume` continues this run's last checkpoint."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening
    from transformers.integrations import TensorBoardCallback

    from .trainer import EdenTrainer

    console = console or Console(stderr=True)
    t = cfg.training
    run_dir = Path(t.output_dir)
    existing = last_checkpoint(run_dir)
    if existing and not resume:
        raise EdentuneError(f"{run_dir} already has checkpoints ({Path(existing).name})",
                            hint="continue it with `edentune train CONFIG --resume`, or set training.output_dir to a new directory")
    checkpoint = existing if resume else None
    if resume and checkpoint is None:
        console.print(f"no complete checkpoint in {run_dir}: starting from the beginning")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".checkpoint-*"):  # temporaries of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)

    device = pick_device()
    dtype = pick_dtype(t.precision, device)
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.architecture)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"  # labels are -100 on padding either way; right keeps positions 0..n-1
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels come from the assistant spans, not from pad ids

    train_set, val_set, data_stats = prepare_data(cfg, tokenizer, console)
    has_eval = bool(val_set)

    # Batching: length-grouped (default) or random order, padded to the longest in the batch.
    batching = t.batching
    if batching == "packed" and not packing_supported(device):
        console.print("packing needs flash-attention varlen on CUDA (otherwise sequences attend to each other): "
                      "using length-grouped batches instead")
        batching = "length_grouped"
    collator = (DataCollatorWithFlattening() if batching == "packed"
                else DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    if device == "cpu" and t.optimizer.startswith("paged"):
        console.print("note: paged optimizers need CUDA; bitsandbytes uses the non-paged 8-bit AdamW on CPU")

    write_manifest(run_dir, cfg, tokenizer, device, dtype, data_stats, resumed=checkpoint is not None)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    metrics_log.write("start", resume_from=checkpoint, data=data_stats, device=device,
                      init_adapter=str(init_adapter) if init_adapter else None)
    tb_writer = SummaryWriter(str(run_dir / "tensorboard"))

    model = engine_model(cfg, model_dir, device, dtype, adapter=init_adapter)
    if batching == "packed":
        model.set_attn_implementation("flash_attention_2")
    rollback_lr, rollbacks = None, 0
    try:
        while True:
            trainer = EdenTrainer(
                model=model, args=training_arguments(cfg, run_dir, device, dtype, has_eval, rollback_lr or t.learning_rate),
                train_dataset=to_dataset(train_set), eval_dataset=to_dataset(val_set) if has_eval else None,
                data_collator=collator, processing_class=tokenizer,
                length_grouped=batching == "length_grouped", rollback_lr=rollback_lr,
            )
            _install_callbacks(trainer, cfg, has_eval, metrics_log, tb_writer, console, callbacks)
            progress = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RichProgressCallback))
            try:
                trainer.train(resume_from_checkpoint=checkpoint)
            except torch.OutOfMemoryError:
                raise oom_error(cfg) from None
            finally:
                progress.close()
            if not trainer.non_finite:
                break
            # NaN/Inf: roll back to the last complete checkpoint, halve the LR, continue.
            if rollbacks >= t.nan_max_retries:
                raise EdentuneError(f"training diverged ({trainer.non_finite}) after {rollbacks} rollback(s)",
                                    hint="lower training.learning_rate, raise warmup_steps, check the data for extreme examples")
            rollbacks += 1
            rollback_lr = trainer.lr_scheduler.base_lrs[0] / 2
            checkpoint = last_checkpoint(run_dir)
            console.print(f"[red]non-finite {trainer.non_finite}[/]: rolling back to {Path(checkpoint).name if checkpoint else 'the start'} "
                          f"with learning rate {rollback_lr:.2e} (retry {rollbacks}/{t.nan_max_retries})")
            metrics_log.write("nan_rollback", reason=trainer.non_finite, checkpoint=checkpoint, learning_rate=rollback_lr, retry=rollbacks)
            if checkpoint is None:
                model = engine_model(cfg, model_dir, device, dtype, adapter=init_adapter)  # nothing to roll back to: start again

        trainer.remove_callback(TensorBoardCallback)  # it closed its writer at train end; metrics.jsonl gets this one
        final_eval = trainer.evaluate() if has_eval else {}
        adapter_dir = run_dir / "adapter"
        with atomic_dir(adapter_dir) as tmp:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        state = trainer.state
        best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
        metrics = {
            "global_step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
            "stopped_early": state.global_step < state.max_steps, "best_checkpoint": str(best) if best else None,
            "best_eval_loss": state.best_metric, "final_eval_loss": final_eval.get("eval_loss"),
            "final_eval_perplexity": final_eval.get("eval_perplexity"), "nan_rollbacks": rollbacks,
            "trained_tokens": trainer.trained_tokens, "data": data_stats,
        }
        write_json_atomic(run_dir / "result.json", metrics)
        metrics_log.write("end", **{k: v for k, v in metrics.items() if k != "data"})
    finally:
        metrics_log.close()
        tb_writer.close()
    console.print(f"[green]done[/]: adapter at {adapter_dir}" + (f" (best checkpoint {best.name}, val loss {state.best_metric:.4f})" if best else ""))
    return TrainResult(run_dir, adapter_dir, best, metrics)


def _install_callbacks(trainer, cfg: RunConfig, has_eval: bool, metrics_log, tb_writer, console, extra) -> None:
    from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback
    from transformers.integrations import TensorBoardCallback

    for default in (PrinterCallback, ProgressCallback):  # replaced by the Rich bar and metrics.jsonl
        trainer.remove_callback(default)
    t = cfg.training
    trainer.add_callback(TensorBoardCallback(tb_writer=tb_writer))
    trainer.add_callback(MonitorCallback(metrics_log, lambda: trainer.trained_tokens, t.max_grad_norm, console))
    trainer.add_callback(RichProgressCallback(console))
    if has_eval and t.early_stopping_patience and t.load_best_model_at_end:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    for cb in extra:
        trainer.add_callback(cb)
