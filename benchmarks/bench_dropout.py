"""LoRA-input dropout on CPU: PEFT's `nn.Dropout` against edentune's `CheapDropout`.

One LoRA input of the embedded model at batch 4 x 600 tokens (4 x 600 x 576, fp32 as under
`prepare_model_for_kbit_training`); the training step runs 7 of these per layer, 30 layers.

    python benchmarks/bench_dropout.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

from edentune.train.dropout import CheapDropout


def ms(fn, repeat: int = 30) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 600, 576, requires_grad=True)
    grad = torch.randn(4, 600, 576)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {tuple(x.shape)}")
    for name, layer in (("nn.Dropout(0.05)", nn.Dropout(0.05)), ("CheapDropout(0.05)", CheapDropout(0.05))):
        with torch.no_grad():
            fwd = ms(lambda: layer(x))
        both = ms(lambda: layer(x).backward(grad))
        print(f"{name:20s} forward {fwd:6.2f} ms   forward+backward {both:6.2f} ms")


if __name__ == "__main__":
    main()
