"""Offloaded gradient checkpointing: the saved layer inputs wait in host memory, not on the GPU.

With gradient checkpointing, what a training step keeps on the GPU between forward and backward is
one input per decoder layer (micro-batch x sequence x hidden in the stream dtype: 3.75 GB for
Qwen2.5-14B at 4 x 2048 in bf16) plus a few tensors around the layers. torch's non-reentrant
checkpoint saves those inputs through autograd's saved-tensor hooks, so a pair of hooks installed
around the forward can move each to pinned host memory as it is saved and bring it back when
backward needs it (Unsloth's "offloaded gradient checkpointing"; torchtune's OffloadActivations).

Why not `torch.autograd.graph.save_on_cpu`: it copies *every* saved tensor, including frozen
weights handed to checkpointed functions (the output head goes into each chunk of edentune's loss:
1.5 GB per chunk for 14B) and thousands of small ones, synchronously on the compute stream. These
hooks copy only large activations (never parameters), on a side stream that overlaps the
forward's compute; the copies back run on the compute stream just before each layer's recompute.
torchtune's version does the same with more machinery (prefetching), and pulling torchtune in for
one context manager would add a second training framework to the dependencies.

Cost: the bytes moved per micro-batch are the checkpoint term of `edentune plan`, twice (out
and back), over PCIe (~25-50 GB/s); the device->host half overlaps compute, the host->device
half does not. It needs that much pinned host RAM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors (norm statistics, masks, positions) are not worth a copy


def worth_offloading(t: torch.Tensor, device_type: str = "cuda", min_bytes: int = MIN_OFFLOAD_BYTES) -> bool:
    """An activation on `device_type` of at least `min_bytes` that is not (a view of) a parameter."""
    if isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter):
        return False
    return t.device.type == device_type and t.numel() * t.element_size() >= min_bytes


@contextlib.contextmanager
def offloaded_activations(select: Callable[[torch.Tensor], bool] = worth_offloading) -> Iterator[dict]:
    """Within this context, saved tensors that `select` picks wait in host memory until backward.
    Yields counters ({"tensors", "bytes"}) of what was moved. On CUDA the host copies are pinned
    and made on a side stream; elsewhere (tests on CPU) they are plain copies."""
    moved = {"tensors": 0, "bytes": 0}
    side = torch.cuda.Stream() if torch.cuda.is_available() else None

    def pack(t: torch.Tensor):
        if not select(t):
            return t
        moved["tensors"] += 1
        moved["bytes"] += t.numel() * t.element_size()
        if t.device.type != "cuda":
            return (t.device, t.detach().clone())
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=True)
        side.wait_stream(torch.cuda.current_stream())  # the tensor is fully computed before it is read
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=True)
        t.record_stream(side)  # its GPU memory is not reused until the copy has read it
        return (t.device, host)

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        if device.type != "cuda":
            return host
        torch.cuda.current_stream().wait_stream(side)  # the copy out has finished
        return host.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield moved
