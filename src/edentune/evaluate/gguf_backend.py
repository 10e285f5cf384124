"""llama.cpp on the served files: the base GGUF plus the exported adapter GGUF (at scale 1, as
Ollama passes it to llama-server), prompts rendered with the export's template and cut at its
stop tokens. What the gate scores is then what the user gets, within the memory of a quantized
base (a 14B Q4_K_M base is ~9 GB instead of ~29.5 GB in bf16).

Generation is greedy unless temperature > 0 (then sampled with the run's seed). Perplexity runs
training's own encoder (`train.data.encode_conversation`: the same ids and assistant-token labels)
through llama.cpp and scores the logits it returns (`evaluate.perplexity.gguf_perplexity`).
"""

from __future__ import annotations

import os
import time

from edentune.errors import EdentuneError

from .generation import Generation


def cpu_threads() -> int:
    """llama.cpp threads for this machine now: every core it may use (a `taskset` or container limit
    counts) when they are free, else the cores left by the other work (at least one). llama.cpp's
    threads meet at a barrier after every operation, so on a busy machine a descheduled thread
    stalls the others: measured at load average 16 on 2 cores, 32 tokens of the embedded model took
    39 s with 2 threads and 2.0 s with 1 (results do not depend on the thread count)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no affinity API
        cores = max(1, os.cpu_count() or 1)
    try:
        others = max(0.0, os.getloadavg()[0] - 1)  # this process is running too
    except OSError:
        return cores
    return cores if others < cores / 2 else max(1, int(cores - others))


class GgufBackend:
    """`served` is an `export.served.ServedModel` (base GGUF, optional adapter GGUF, template, stop
    tokens, sha256s), already validated; `tokenizer_dir` holds the HF tokenizer training used."""

    backend = "gguf"
    batch_size = 1

    def __init__(self, served, tokenizer_dir: str, *, n_ctx: int, n_gpu_layers: int = -1, temperature: float = 0.0,
                 seed: int = 0, max_seq_len: int = 2048, n_threads: int | None = None, adapter_sha256: str | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise EdentuneError("the gguf evaluation backend needs llama-cpp-python",
                                hint="run `make setup`, or set evaluation.backend: transformers") from None
        from edentune.models import load_tokenizer

        threads = n_threads or cpu_threads()
        self.served = served
        self.llm = Llama(str(served.base_gguf), lora_path=str(served.adapter_gguf) if served.adapter_gguf else None,
                         lora_scale=1.0, logits_all=True, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, seed=seed,
                         n_threads=threads, n_threads_batch=threads, verbose=False)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.n_ctx, self.temperature, self.seed, self.max_seq_len = n_ctx, temperature, seed, max_seq_len
        self.artifacts = dict(served.artifacts)
        self.adapter_sha256 = adapter_sha256
        adapter = f" + {served.adapter_gguf}" if served.adapter_gguf else ""
        self.name = f"gguf:{served.base_gguf}{adapter}"

    def generate(self, conversations: list[list[dict]], max_new_tokens: int) -> list[Generation]:
        return [self._one(c, max_new_tokens) for c in conversations]

    def _one(self, messages: list[dict], max_new_tokens: int) -> Generation:
        ids = self.llm.tokenize(self.served.render_prompt(messages).encode("utf-8"), add_bos=True, special=True)
        room = self.n_ctx - len(ids)
        if room <= 0:
            raise EdentuneError(f"a prompt of {len(ids)} tokens does not fit the gguf backend's context ({self.n_ctx})",
                                hint="raise model.max_seq_len, or shorten the suite's prompts")
        sampling = ({"temperature": self.temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0} if self.temperature > 0
                    else {"temperature": 0.0, "top_k": 1})
        self.llm.reset()  # no cached prefix from the previous answer: each answer alone, as in a fresh request
        start = time.perf_counter()
        out = self.llm.create_completion(ids, max_tokens=min(max_new_tokens, room), stop=self.served.stop or None,
                                         repeat_penalty=1.0, seed=self.seed, **sampling)
        seconds = time.perf_counter() - start
        tokens = (out.get("usage") or {}).get("completion_tokens")
        return Generation(out["choices"][0]["text"].strip(), seconds, tokens if isinstance(tokens, int) else None)

    def perplexity(self, conversations: list, system_prompt: str | None) -> float | None:
        from .perplexity import gguf_perplexity

        return gguf_perplexity(self.llm, self.tokenizer, conversations, system_prompt, min(self.max_seq_len, self.n_ctx))

    def close(self) -> None:
        self.llm.close()
