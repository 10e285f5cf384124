"""QLoRA / LoRA fine-tuning on assistant tokens: `train(cfg)` and the `edentune train` command.

Imports are lazy so that `edentune --help` does not load torch.
"""

from __future__ import annotations

__all__ = ["TrainResult", "train"]


def __getattr__(name: str):
    if name in __all__:
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(name)
