"""LoRA-input dropout with a cheaper random mask on CPU.

PEFT applies `nn.Dropout` to the input of every LoRA module (7 per layer). On CPU its mask comes
from `bernoulli_`, one random draw per element: profiling a training step on the embedded model
(2 cores) put 12% of the step in `aten::bernoulli_` alone. Here one 64-bit draw gives four masks:
the draw's low 63 bits are uniform, each 16-bit lane keeps its low 15 bits, and an element is
dropped when those are below round(p * 32768). Same semantics as `nn.Dropout` (independent
Bernoulli masks per module and element, survivors scaled by 1 / (1 - p)), with p resolved to
1/32768, the same torch generator (so Trainer's saved RNG state still makes `--resume` exact),
and the boolean mask kept for backward as `nn.Dropout` keeps it. Measured on 2 cores for one
4 x 600 x 576 fp32 input: 5.3 ms against 12.4 ms (`benchmarks/bench_dropout.py`); the training
step of the embedded model got 13% faster (docs/benchmarks.md).

No library offers this: torch's dropout is one kernel per device and PEFT builds `nn.Dropout`.
CUDA keeps `nn.Dropout`, whose fused Philox kernel is already cheap.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LANE_BITS = 15  # uniform bits used per 16-bit lane (the top lane of a draw has only 15)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask, True with probability 1 - round(p * 2**15) / 2**15, independently per element."""
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(generator=generator)  # [0, 2**63)
    lanes = draws.view(torch.int16)[:n]
    threshold = round(p * 2**LANE_BITS)
    return ((lanes & (2**LANE_BITS - 1)) >= threshold).view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None, None


class CheapDropout(nn.Module):
    """Drop-in for `nn.Dropout(p)` on CPU tensors."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_cheap_lora_dropout(model: nn.Module) -> int:
    """Replace the `nn.Dropout` of every LoRA layer with `CheapDropout`; returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is nn.Dropout:
                dropouts[name] = CheapDropout(layer.p)
                replaced += 1
    return replaced
