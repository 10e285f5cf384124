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

from edentune.io import check_outputs

from .health import HealthMonitor


def peak_memory_gb() -> float:
    """CUDA peak allocated memory, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


class MetricsLog:
    """Append-only JSONL event log."""

    def __init__(self, path: str | Path, enabled: bool = True):
        """`enabled=False`: writes nothing (the other processes of a multi-process run)."""
        self.fh = None
        if enabled:
            check_outputs((), [path])  # appended to: a directory, fifo or device there is refused, not written
            self.fh = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        if self.fh is None:
            return
        self.fh.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, ensure_ascii=False) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


class MonitorCallback(TrainerCallback):
    """Per log: tokens/s over training time only (eval and saving excluded), peak memory, health."""

    def __init__(self, log: MetricsLog, trained_tokens: Callable[[], int], max_grad_norm: float, console: Console):
        self.log, self.trained_tokens, self.console = log, trained_tokens, console
        self.health = HealthMonitor(max_grad_norm)
        self.step_started = 0.0
        self.window_time = 0.0
        self.window_tokens = 0
        self.finished = False  # after train end, an evaluation scores the loaded best checkpoint

    def on_train_begin(self, args, state, control, **kw):
        self.tokens_counted = self.trained_tokens()  # restored from the checkpoint when resuming

    def on_step_begin(self, args, state, control, **kw):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        # The trainer counts a step's tokens when it fetches its batches, before on_step_begin.
        self.window_time += time.perf_counter() - self.step_started
        self.window_tokens += self.trained_tokens() - self.tokens_counted
        self.tokens_counted = self.trained_tokens()

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        common = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "peak_memory_gb": round(peak_memory_gb(), 3)}
        if "loss" in logs:
            tps = self.window_tokens / self.window_time if self.window_time else None
            self.window_time, self.window_tokens = 0.0, 0
            self.log.write("train", **common, loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                           grad_norm=logs.get("grad_norm"), trained_tokens_per_s=tps)
            self._report(self.health.on_train_log(logs["loss"], logs.get("grad_norm")), state)
        elif "eval_loss" in logs and self.finished:
            # Not a point of the validation curve (same step as the last periodic eval, but the
            # best checkpoint's weights) and not news for the health checks.
            self.log.write("final_eval", **common, eval_loss=logs["eval_loss"], eval_perplexity=logs.get("eval_perplexity"))
        elif "eval_loss" in logs:
            self.log.write("eval", **common, eval_loss=logs["eval_loss"], eval_perplexity=logs.get("eval_perplexity"))
            self._report(self.health.on_eval(logs["eval_loss"]), state)
        else:
            self.log.write("summary", **{**logs, **common})

    def on_train_end(self, args, state, control, **kw):
        self.finished = True

    def _report(self, findings, state) -> None:
        for f in findings:
            self.console.print(f"[yellow]warning ({f.kind}, step {state.global_step}):[/] {f.message}\n  remedy: {f.remedy}")
            self.log.write("health", step=state.global_step, kind=f.kind, message=f.message, remedy=f.remedy)


class RichProgressCallback(TrainerCallback):
    """A Rich bar with ETA and the latest losses, in place of Trainer's tqdm.

    Rich draws nothing live when output is not a terminal (a log file, nohup, CI), which would
    leave a long run silent: there, a plain line with step, losses and ETA is printed instead, at
    most every `PLAIN_EVERY_S` seconds and at every evaluation.
    """

    PLAIN_EVERY_S = 30.0

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console, disable=not self.live,
        )
        self.task = None
        self.info: dict[str, str] = {}
        self.started = self.last_plain = 0.0
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kw):
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")
        self.started = self.last_plain = time.monotonic()
        self.first_step = state.global_step

    def on_step_end(self, args, state, control, **kw):
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        for key, label, fmt in (("loss", "loss", ".3f"), ("eval_loss", "val", ".3f"), ("learning_rate", "lr", ".1e")):
            if key in logs:
                self.info[label] = format(logs[key], fmt)
        info = "  ".join(f"{k} {v}" for k, v in self.info.items())
        self.progress.update(self.task, info=info)
        now = time.monotonic()
        if not self.live and ("eval_loss" in logs or now - self.last_plain >= self.PLAIN_EVERY_S):
            self.last_plain = now
            done = state.global_step - self.first_step
            eta = (now - self.started) / done * (state.max_steps - state.global_step) if done else float("nan")
            self.console.print(f"train step {state.global_step}/{state.max_steps}  {info}  "
                               f"elapsed {_clock(now - self.started)}  eta {_clock(eta)}", highlight=False)

    def on_train_end(self, args, state, control, **kw):
        if not self.live:
            self.console.print(f"train finished at step {state.global_step}/{state.max_steps} "
                               f"in {_clock(time.monotonic() - self.started)}", highlight=False)
        self.close()

    def close(self) -> None:
        self.progress.stop()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no step finished yet
        return "-"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"
