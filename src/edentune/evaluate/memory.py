"""Peak memory of an evaluation per backend, and `evaluation.backend: auto`'s choice.

Estimated term by term (GB), from the base's config numbers (a dict or HF config) so that the
round planner can call it for presets without loading anything:

- gguf (llama.cpp): the base GGUF's size (or params x Q4_K_M_BITS when it does not exist yet),
  the f16 KV cache of `n_ctx` positions, the logits: llama-cpp-python keeps every position's
  logits with `logits_all` (n_ctx x vocab fp32, in host memory) plus llama.cpp's output buffer of
  one batch, and llama.cpp's compute buffer of one micro-batch;
- transformers, 16-bit (fp32 on CPU, what `pick_dtype` loads) or NF4 (the training quantization:
  4-bit blocks, embeddings in the load dtype): the weights, the KV cache of a generation batch, and
  the perplexity forward of one max_seq_len conversation (logits, their fp32 copy and
  log-softmax: 3 x T x vocab x 4 bytes);
- runtime overhead (interpreter, tokenizer; the CUDA context on a GPU).

Speed among the backends that fit comes from measurements (docs/benchmarks.md,
`benchmarks/bench_eval_backends.py`), in FASTEST_FIRST.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GB = 1024**3
Q4_K_M_BITS = 4.85  # average bits per weight of llama.cpp's Q4_K_M on Qwen2.5/Llama-3 (llama.cpp quantize's table)
NF4_BITS = 4.127  # 4 bits + double-quantized absmax (QLoRA paper, arXiv:2305.14314); the training planner uses the same
LLAMA_N_BATCH = 512  # llama-cpp-python's default n_batch / n_ubatch
OVERHEAD_GB = {"cpu": 1.0, "mps": 1.0, "cuda": 0.8}
PROMPT_TOKENS = 256  # a generous suite prompt (system + question); generation adds max_new_tokens
APPLE_GPU_SHARE = 2 / 3  # macOS lets the GPU wire about 2/3 of RAM up to 36 GB (the training planner's figure)

# Measured order on 2 CPU cores (docs/benchmarks.md, "Evaluation backends"): llama.cpp answered the
# quickstart suite faster than transformers (fp32, batch 8). On CUDA and Metal no measurement yet:
# gguf comes first there as well, since it scores the files Ollama serves.
FASTEST_FIRST = {"cpu": ("gguf", "transformers", "transformers-nf4"),
                 "cuda": ("gguf", "transformers", "transformers-nf4"),
                 "mps": ("gguf", "transformers")}


def _numbers(model_config) -> dict:
    get = model_config.get if isinstance(model_config, dict) else lambda k, d=None: getattr(model_config, k, d)
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    return {"hidden": hidden, "inter": get("intermediate_size"), "layers": get("num_hidden_layers"),
            "vocab": get("vocab_size"), "kv_dim": hidden // heads * (get("num_key_value_heads") or heads),
            "tied": bool(get("tie_word_embeddings", False))}


def param_counts(model_config) -> tuple[int, int]:
    """(parameters of the transformer blocks, of the embedding + head)."""
    n = _numbers(model_config)
    h, kv, i = n["hidden"], n["kv_dim"], n["inter"]
    blocks = n["layers"] * (2 * h * h + 2 * h * kv + 3 * h * i)
    return blocks, n["vocab"] * h * (1 if n["tied"] else 2)


def eval_memory_terms(model_config, backend: str, *, device: str = "cpu", max_seq_len: int = 2048,
                      max_new_tokens: int = 256, batch_size: int = 8, base_gguf_bytes: int | None = None) -> dict[str, float]:
    """GB per term of an evaluation's peak with `backend`: gguf | transformers | transformers-nf4."""
    n = _numbers(model_config)
    blocks, embeddings = param_counts(model_config)
    terms: dict[str, float] = {}
    if backend == "gguf":
        n_ctx = max_seq_len + max_new_tokens
        terms["weights (GGUF)"] = (base_gguf_bytes if base_gguf_bytes else (blocks + embeddings) * Q4_K_M_BITS / 8) / GB
        terms["KV cache (f16)"] = 2 * n["layers"] * n_ctx * n["kv_dim"] * 2 / GB
        terms["logits (all positions)"] = (n_ctx + LLAMA_N_BATCH) * n["vocab"] * 4 / GB
        terms["compute buffer"] = LLAMA_N_BATCH * (n["vocab"] + 4 * n["inter"]) * 4 / GB
    else:
        width = 4 if device == "cpu" else 2  # pick_dtype: fp32 on CPU, bf16 / fp16 on CUDA and MPS
        if backend == "transformers-nf4":
            terms["weights (NF4 blocks)"] = blocks * NF4_BITS / 8 / GB
            terms["embeddings"] = embeddings * width / GB
        else:
            terms["weights"] = (blocks + embeddings) * width / GB
        kv = batch_size * (PROMPT_TOKENS + max_new_tokens) * n["layers"] * 2 * n["kv_dim"] * width
        ppl = 3 * max_seq_len * n["vocab"] * 4
        terms["generation KV cache / perplexity logits"] = max(kv, ppl) / GB
    terms["runtime overhead"] = OVERHEAD_GB.get(device, 1.0)
    return terms


def device_budget_gb(device: str) -> float:
    """Memory an evaluation may use: the GPU's on CUDA, the Metal share of RAM on a Mac, 95% of RAM on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1] / GB
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    return ram * (APPLE_GPU_SHARE if device == "mps" else 0.95)


@dataclass
class BackendChoice:
    backend: str  # gguf | transformers | transformers-nf4
    reason: str
    estimates_gb: dict[str, float] = field(default_factory=dict)  # backend -> estimated peak

    @property
    def load_in_4bit(self) -> bool:
        return self.backend == "transformers-nf4"


def choose_backend(model_config, *, device: str, budget_gb: float, max_seq_len: int, max_new_tokens: int,
                   batch_size: int = 8, base_gguf_bytes: int | None = None, gguf_available: bool = True) -> BackendChoice:
    """What `auto` runs: the fastest backend (FASTEST_FIRST) whose estimated peak fits `budget_gb`;
    when none fits, the smallest, with the reason saying so."""
    order = [b for b in FASTEST_FIRST.get(device, FASTEST_FIRST["cpu"]) if gguf_available or b != "gguf"]
    estimates = {b: round(sum(eval_memory_terms(model_config, b, device=device, max_seq_len=max_seq_len,
                                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                base_gguf_bytes=base_gguf_bytes).values()), 2) for b in order}
    shown = ", ".join(f"{b} ~{gb:.1f} GB" for b, gb in estimates.items())
    fitting = [b for b in order if estimates[b] <= budget_gb]
    if fitting:
        pick = fitting[0]
        skipped = [b for b in order[: order.index(pick)]]
        why = (f"{', '.join(skipped)} would not fit; " if skipped else "") + f"{pick} fits and is the fastest that does"
        if not gguf_available and device in FASTEST_FIRST:
            why += " (llama-cpp-python is not installed, so no gguf)"
    else:
        pick = min(estimates, key=estimates.get)
        why = f"nothing fits; {pick} needs the least"
    return BackendChoice(pick, f"evaluation backend {pick} on {device}: {why} ({shown}; {budget_gb:.1f} GB available)", estimates)
