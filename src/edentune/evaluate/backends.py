"""Where answers come from: a local transformers model (optionally with a PEFT adapter) or any
OpenAI-compatible chat endpoint (Ollama's /v1, llama.cpp server, vLLM).

A backend answers whole conversations (system turn already explicit) and times each answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edentune.errors import EdentuneError


@dataclass
class Generation:
    text: str
    seconds: float  # latency the user would see for this answer
    completion_tokens: int | None = None


class Backend(Protocol):
    name: str

    def generate(self, conversations: list[list[dict]], max_new_tokens: int) -> list[Generation]: ...


class LocalBackend:
    """transformers model, batched generation with left padding; greedy unless temperature > 0,
    in which case sampling is seeded per batch so reruns give the same answers."""

    def __init__(self, model_dir: str, adapter: str | None = None, *, device: str | None = None, batch_size: int = 8,
                 temperature: float = 0.0, seed: int = 0, max_seq_len: int = 2048):
        from edentune.models import adapter_sha256, load_base_model, load_tokenizer, pick_device, pick_dtype

        self.device = device or pick_device()
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_base_model(model_dir, load_in_4bit=False, dtype=pick_dtype("auto", self.device), device=self.device)
        if adapter:
            from edentune.models import load_adapter

            self.model = load_adapter(self.model, adapter)  # checks the adapter files, errors name them
        self.model.eval()
        self.name = f"{model_dir}" + (f" + {adapter}" if adapter else "")
        self.adapter_sha256 = adapter_sha256(adapter) if adapter else None
        self.batch_size, self.temperature, self.seed, self.max_seq_len = batch_size, temperature, seed, max_seq_len
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = sorted({i for i in (self.tokenizer.eos_token_id, end_of_turn) if isinstance(i, int) and i >= 0})

    def generate(self, conversations: list[list[dict]], max_new_tokens: int) -> list[Generation]:
        out = []
        for i in range(0, len(conversations), self.batch_size):
            out.extend(self._batch(conversations[i: i + self.batch_size], max_new_tokens))
        return out

    def _batch(self, conversations: list[list[dict]], max_new_tokens: int) -> list[Generation]:
        import torch

        tok = self.tokenizer
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        torch.manual_seed(self.seed)
        start = time.perf_counter()
        with torch.no_grad():
            seqs = self.model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                       pad_token_id=tok.pad_token_id, top_p=None, top_k=None, **sampling)
        seconds = time.perf_counter() - start
        results = []
        for row in seqs[:, enc["input_ids"].shape[1]:].tolist():
            stop = next((j for j, t in enumerate(row) if t in self.stop_ids), len(row))
            results.append(Generation(tok.decode(row[:stop], skip_special_tokens=True).strip(), seconds, stop))
        return results

    def perplexity(self, conversations: list, system_prompt: str | None) -> float | None:
        from .perplexity import perplexity

        return perplexity(self.model, self.tokenizer, conversations, system_prompt, self.max_seq_len)


class HttpBackend:
    """POST /v1/chat/completions, one conversation at a time. Connection failures, timeouts, 429
    and 5xx are retried a bounded number of times with exponential backoff; other 4xx are the
    caller's mistake and fail at once with the server's message."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, temperature: float = 0.0, seed: int = 0):
        import httpx

        url = base_url.rstrip("/")
        self.url = (url if url.endswith("/v1") else url + "/v1") + "/chat/completions"
        self.model, self.retries, self.backoff = model, retries, backoff
        self.temperature, self.seed = temperature, seed
        self.name = f"{self.url} ({model})"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), headers=headers)

    def generate(self, conversations: list[list[dict]], max_new_tokens: int) -> list[Generation]:
        return [self._one(c, max_new_tokens) for c in conversations]

    def _one(self, messages: list[dict], max_new_tokens: int) -> Generation:
        payload = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                   "temperature": self.temperature, "seed": self.seed, "stream": False}
        start = time.perf_counter()
        data = self._post(payload)
        seconds = time.perf_counter() - start
        try:
            text = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EdentuneError(f"{self.url}: unexpected response (no choices[0].message.content): {str(data)[:200]}") from None
        tokens = (data.get("usage") or {}).get("completion_tokens")
        return Generation(text.strip(), seconds, tokens)

    def _post(self, payload: dict) -> dict:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self.client.post(self.url, json=payload)
            except httpx.TransportError as err:  # refused, reset, timed out
                last = f"{type(err).__name__}: {err}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                raise EdentuneError(f"{self.url} rejected the request: HTTP {resp.status_code}: {resp.text[:300]}",
                                    hint="check the model name (for Ollama: `ollama list`)")
            return resp.json()
        raise EdentuneError(
            f"cannot get an answer from {self.url} after {self.retries + 1} attempts ({last})",
            hint="is the server running? start it with `ollama serve` or `python -m llama_cpp.server --model FILE.gguf`",
        )

    def close(self) -> None:
        self.client.close()


def backend_from_spec(spec: str, cfg, *, batch_size: int = 8, temperature: float = 0.0) -> Backend:
    """A model spec: `http(s)://host:port[/v1][#model]` (model defaults to export.model_name),
    `base` (the config's base model), a PEFT adapter directory (on the config's base) or a model
    directory / .gguf file."""
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return HttpBackend(url, model or cfg.export.model_name, temperature=temperature, seed=cfg.training.seed)
    from edentune.models import check_adapter_dir, resolve_model_dir

    m = cfg.model
    kwargs = {"batch_size": batch_size, "temperature": temperature, "seed": cfg.training.seed, "max_seq_len": m.max_seq_len}
    base_dir = resolve_model_dir(m.name_or_path, m.gguf_file, m.architecture)
    if spec == "base":
        return LocalBackend(base_dir, **kwargs)
    path = Path(spec).expanduser()
    if (path / "adapter_config.json").exists():
        check_adapter_dir(path)  # before the base is loaded: a broken adapter fails at once
        return LocalBackend(base_dir, str(path), **kwargs)
    if path.exists():
        return LocalBackend(resolve_model_dir(str(path)), **kwargs)
    raise EdentuneError(f"{spec}: not a model spec", hint="use `base`, an adapter or model directory, a .gguf file or http://host:port#model")
