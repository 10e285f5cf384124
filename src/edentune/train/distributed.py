"""Several processes (`accelerate launch`): who writes, where the model goes, what is refused.

`edentune train` runs unchanged in every process started by `accelerate launch -m edentune train
CONFIG` (or `edentune train CONFIG --num-processes N`, which starts that launcher): accelerate sets
up DDP or FSDP from its config, `EdenTrainer` keeps the loss, data order, NaN verdict and
checkpoints consistent across processes, and this module decides the per-process parts: only the
main process writes run files (manifest, metrics, TensorBoard, adapter, result.json), each process
loads the base onto its own GPU, and combinations known to fail in the pinned versions are refused
before anything is loaded. See docs/multi-gpu.md.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch

from edentune.errors import EdentuneError


@dataclass(frozen=True)
class Processes:
    num: int
    index: int
    local_index: int
    fsdp: bool

    @property
    def main(self) -> bool:
        return self.index == 0


def current_processes(device: str) -> Processes:
    """This process's place in the launch (one process, index 0, when not launched)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # cpu= as TrainingArguments(use_cpu=...) will pass it: PartialState is initialised once per
    # process, and only with cpu=True does a CPU launch get the gloo process group.
    state = PartialState(cpu=device == "cpu")
    if state.num_processes > 1:
        die_with_launcher()
    return Processes(state.num_processes, state.process_index, state.local_process_index,
                     fsdp=parse_flag_from_env("ACCELERATE_USE_FSDP"))


def die_with_launcher() -> None:
    """End this worker when the launcher that started it dies (Linux).

    torchrun, which accelerate's launcher runs, starts its workers in sessions of their own: after
    a SIGKILL of the launcher (`kill -9`, the OOM killer, a scheduler) they would train on,
    unsupervised, and keep writing checkpoints into the run folder while a `--resume` starts.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def load_device(device: str, procs: Processes) -> str:
    """Where this process loads the base: its own GPU under a launch (not all on cuda:0)."""
    if device != "cuda" or procs.num == 1:
        return device
    if procs.local_index >= torch.cuda.device_count():
        raise EdentuneError(
            f"{procs.num} processes per machine but only {torch.cuda.device_count()} GPU(s) visible",
            hint="launch one process per GPU (--num-processes / accelerate's num_processes)")
    return f"cuda:{procs.local_index}"


def check_supported(cfg, device: str, procs: Processes) -> None:
    """Refuse, before loading anything, what the pinned torch/accelerate/bitsandbytes cannot run."""
    if procs.num == 1:
        return
    if device == "mps":
        raise EdentuneError("several processes on Apple MPS: torch has no distributed backend for MPS",
                            hint="train with one process on a Mac")
    q = cfg.quantization
    if procs.fsdp and device != "cuda":
        # accelerate 1.15 turns FSDP on only for GPU-type process groups: a CPU launch with an FSDP
        # config silently runs DDP (a full copy per process). Also, 4-bit bitsandbytes weights
        # cannot be sharded off CUDA.
        raise EdentuneError(
            f"FSDP needs CUDA GPUs: on {device}, accelerate would silently run DDP instead (a full model copy per process)",
            hint="launch without the FSDP config (DDP), or train on GPUs")
    if procs.fsdp and q.load_in_4bit and q.compute_dtype != _precision_name(cfg, device):
        raise EdentuneError(
            f"FSDP with a 4-bit base needs quantization.compute_dtype equal to the training precision "
            f"({_precision_name(cfg, device)}): FSDP shards the 4-bit weights stored in that dtype "
            "next to the other parameters, which must all share one dtype",
            hint="set quantization.compute_dtype to the training precision (bf16 on recent GPUs)")
    if procs.fsdp and "8bit" in cfg.training.optimizer:
        # bitsandbytes' 8-bit optimizers keep quantized state and statistics FSDP does not know how
        # to gather: saving a checkpoint fails (bitsandbytes#89, #1403, #1732, open in 0.50).
        raise EdentuneError(
            f"FSDP with training.optimizer {cfg.training.optimizer}: checkpoints of bitsandbytes' 8-bit "
            "optimizer state cannot be gathered by FSDP",
            hint="use training.optimizer: adamw_torch under FSDP (its state is sharded across the GPUs anyway)")


def _precision_name(cfg, device: str) -> str:
    from edentune.models import pick_dtype

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[pick_dtype(cfg.training.precision, device)]


def launcher_command(argv: list[str], num_processes: int, device: str, accelerate_config: str | None = None) -> list[str]:
    """`python -m accelerate.commands.launch ... -m edentune train ...` for `--num-processes N`.

    accelerate's torchrun launcher (`--multi_gpu`) also serves CPU processes: in them edentune
    trains with `use_cpu`, which makes accelerate create a gloo process group (its `--cpu` flag
    would start one process, or N through mpirun). `accelerate_config`: an accelerate config file
    (e.g. FSDP) used instead of `--multi_gpu`.
    """
    if num_processes < 2:
        raise EdentuneError("--num-processes must be at least 2", hint="omit it to train in one process")
    if device == "cuda" and num_processes > torch.cuda.device_count():
        raise EdentuneError(f"--num-processes {num_processes} but {torch.cuda.device_count()} GPU(s) visible",
                            hint="one process per GPU")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", str(accelerate_config)]
    else:
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(num_processes), "--main_process_port", str(free_port()), "-m", "edentune", *argv]
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
