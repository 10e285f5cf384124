"""One skeleton for every training run; the engines only say how to load, fit and save.

    open the run folder (refuse, resume or start; clean up a killed save)
      -> engine.prepare: tokenizer, data, model, manifest.json        -> metrics.jsonl "start"
      -> engine.fit; on a non-finite loss or gradient: back to the last good checkpoint at half
         the learning rate, at most training.nan_max_retries times
      -> engine.finish: best checkpoint, final validation loss
      -> <run>/adapter (PEFT layout + tokenizer, atomic) -> result.json -> metrics.jsonl "end"

The engines are torch SFT (`recipe.TorchEngine`, also under `accelerate launch`), MLX SFT
(`mlx_backend.MlxEngine`) and KTO/DPO (`preference.PreferenceEngine`). `edentune.train.train()`
picks the SFT engine for `training.backend` and hands it everything (`init_adapter`, `resume`),
so no option can miss a backend. `RunDir` names what a run leaves, for the cycle and export to read.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from edentune.errors import ConfigError, DataError, EdentuneError
from edentune.io import atomic_dir, ensure_dir, file_sha256, write_json_atomic

from edentune.data.eden_layout import request_layout
from edentune.data.encode import encode_all, load_splits
from .health import diverged_error
from .monitor import MetricsLog

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "trl", "mlx", "mlx-lm", "edentune")
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file: every engine writes the adapter in PEFT's layout
MLX_4BIT = {"nf4": "affine", "fp4": "mxfp4"}  # closest MLX 4-bit format to bitsandbytes' quant_type
MLX_GROUP_SIZE = {"affine": 64, "mxfp4": 32}
MLX_HINT = "pip install 'edentune[mlx]' (on Linux this installs mlx[cpu]), or set training.backend: torch"


@dataclass(frozen=True)
class RunDir:
    """A training run's folder: what `Workspace` is to a cycle, this is to one run."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def adapter_weights(self) -> Path:
        return self.adapter_dir / ADAPTER_WEIGHTS

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def finished(self) -> bool:
        """The run wrote its adapter and result.json (the last two things a run writes)."""
        return self.result_path.is_file() and self.adapter_weights.is_file()

    def result(self) -> dict | None:
        import json

        try:
            return json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return None

    def adapter_sha256(self) -> str | None:
        return file_sha256(self.adapter_weights) if self.adapter_weights.is_file() else None

    def last_checkpoint(self) -> str | None:
        # transformers' naming (checkpoint-N with trainer_state.json); the MLX engine writes the same.
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(str(self.path)) if self.path.is_dir() else None


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    best_checkpoint: Path | None
    metrics: dict = field(default_factory=dict)


# -- backend selection ----------------------------------------------------------------------------
def mlx_installed() -> bool:
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def select_backend(requested: str) -> str:
    """`auto` is MLX on Apple Silicon with MLX installed (bitsandbytes has no Metal kernels), else torch."""
    if requested == "mlx":
        if not mlx_installed():
            raise EdentuneError("training.backend is mlx but mlx / mlx-lm are not installed", hint=MLX_HINT)
        return "mlx"
    if requested == "auto":
        return "mlx" if apple_silicon() and mlx_installed() else "torch"
    return "torch"


def quantization_summary(cfg, backend: str) -> str:
    """How `backend` ("torch" or "mlx") quantizes the base under this config, in words: the two
    backends' 4-bit formats differ (bitsandbytes NF4/FP4 vs mlx-lm's affine/mxfp4), so the
    config's quant_type alone does not say what runs."""
    q = cfg.quantization
    if not q.load_in_4bit:
        return "LoRA: base not quantized"
    if backend == "mlx":
        mode = MLX_4BIT[q.quant_type]
        return f"QLoRA: MLX {mode} 4-bit base in groups of {MLX_GROUP_SIZE[mode]}"
    return f"QLoRA: bitsandbytes 4-bit {q.quant_type.upper()} base"


# -- the skeleton ---------------------------------------------------------------------------------
def open_run(engine, resume: bool) -> str | None:
    """Check the run folder and return the checkpoint to resume from (None: start fresh)."""
    run, console = engine.run, engine.console
    if run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"{engine.output_key} {run.path} is a file, not a folder",
                          hint=f"set {engine.output_key} to a new folder; the run writes checkpoints and the adapter there")
    existing = run.last_checkpoint()
    if existing and not resume:
        raise EdentuneError(f"{run.path} already has checkpoints ({Path(existing).name})",
                            hint="continue it with `edentune train CONFIG --resume`, or set training.output_dir to a new directory")
    if run.finished() and not resume:
        raise EdentuneError(f"{run.path} already holds a trained adapter", hint=f"set {engine.output_key} to a new directory")
    checkpoint = engine.resume_checkpoint() if resume else None
    if checkpoint is None and (resume or engine.init_adapter):
        start = f"training continues from the adapter {engine.init_adapter}" if engine.init_adapter else "starting from the base model"
        console.print((f"no checkpoint in {run.path}: " if resume else "") + start, markup=False)
    ensure_dir(run.path)
    if engine.main:
        for stale in run.path.glob(".checkpoint-*"):  # temporaries of a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
    return checkpoint


def run_training(engine, *, resume: bool = False) -> TrainResult:
    """Drive `engine` through the run (see the module docstring). An engine has:

    run (RunDir), console, main (this process writes files), init_adapter, output_key (the
    config key naming the folder), label (words before "adapter" in the last line), and
    resume_checkpoint(), prepare(checkpoint) -> start fields, fit(checkpoint, lr) -> None or the
    non-finite reason, base_lr(), finish() -> metrics, write_adapter(folder), close(); optionally
    wait_for_everyone() and tracker_tags (training.report_to). `engine.metrics_log` and
    `engine.tracking` are set here before `fit`."""
    from .trackers import TrackerSession

    run, console, t = engine.run, engine.console, engine.cfg.training
    checkpoint = open_run(engine, resume)
    start = engine.prepare(checkpoint)
    metrics_log = engine.metrics_log = MetricsLog(run.metrics_path, enabled=engine.main)
    metrics_log.write("start", resume_from=checkpoint, init_adapter=str(engine.init_adapter) if engine.init_adapter else None, **start)
    tracking = engine.tracking = TrackerSession(engine.cfg, run.path, run.path.name, params=engine.cfg.model_dump(mode="json"),
                                                tags=getattr(engine, "tracker_tags", None), enabled=engine.main)
    metrics = None
    try:
        lr, rollbacks = None, 0  # None: the configured learning rate and schedule
        while (reason := engine.fit(checkpoint, lr)) is not None:
            if rollbacks >= t.nan_max_retries:
                raise diverged_error(reason, rollbacks)
            rollbacks += 1
            # The checkpoint's optimizer moments and step count come back under a schedule with a
            # halved base LR: the run continues at half the LR it had at that step.
            lr = engine.base_lr() / 2
            checkpoint = engine.resume_checkpoint()
            console.print(f"[red]non-finite {reason}[/]: rolling back to {Path(checkpoint).name if checkpoint else 'the start'} "
                          f"with learning rate {lr:.2e} (retry {rollbacks}/{t.nan_max_retries})")
            metrics_log.write("nan_rollback", reason=reason, checkpoint=checkpoint, learning_rate=lr, retry=rollbacks)
        metrics = {**engine.finish(), "nan_rollbacks": rollbacks}
        if engine.main:
            with atomic_dir(run.adapter_dir) as tmp:
                engine.write_adapter(tmp)
                engine.tokenizer.save_pretrained(tmp)
            write_json_atomic(run.result_path, metrics)
        metrics_log.write("end", **{k: v for k, v in metrics.items() if k != "data"})
        getattr(engine, "wait_for_everyone", lambda: None)()  # the adapter is in place when any process returns
    finally:
        metrics_log.close()
        engine.close()
        tracking.close(metrics, failed=metrics is None or not run.finished())
    best = Path(metrics["best_checkpoint"]) if metrics.get("best_checkpoint") else None
    best_loss = metrics.get("best_eval_loss")
    console.print(f"[green]done[/]: {engine.label}adapter at {run.adapter_dir}"
                  + (f" (best checkpoint {best.name}, val loss {best_loss:.4f})" if best and best_loss is not None else ""))
    return TrainResult(run.path, run.adapter_dir, best, metrics)


# -- pieces every SFT engine uses --------------------------------------------------------------------
def prepare_data(cfg, tokenizer, console: Console):
    """Encoded train and validation examples, with overlong handling reported (never silent)."""
    m = cfg.model
    layout = request_layout(cfg.export)  # eden: one single-turn example per reply, as the app asks
    train_convs, val_convs = (layout.conversations(c) for c in load_splits(cfg.data))
    files = ", ".join(cfg.data.train_files)
    if not train_convs and val_convs:
        raise DataError(f"no training conversations left: the validation split took all {len(val_convs)} of {files}",
                        hint="add more conversations, or list data.validation_files so every training file is trained on")
    if not train_convs:
        raise DataError(f"no training conversations in {files}: the data is empty",
                        hint="point data.train_files at ChatML JSONL with conversations (check it with `edentune data validate`)")
    train_set, train_stats = encode_all(tokenizer, train_convs, m.max_seq_len, m.overlong, m.system_prompt)
    val_set, val_stats = encode_all(tokenizer, val_convs, m.max_seq_len, m.overlong, m.system_prompt)
    if not train_set:
        raise DataError(f"none of the {len(train_convs)} training conversation(s) fits model.max_seq_len={m.max_seq_len} "
                        f"(the longest has {train_stats.longest} tokens; {train_stats.dropped_overlong} dropped, "
                        f"model.overlong={m.overlong})",
                        hint="raise model.max_seq_len or use overlong: truncate")
    for name, s in (("train", train_stats), ("validation", val_stats)):
        if s.dropped_overlong or s.truncated:
            console.print(f"{name}: {s.dropped_overlong} conversation(s) longer than max_seq_len={m.max_seq_len} dropped, "
                          f"{s.truncated} truncated (model.overlong={m.overlong})")
    if not val_set:
        console.print("[yellow]no validation data[/]: evaluation, best-checkpoint selection and early stopping are off")
    stats = {name: {k: v for k, v in vars(st).items() if k != "dropped_sources"}
             for name, st in (("train", train_stats), ("validation", val_stats))}
    return train_set, val_set, stats


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


def write_manifest(run: RunDir, cfg, tokenizer, device: str, dtype: str, data_stats: dict, resumed: bool,
                   processes: int = 1, fsdp: bool = False) -> None:
    """Everything the run needs to be reproduced or audited: config, data hashes, template, versions."""
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    files = [*cfg.data.train_files, *cfg.data.validation_files]
    write_json_atomic(run.path / "manifest.json", {
        "config": cfg.model_dump(mode="json"),
        "datasets": {f: file_sha256(f) for f in files},
        "data": data_stats,
        "chat_template": tokenizer.chat_template,
        "packages": {p: version(p) for p in PACKAGES},
        "seed": cfg.training.seed,
        "device": device,
        "dtype": dtype,
        "git_commit": git_commit(),
        "resumed": resumed,
        "processes": processes,
        "fsdp": fsdp,
    })
