"""What the user sees during training: metrics.jsonl, health warnings, a Rich progress bar.

Trainer's callbacks give the numbers (loss, grad norm, LR, eval loss); these add trained tokens/s,
peak memory and the health findings, append one JSON object per event to `<run>/metrics.jsonl`
(flushed, so a killed run keeps its history) and replace Trainer's tqdm bar with Rich.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from .health import HealthMonitor


def peak_memory_gb() -> float:
    """CUDA peak allocated memory, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


class MetricsLog:
    """Append-only JSONL event log."""

    def __init__(self, path: str | Path):
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        self.fh.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, ensure_ascii=False) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class MonitorCallback(TrainerCallback):
    """Per log: tokens/s over training time only (eval and saving excluded), peak memory, health."""

    def __init__(self, log: MetricsLog, trained_tokens: Callable[[], int], max_grad_norm: float, console: Console):
        self.log, self.trained_tokens, self.console = log, trained_tokens, console
        self.health = HealthMonitor(max_grad_norm)
        self.step_started = 0.0
        self.window_time = 0.0
        self.window_tokens = 0

    def on_step_begin(self, args, state, control, **kw):
        self.step_started = time.perf_counter()
        self.tokens_at_start = self.trained_tokens()

    def on_step_end(self, args, state, control, **kw):
        self.window_time += time.perf_counter() - self.step_started
        self.window_tokens += self.trained_tokens() - self.tokens_at_start

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        common = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "peak_memory_gb": round(peak_memory_gb(), 3)}
        if "loss" in logs:
            tps = self.window_tokens / self.window_time if self.window_time else None
            self.window_time, self.window_tokens = 0.0, 0
            self.log.write("train", **common, loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                           grad_norm=logs.get("grad_norm"), trained_tokens_per_s=tps)
            self._report(self.health.on_train_log(logs["loss"], logs.get("grad_norm")), state)
        elif "eval_loss" in logs:
            self.log.write("eval", **common, eval_loss=logs["eval_loss"], eval_perplexity=logs.get("eval_perplexity"))
            self._report(self.health.on_eval(logs["eval_loss"]), state)
        else:
            self.log.write("summary", **{**logs, **common})

    def _report(self, findings, state) -> None:
        for f in findings:
            self.console.print(f"[yellow]warning ({f.kind}, step {state.global_step}):[/] {f.message}\n  remedy: {f.remedy}")
            self.log.write("health", step=state.global_step, kind=f.kind, message=f.message, remedy=f.remedy)


class RichProgressCallback(TrainerCallback):
    """A Rich bar with ETA and the latest losses, in place of Trainer's tqdm."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console,
        )
        self.task = None
        self.info: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kw):
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kw):
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        for key, label, fmt in (("loss", "loss", ".3f"), ("eval_loss", "val", ".3f"), ("learning_rate", "lr", ".1e")):
            if key in logs:
                self.info[label] = format(logs[key], fmt)
        self.progress.update(self.task, info="  ".join(f"{k} {v}" for k, v in self.info.items()))

    def on_train_end(self, args, state, control, **kw):
        self.close()

    def close(self) -> None:
        self.progress.stop()
