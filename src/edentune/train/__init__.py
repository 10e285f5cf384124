"""QLoRA / LoRA fine-tuning on assistant tokens: `train(cfg)` and the `edentune train` command.

The run's skeleton is `run.py`; the engines are `recipe.py` (torch), `mlx_backend.py` (MLX) and
`preference.py` (KTO/DPO). Imports are lazy so that `edentune --help` does not load torch.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RunDir", "TrainResult", "train"]


def train(cfg, *, resume: bool = False, init_adapter: str | Path | None = None, callbacks: list | tuple = (),
          console=None, fresh_optimizer: bool = False):
    """Train `cfg`'s LoRA from scratch, or continue `init_adapter` (a saved PEFT adapter, e.g. the
    live round's in `edentune cycle`) on this data; `resume` continues this run's newest complete
    checkpoint. The engine follows `training.backend` (`auto`: MLX on Apple Silicon, else torch)."""
    from rich.console import Console

    from .run import run_training, select_backend

    console = console or Console(stderr=True)
    if select_backend(cfg.training.backend) == "mlx":
        from .mlx_backend import MlxEngine as Engine
    else:
        from .recipe import TorchEngine as Engine
    engine = Engine(cfg, init_adapter=init_adapter, callbacks=callbacks, console=console, fresh_optimizer=fresh_optimizer)
    return run_training(engine, resume=resume)


def __getattr__(name: str):
    if name in ("RunDir", "TrainResult"):
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
