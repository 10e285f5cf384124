"""The torch training engine: config in, adapter out (the run's skeleton is `run.py`).

    data -> token ids with assistant-only labels -> base (4-bit NF4 or plain) + LoRA
         -> EdenTrainer (length-grouped batches, eval/save/early stopping)
         -> best checkpoint loaded -> <run>/adapter

Every logged event goes to `<run>/metrics.jsonl` and TensorBoard (`<run>/tensorboard`). Under
`accelerate launch` every process runs this engine and only the main one writes those files
(`distributed.py`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import re
import zipfile
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from edentune.config import RunConfig
from edentune.errors import ConfigError, EdentuneError
from edentune.models import check_adapter_dir, load_adapter, load_base_model, load_tokenizer, pick_device, pick_dtype, resolve_model_dir

from edentune.data.encode import Encoded

from .distributed import check_supported, current_processes, load_device
from .dropout import use_cheap_lora_dropout
from .monitor import MonitorCallback, RichProgressCallback
from edentune.presets import fast_cpu_4bit

from .run import RunDir, prepare_data, write_manifest

log = logging.getLogger(__name__)


# -- components ---------------------------------------------------------------------------------
def load_training_model(cfg: RunConfig, model_dir: str, device: str, dtype: torch.dtype, adapter: str | Path | None = None,
                        fsdp: bool = False):
    """Base model (4-bit NF4 for QLoRA, else plain) wrapped with a fresh LoRA adapter, or with
    `adapter` (a saved PEFT adapter, made trainable: e.g. the SFT adapter for preference tuning).

    `fsdp`: the model will be sharded by FSDP, which needs one dtype for all parameters: the 4-bit
    weights are stored in `dtype` and the fp32 upcast of `prepare_model_for_kbit_training` is
    skipped, as TRL does for sharded QLoRA (trl/experimental/utils.py)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    if adapter is not None:
        check_adapter_dir(adapter)  # before the base is loaded: a broken adapter fails in a second, not minutes
    q, gc = cfg.quantization, cfg.training.gradient_checkpointing
    model = load_base_model(model_dir, load_in_4bit=q.load_in_4bit, quant_type=q.quant_type, double_quant=q.double_quant,
                            compute_dtype=q.compute_dtype, dtype=dtype, device=device,
                            trust_remote_code=cfg.model.trust_remote_code,
                            # FSDP shards the packed 4-bit weights only as floating-point tensors of the
                            # model's dtype: with the uint8 default accelerate leaves them out of FSDP2
                            # sharding (a full copy per GPU) and FSDP can train with loss 0 / NaN
                            # gradients (accelerate#3983).
                            quant_storage=dtype if fsdp else torch.uint8)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if q.load_in_4bit and device == "cpu":
        keep_cpu_4bit_layout(model)
    model.edentune_liger = apply_kernels(model, cfg, device)  # read by trained_token_loss
    ckpt_kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs, no input-grad hack
    if q.load_in_4bit and not fsdp and residual_dtype(cfg, device, dtype) == torch.float32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=ckpt_kwargs)
    else:
        # bf16 stream: what prepare_model_for_kbit_training does minus its fp32 upcast of embeddings,
        # head and norms (TRL's SFT path does not call it either). The upcast makes the whole residual
        # stream and every checkpoint fp32, since bitsandbytes returns its input's dtype: 5.8 GB of
        # embedding/head and 7.5 GB of checkpoints for 14B at 4 x 2048. Llama/Qwen2 RMSNorm still
        # compute in fp32 inside (they upcast the input, then cast back), and the chunked loss
        # upcasts its logits.
        model.requires_grad_(False)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if adapter is not None:
        return load_adapter(model, adapter, trainable=True)
    lora = cfg.lora
    set_seed(cfg.training.seed)  # LoRA A is initialised from the global RNG: same seed, same adapter
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_rslora=lora.use_rslora, bias="none", task_type="CAUSAL_LM",
    ), autocast_adapter_dtype=not fsdp)


def keep_cpu_4bit_layout(model) -> None:
    """Keep bitsandbytes' 4-bit weights in one layout for the whole run on CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights into a CPU layout
    the first time it runs in eval mode without gradients (`Linear4bit.forward`), and the next
    state_dict (every checkpoint save: PEFT reads the whole model's) converts them back,
    re-quantizing the double-quantized scales differently: the frozen base changes in memory, and
    what it computes depends on when the run last evaluated and saved. A run resumed from
    checkpoint-N (fresh base) and the uninterrupted run (evaluated and saved at N) then trained the
    next steps on different bases: adapters differed by up to 1.4e-3 instead of being identical.
    Off here, the base is the same bytes from step 1 whatever was evaluated or saved when, and
    `--resume` is exact. (The packed kernel is faster, but where a save follows each evaluation,
    as in the presets, the save undid it before training went on: training ran on this layout.)"""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def residual_dtype(cfg: RunConfig, device: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a QLoRA run's residual stream (see `training.residual_dtype`)."""
    want = cfg.training.residual_dtype
    bf16_compute = dtype == torch.bfloat16 and cfg.quantization.compute_dtype == "bf16"
    if want == "auto":
        return torch.bfloat16 if device.startswith("cuda") and bf16_compute else torch.float32  # cuda or cuda:N
    if want == "bf16" and not bf16_compute:
        raise ConfigError(f"training.residual_dtype: bf16 needs bf16 compute (this run computes in "
                          f"{str(dtype).removeprefix('torch.')}, quantization.compute_dtype {cfg.quantization.compute_dtype})",
                          hint="set training.precision: bf16 and quantization.compute_dtype: bf16, or residual_dtype: auto")
    return torch.bfloat16 if want == "bf16" else torch.float32


def use_liger(cfg: RunConfig, device: str) -> bool:
    """`training.kernels`: whether this run uses Liger's fused kernels (CUDA only; the CPU path is plain)."""
    want = cfg.training.kernels
    installed = importlib.util.find_spec("liger_kernel") is not None
    if want == "liger":
        if not device.startswith("cuda"):
            raise ConfigError(f"training.kernels: liger needs CUDA (this run trains on {device})",
                              hint="set training.kernels: auto (plain kernels off CUDA) or none")
        if not installed:
            raise ConfigError("training.kernels: liger, but liger-kernel is not installed",
                              hint="pip install 'edentune[cuda]' (liger-kernel, flash-attn), or set training.kernels: auto")
    return want != "none" and device.startswith("cuda") and installed


def apply_kernels(model, cfg: RunConfig, device: str) -> bool:
    """Liger's RMSNorm, RoPE and SwiGLU on the base model's modules (before LoRA wraps the
    projections: the fused SwiGLU calls gate/up/down, so LoRA still applies). The loss is not
    patched here: edentune's trained-position loss calls Liger's fused linear cross-entropy itself
    (`train.trainer.trained_token_loss`)."""
    if not use_liger(cfg, device):
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def engine_model(cfg: RunConfig, model_dir: str, device: str, dtype: torch.dtype, adapter: str | Path | None = None,
                 fsdp: bool = False):
    """The training model as edentune's engine runs it: on CPU, LoRA inputs use `CheapDropout`."""
    model = load_training_model(cfg, model_dir, device, dtype, adapter, fsdp=fsdp)
    if device == "cpu":
        use_cheap_lora_dropout(model)
    return model


def flash_attention_available(device: str) -> bool:
    return device == "cuda" and importlib.util.find_spec("flash_attn") is not None


def resolve_batching(batching: str, device: str) -> str:
    """`training.batching` for this device. Padding-free packing (DataCollatorWithFlattening:
    position_ids restart per sequence, no attention mask, no cache) is exact under SDPA and eager
    attention too: transformers >= 5 turns restarting position_ids into a block-diagonal causal
    mask (tests/train/test_train_packing.py), and flash-attention's varlen kernel does the same
    without a mask. `auto` packs only where it is sure to be the faster choice: with flash-attention
    on CUDA. Under SDPA the packed batch needs that explicit mask, so SDPA loses its fused causal
    kernel and computes scores over the whole packed row, quadratic in batch x length: on CPU,
    measured on the embedded preset, packed batches took 1.30x as long as length-grouped ones
    (docs/benchmarks.md), so `auto` keeps length-grouped batches off CUDA."""
    if batching == "auto":
        return "packed" if flash_attention_available(device) else "length_grouped"
    return batching


def training_arguments(cfg: RunConfig, run_dir: Path, device: str, dtype: torch.dtype, has_eval: bool, lr: float,
                       args_class=None, **overrides):
    """Trainer arguments from the config; `args_class` (e.g. TRL's KTOConfig) and `overrides` for other trainers."""
    from transformers import TrainingArguments

    from .trackers import trainer_report_to

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
        remove_unused_columns=False, report_to=trainer_report_to(cfg), disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient each step: skip DDP's graph scan
    ), **overrides})


_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR naming
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")  # Trainer restores both or neither


def _torch_file_problem(path: Path) -> str | None:
    # torch.save writes a zip archive: its central directory and CRCs reveal truncation and garbage
    # without unpickling anything (Trainer itself later loads these with weights_only=True).
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"{path.name} is truncated or not a torch file ({err})"
    return f"{path.name} is damaged (bad checksum in {bad})" if bad else None


def checkpoint_problem(ckpt: Path, need_optimizer: bool = True) -> str | None:
    """Why `--resume` cannot continue from `ckpt` exactly (None: it can)."""
    state = ckpt / "trainer_state.json"
    try:
        data = json.loads(state.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        return f"trainer_state.json is unreadable ({err})"
    if not isinstance(data, dict) or not isinstance(data.get("global_step"), int) or not isinstance(data.get("log_history", []), list):
        return "trainer_state.json has no valid global_step / log_history"
    try:
        check_adapter_dir(ckpt)
    except EdentuneError as err:
        return str(err.args[0]).removeprefix(f"{ckpt}/").removeprefix(f"{ckpt}: ")
    for name in OPTIMIZER_FILES:
        f = ckpt / name
        if not f.exists():
            if need_optimizer:
                return f"no {name}: resuming would restart the optimizer (Adam moments, learning-rate schedule) from zero"
            continue
        if problem := _torch_file_problem(f):
            return problem
    rng = ckpt / "rng_state.pth"
    return _torch_file_problem(rng) if rng.exists() else None


def resume_checkpoint(run_dir: Path, console: Console, fresh_optimizer: bool = False) -> str | None:
    """The newest checkpoint of `run_dir` that `--resume` can continue from exactly.

    A damaged or incomplete newer checkpoint (truncated weights or optimizer, bad
    trainer_state.json, no optimizer.pt) is skipped with a warning naming it and why, and the
    previous complete one is used; it stays on disk and is replaced when training reaches its step
    again. When none is usable the error lists each. `fresh_optimizer` accepts a checkpoint without
    optimizer/scheduler state (explicitly: the optimizer then starts from zero).
    """
    if not run_dir.is_dir():
        return None
    found = sorted((int(m.group(1)), d) for d in run_dir.iterdir() if d.is_dir() and (m := _CHECKPOINT_DIR.match(d.name)))
    broken: list[tuple[Path, str]] = []
    for _, ckpt in reversed(found):
        problem = checkpoint_problem(ckpt, need_optimizer=not fresh_optimizer)
        if problem is None:
            break
        broken.append((ckpt, problem))
    else:
        ckpt = None
    if broken:
        listed = "\n".join(f"  {c.name}: {why}" for c, why in broken)
        no_optimizer = any(why.startswith("no optimizer.pt") or why.startswith("no scheduler.pt") for _, why in broken)
        fresh_hint = (" or `--fresh-optimizer` to continue the newest weights with a new optimizer state"
                      if no_optimizer else "")
        if ckpt is None:
            raise EdentuneError(f"no checkpoint in {run_dir} can be resumed from:\n{listed}",
                                hint=f"start again with a new training.output_dir (or remove these checkpoints){fresh_hint}")
        console.print(f"[yellow]warning:[/] cannot resume from {len(broken)} newer checkpoint(s):\n{escape(listed)}\n"
                      f"resuming from {ckpt.name}, the newest complete one (the others stay on disk and are replaced "
                      f"when training reaches their step again{'; use --fresh-optimizer to keep their weights' if no_optimizer else ''})",
                      highlight=False, markup=True)
    if ckpt is not None and fresh_optimizer and any(not (ckpt / f).exists() for f in OPTIMIZER_FILES):
        console.print(f"[yellow]warning:[/] --fresh-optimizer: {ckpt.name} has no optimizer/scheduler state; the weights "
                      "continue, the optimizer and the learning-rate schedule start again from zero", highlight=False)
    return str(ckpt) if ckpt is not None else None


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


def to_dataset(examples: list[Encoded]):
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [e.input_ids for e in examples],
        "attention_mask": [[1] * len(e.input_ids) for e in examples],
        "labels": [e.labels for e in examples],
    })


# -- the torch engine ------------------------------------------------------------------------------
class TorchEngine:
    """SFT with transformers' Trainer (`EdenTrainer`): one process, or each rank under `accelerate launch`."""

    output_key, label = "training.output_dir", ""

    def __init__(self, cfg: RunConfig, *, init_adapter: str | Path | None = None, callbacks: list | tuple = (),
                 console: Console | None = None, fresh_optimizer: bool = False):
        self.cfg, self.init_adapter, self.callbacks, self.fresh_optimizer = cfg, init_adapter, callbacks, fresh_optimizer
        self.run = RunDir(cfg.training.output_dir)
        self.device = pick_device()
        self.procs = current_processes(self.device)
        check_supported(cfg, self.device, self.procs)
        self.main = self.procs.main
        # The main process speaks for all.
        self.console = (console or Console(stderr=True)) if self.main else Console(stderr=True, quiet=True)
        self.tb_writer = self.trainer = None

    def resume_checkpoint(self) -> str | None:
        return resume_checkpoint(self.run.path, self.console, self.fresh_optimizer)

    def prepare(self, checkpoint: str | None) -> dict:
        from torch.utils.tensorboard import SummaryWriter
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

        cfg, t, device = self.cfg, self.cfg.training, self.device
        self.dtype = pick_dtype(t.precision, device)
        self.model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.architecture)
        tok = self.tokenizer = load_tokenizer(self.model_dir, cfg.model.trust_remote_code)
        tok.padding_side = "right"  # labels are -100 on padding either way; right keeps positions 0..n-1
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # safe: labels come from the assistant spans, not from pad ids
        self.train_set, self.val_set, self.data_stats = prepare_data(cfg, tok, self.console)
        # Batching: packed (padding-free) or length-grouped / random order padded to the longest in the batch.
        self.batching = resolve_batching(t.batching, device)
        self.collator = (DataCollatorWithFlattening() if self.batching == "packed"
                         else DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
        if t.offload_checkpoints and not device.startswith("cuda"):
            self.console.print(f"note: training.offload_checkpoints applies to CUDA only; on {device} the checkpoints stay where they are")
        if device == "cpu" and cfg.quantization.load_in_4bit and not fast_cpu_4bit():
            self.console.print("[yellow]warning:[/] bitsandbytes' 4-bit layers are about 30x slower on this CPU (x86 without "
                               "AVX512: every weight is dequantized at each step); for a small model set "
                               "quantization.load_in_4bit: false, or train where a GPU or AVX512 is")
        if device == "cpu" and t.optimizer.startswith("paged"):
            self.console.print("note: paged optimizers need CUDA; bitsandbytes uses the non-paged 8-bit AdamW on CPU")
        if self.main:
            shown = device if device != "cuda" else f"cuda ({torch.cuda.get_device_name(0)})"
            write_manifest(self.run, cfg, tok, shown, str(self.dtype).removeprefix("torch."), self.data_stats,
                           resumed=checkpoint is not None, processes=self.procs.num, fsdp=self.procs.fsdp)
            self.tb_writer = SummaryWriter(str(self.run.tensorboard_dir))
        self.model_device = load_device(device, self.procs)
        self.model = self._fresh_model()
        if self.batching == "packed" and flash_attention_available(device):
            self.model.set_attn_implementation("flash_attention_2")  # varlen kernel: no block-diagonal mask to build
        return {"data": self.data_stats, "device": device, "processes": self.procs.num}

    def _fresh_model(self):
        return engine_model(self.cfg, self.model_dir, self.model_device, self.dtype, adapter=self.init_adapter, fsdp=self.procs.fsdp)

    def fit(self, checkpoint: str | None, lr: float | None) -> str | None:
        from .trainer import EdenTrainer

        t = self.cfg.training
        if lr is not None and checkpoint is None:
            self.model = self._fresh_model()  # a rollback with nothing to roll back to: start again
        has_eval = bool(self.val_set)
        trainer = self.trainer = EdenTrainer(
            model=self.model, args=training_arguments(self.cfg, self.run.path, self.device, self.dtype, has_eval, lr or t.learning_rate),
            train_dataset=to_dataset(self.train_set), eval_dataset=to_dataset(self.val_set) if has_eval else None,
            data_collator=self.collator, processing_class=self.tokenizer,
            length_grouped=self.batching == "length_grouped", rollback_lr=lr,
            offload_checkpoints=t.offload_checkpoints and self.device.startswith("cuda"),
        )
        _install_callbacks(trainer, self.cfg, has_eval, self.metrics_log, self.tb_writer, self.console, self.callbacks)
        progress = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RichProgressCallback)]
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        except torch.OutOfMemoryError:
            raise oom_error(self.cfg) from None
        finally:
            for bar in progress:
                bar.close()
        return trainer.non_finite

    def base_lr(self) -> float:
        return self.trainer.lr_scheduler.base_lrs[0]

    def finish(self) -> dict:
        from transformers.integrations import TensorBoardCallback

        trainer = self.trainer
        trainer.remove_callback(TensorBoardCallback)  # it closed its writer at train end; metrics.jsonl gets this one
        final_eval = trainer.evaluate() if self.val_set else {}
        # FSDP: every process takes part in gathering the sharded weights; the main one writes them.
        self._weights = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
        state = trainer.state
        return {
            "global_step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
            "stopped_early": state.global_step < state.max_steps, "best_checkpoint": state.best_model_checkpoint,
            "best_eval_loss": state.best_metric, "final_eval_loss": final_eval.get("eval_loss"),
            "final_eval_perplexity": final_eval.get("eval_perplexity"),
            "trained_tokens": trainer.trained_tokens, "data": self.data_stats,
        }

    def write_adapter(self, folder: Path) -> None:
        self.trainer.model.save_pretrained(folder, state_dict=self._weights)

    def wait_for_everyone(self) -> None:
        self.trainer.accelerator.wait_for_everyone()

    def close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()


def _install_callbacks(trainer, cfg: RunConfig, has_eval: bool, metrics_log, tb_writer, console, extra) -> None:
    from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback
    from transformers.integrations import TensorBoardCallback

    for default in (PrinterCallback, ProgressCallback):  # replaced by the Rich bar and metrics.jsonl
        trainer.remove_callback(default)
    t = cfg.training
    if tb_writer is not None:  # the main process: it alone logs, draws progress and reports health
        trainer.add_callback(TensorBoardCallback(tb_writer=tb_writer))
        trainer.add_callback(MonitorCallback(metrics_log, lambda: trainer.trained_tokens, t.max_grad_norm, console))
        trainer.add_callback(RichProgressCallback(console))
    if has_eval and t.early_stopping_patience and t.load_best_model_at_end:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    for cb in extra:
        trainer.add_callback(cb)
