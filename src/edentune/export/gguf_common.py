"""Pieces shared by the adapter and model GGUF writers: tensor names, Q/K layout, atomic writes.

Written here rather than imported from llama.cpp's converters because those scripts are not an
installable library (unsloth#341, #3504: "llama.cpp build or converter not found"); the `gguf` package
gives the file format, and this module gives the few model-specific rules on top of it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdentuneError
from ..io import atomic_open

SUPPORTED_ARCHS = ("llama", "qwen2")

# HF projection module -> GGUF tensor stem inside `blk.N.`
PROJ_TO_GGUF = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}


def gguf_arch(model_type: str) -> str:
    if model_type not in SUPPORTED_ARCHS:
        raise EdentuneError(
            f"model type {model_type!r} is not supported by the GGUF export (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    return model_type


def permute_rows_for_llama_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection from HF's rotate-half layout to GGML's.

    llama.cpp runs `llama` with interleaved ("normal") RoPE, so llama GGUF files store q/k rows
    permuted: within each head, rows (i, i + d/2) become neighbours. Qwen2 uses NeoX RoPE, which
    matches HF's layout, so it needs no permutation. A LoRA `B` matrix produces q/k rows too and
    must follow the same order as the base weight it is added to.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(writer, path: str | os.PathLike) -> Path:
    """Write a fully populated `gguf.GGUFWriter` to `path` atomically (temp file, fsync, rename)."""
    from gguf.gguf_writer import WriterState

    path = Path(path)
    with atomic_open(path, "wb") as fh:
        # GGUFWriter opens files by path; handing it our temp file keeps the write atomic.
        writer.fout, writer.state = [fh], WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.fout = None
    return path


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape in PyTorch order (out, in), from a `gguf.GGUFReader`."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def field_value(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


_FACT_KEYS = ("general.architecture", "general.type", "general.file_type", "adapter.type", "adapter.lora.alpha")


@dataclass(frozen=True)
class GGUFFacts:
    fields: dict  # the few metadata keys the checks read (_FACT_KEYS), absent ones left out
    shapes: dict[str, tuple[int, ...]]  # as tensor_shapes
    tensor_types: frozenset[str]  # GGML type names of the tensors ("F16", "Q8_0", ...)


def gguf_facts(path: str | os.PathLike) -> GGUFFacts:
    """Metadata and tensor shapes of a GGUF, cached per file version: `gguf.GGUFReader` parses
    every tokenizer string in Python, which takes seconds on a 49k vocabulary, and a deploy or an
    export reads the same base several times."""
    st = os.stat(path)
    return _gguf_facts(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _gguf_facts(path: str, size: int, mtime_ns: int) -> GGUFFacts:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: field_value(reader, k) for k in _FACT_KEYS if k in reader.fields}
    return GGUFFacts(fields=fields, shapes=tensor_shapes(reader), tensor_types=frozenset(t.tensor_type.name for t in reader.tensors))
