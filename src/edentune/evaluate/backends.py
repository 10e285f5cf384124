"""Where answers come from: a local transformers model (optionally with a PEFT adapter) or any
OpenAI-compatible chat endpoint (Ollama's /v1, llama.cpp server, vLLM).

A backend answers whole conversations (system turn already explicit) and times each answer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from edentune.errors import EdentuneError

from .generation import Generation  # noqa: F401 - re-exported: the answer type every backend returns


class Backend(Protocol):
    name: str

    def generate(self, conversations: list[list[dict]], max_new_tokens: int) -> list[Generation]: ...


class LocalBackend:
    """transformers model, batched generation with left padding; greedy unless temperature > 0,
    in which case sampling is seeded per batch so reruns give the same answers."""

    def __init__(self, model_dir: str, adapter: str | None = None, *, device: str | None = None, batch_size: int = 8,
                 temperature: float = 0.0, seed: int = 0, max_seq_len: int = 2048, load_in_4bit: bool = False,
                 quantization=None):
        """`load_in_4bit`: the base in NF4 as training quantizes it (`quantization`: a
        QuantizationConfig; default NF4 + double quantization, bf16 compute), when 16-bit does not fit."""
        from edentune.models import adapter_sha256, load_base_model, load_tokenizer, pick_device, pick_dtype

        self.device = device or pick_device()
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = pick_dtype("auto", self.device)
        quant = {"quant_type": quantization.quant_type, "double_quant": quantization.double_quant,
                 "compute_dtype": quantization.compute_dtype} if quantization is not None else {}
        self.model = load_base_model(model_dir, load_in_4bit=load_in_4bit, dtype=dtype, device=self.device, **quant)
        # What scored the answers, recorded in the results: `compare` refuses to set different ones side by side.
        self.backend = "transformers-nf4" if load_in_4bit else f"transformers-{str(dtype).removeprefix('torch.')}"
        self.artifacts: dict[str, str] = {}
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


SERVER_HINT = "start one with `ollama serve` or `python -m llama_cpp.server --model FILE.gguf`, and give its OpenAI-compatible URL, e.g. -m http://127.0.0.1:11434/v1#eden"


def server_url(url: str) -> tuple[str, str]:
    """(base URL ending in /v1, host:port) of an OpenAI-compatible server URL; a clear error for
    anything that is not an http(s) URL with a host and a valid port."""
    from urllib.parse import urlsplit

    problem = None
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as err:
        problem, parts, port = str(err), None, None
    if parts is not None:
        if any(ch.isspace() for ch in url):
            problem = "it contains whitespace"
        elif parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parts.hostname:
            problem = "no host"
        elif port == 0:
            problem = "port 0"
        elif parts.query or parts.fragment:
            problem = "unexpected ?query or #fragment"
    if problem:
        raise EdentuneError(f"{url}: not a server URL ({problem})", hint="use http://host:port/v1#model, e.g. http://127.0.0.1:11434/v1#eden")
    base = url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1"), parts.netloc.rpartition("@")[2]  # never user:password


class HttpBackend:
    """POST /v1/chat/completions, one conversation at a time, every wait bounded.

    Connecting takes at most `connect_timeout` (default: the smaller of `timeout` and 10 s). Before
    the first answer, GET /v1/models must answer within that time too: a port that accepts and
    never answers, or a web server that is not an OpenAI-compatible API, fails in seconds rather than
    after a full generation timeout. A refused or dropped connection, 429 and 5xx are retried
    `retries` times with exponential backoff (a server starting up or busy); an answer that does not
    come within `timeout` is not retried (waiting again would take as long); other 4xx are the
    caller's mistake and fail at once with the server's message."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 connect_timeout: float | None = None, retries: int = 2, backoff: float = 0.5,
                 temperature: float = 0.0, seed: int = 0):
        import httpx

        self.base, self.host = server_url(base_url)
        self.url = self.base + "/chat/completions"
        self.model, self.retries, self.backoff, self.timeout = model, retries, backoff, timeout
        self.connect_timeout = min(timeout, 10.0) if connect_timeout is None else connect_timeout
        self.temperature, self.seed = temperature, seed
        self.name = f"{self.url} ({model})"
        self.backend, self.artifacts = "http", {}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=self.connect_timeout), headers=headers)
        self._probed = False

    def generate(self, conversations: list[list[dict]], max_new_tokens: int) -> list[Generation]:
        if not self._probed:
            self._probe()
            self._probed = True
        return [self._one(c, max_new_tokens) for c in conversations]

    def _one(self, messages: list[dict], max_new_tokens: int) -> Generation:
        payload = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                   "temperature": self.temperature, "seed": self.seed, "stream": False}
        start = time.perf_counter()
        resp = self._request("POST", self.url, json=payload)
        seconds = time.perf_counter() - start
        data = self._json(resp, "POST /v1/chat/completions")
        try:
            text = data["choices"][0]["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise self._not_api(resp, "POST /v1/chat/completions", "no choices[0].message.content") from None
        usage = data.get("usage")
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return Generation(text.strip(), seconds, tokens if isinstance(tokens, int) else None)

    def _probe(self) -> None:
        """GET /v1/models with a short read timeout: reachable, and speaking the API."""
        resp = self._request("GET", self.base + "/models", timeout=self.connect_timeout, probe=True)
        if resp.status_code in (404, 405, 501):
            return  # some servers do not list models: the chat request below tells
        data = self._json(resp, "GET /v1/models")
        if not isinstance(data.get("data"), list):
            raise self._not_api(resp, "GET /v1/models", "no `data` list")

    def _request(self, method: str, url: str, *, timeout: float | None = None, probe: bool = False, **kwargs):
        import httpx

        wait = timeout if timeout is not None else self.timeout
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self.client.request(method, url, timeout=httpx.Timeout(wait, connect=self.connect_timeout), **kwargs)
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
                raise EdentuneError(
                    f"{self.host} accepted the connection but sent no answer within {wait:g} s ({method} {url})",
                    hint=("is it an OpenAI-compatible server (Ollama, llama.cpp server, vLLM) and not hung? " if probe else
                          "the model may be too slow for this machine: raise evaluation.http_timeout_s, or lower evaluation.max_new_tokens. ")
                    + SERVER_HINT,
                ) from None
            except httpx.TransportError as err:  # refused, reset, connect timeout: the server may be starting
                last = f"{type(err).__name__}: {err}"
                continue
            if resp.status_code == 429 or (resp.status_code >= 500 and resp.status_code != 501):
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400 and not (probe and resp.status_code in (404, 405, 501)):
                if not _is_json(resp) or resp.status_code in (405, 501):
                    raise self._not_api(resp, f"{method} {resp.url.path}", f"HTTP {resp.status_code}")
                raise EdentuneError(f"{self.host} rejected {method} {resp.url.path}: HTTP {resp.status_code}: {resp.text[:300]}",
                                    hint="the server wants an API key, or refuses this client" if resp.status_code in (401, 403)
                                    else "check the model name (for Ollama: `ollama list`)")
            return resp
        raise EdentuneError(f"cannot get an answer from {self.host} after {self.retries + 1} attempts ({last})",
                            hint="is the server running? " + SERVER_HINT)

    def _json(self, resp, what: str) -> dict:
        try:
            data = resp.json()
        except (ValueError, RecursionError):
            raise self._not_api(resp, what, "the answer is not JSON") from None
        if not isinstance(data, dict):
            raise self._not_api(resp, what, "the answer is not a JSON object")
        return data

    def _not_api(self, resp, what: str, problem: str) -> EdentuneError:
        kind = resp.headers.get("content-type", "no content type").split(";")[0]
        snippet = " ".join(resp.text[:120].split())
        return EdentuneError(f"not an OpenAI-compatible server at {self.base}: {what} gave {problem} ({kind}: {snippet!r})",
                             hint="give the URL of the API itself (Ollama: http://host:11434/v1; llama.cpp server: http://host:8080/v1)")

    def close(self) -> None:
        self.client.close()


def _is_json(resp) -> bool:
    return "json" in resp.headers.get("content-type", "")


BACKENDS = ("auto", "gguf", "transformers", "http")


def backend_from_spec(spec: str, cfg, *, batch_size: int = 8, temperature: float = 0.0, backend: str | None = None) -> Backend:
    """A model spec: `http(s)://host:port/v1#model` (`/v1` and `#model` optional; the model defaults
    to export.model_name),
    `base` (the config's base model), a PEFT adapter directory (on the config's base), an export
    folder or a model directory / .gguf file. `backend` (default `evaluation.backend`) says what
    scores a local model: gguf (llama.cpp on the served files), transformers, or auto (what fits,
    then the faster; the backend's `choice` says why)."""
    kind = backend or cfg.evaluation.backend
    if kind not in BACKENDS:
        raise EdentuneError(f"unknown evaluation backend {kind!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    if spec.startswith(("http://", "https://")) or "://" in spec:
        url, _, model = spec.partition("#")
        return HttpBackend(url, model or cfg.export.model_name, temperature=temperature, seed=cfg.training.seed,
                           timeout=cfg.evaluation.http_timeout_s)
    if kind == "http":
        raise EdentuneError(f"{spec}: evaluation backend http scores servers only",
                            hint="give -m http://host:port/v1#model, or --backend auto | gguf | transformers")
    from edentune.models import check_adapter_dir, resolve_model_dir

    m = cfg.model
    base_dir = resolve_model_dir(m.name_or_path, m.gguf_file, m.architecture)
    path = None if spec == "base" else Path(spec).expanduser()
    adapter = path is not None and (path / "adapter_config.json").exists()
    if adapter:
        check_adapter_dir(path)  # before the base is loaded: a broken adapter fails at once
    elif path is not None and not path.exists():
        raise EdentuneError(f"{spec}: not a model spec", hint="use `base`, an adapter or model directory, a .gguf file or http://host:port#model")
    served_files = path is not None and (path.suffix == ".gguf" or (path / "export_report.json").is_file())
    choice = None
    if kind == "auto":
        choice = _auto_choice(cfg, base_dir, batch_size) if not served_files else None
        kind = "gguf" if choice is None or choice.backend == "gguf" else "transformers"
    if kind == "gguf":
        built = _gguf_backend(cfg, base_dir, path, temperature)
    else:
        if served_files:
            raise EdentuneError(f"{spec}: GGUF files are scored by the gguf backend", hint="use --backend gguf (or auto)")
        kwargs = {"batch_size": batch_size, "temperature": temperature, "seed": cfg.training.seed, "max_seq_len": m.max_seq_len,
                  "load_in_4bit": choice is not None and choice.load_in_4bit, "quantization": cfg.quantization}
        if path is None:
            built = LocalBackend(base_dir, **kwargs)
        elif adapter:
            built = LocalBackend(base_dir, str(path), **kwargs)
        else:
            built = LocalBackend(resolve_model_dir(str(path)), **kwargs)
    built.choice = choice
    return built


def _auto_choice(cfg, base_dir: str, batch_size: int):
    import importlib.util

    from transformers import AutoConfig

    from edentune.export.served import existing_base_gguf
    from edentune.models import pick_device

    from .memory import choose_backend, device_budget_gb

    device = pick_device()
    found = existing_base_gguf(cfg, base_dir)
    return choose_backend(AutoConfig.from_pretrained(base_dir), device=device, budget_gb=device_budget_gb(device),
                          max_seq_len=cfg.model.max_seq_len, max_new_tokens=cfg.evaluation.max_new_tokens,
                          batch_size=batch_size, base_gguf_bytes=found[0].stat().st_size if found else None,
                          gguf_available=importlib.util.find_spec("llama_cpp") is not None)


def _gguf_backend(cfg, base_dir: str, path: Path | None, temperature: float):
    from edentune.export.served import served_model
    from edentune.models import adapter_sha256

    from .gguf_backend import GgufBackend

    served = served_model(cfg, base_dir, path)
    scored = None
    if path is not None and (path / "adapter_model.safetensors").exists():
        scored = adapter_sha256(path)
    elif path is not None and (path / "export_report.json").is_file():
        from edentune.export.api import load_export

        scored = load_export(path).get("adapter_sha256")  # the PEFT weights the export was made from
    return GgufBackend(served, base_dir, n_ctx=cfg.model.max_seq_len + cfg.evaluation.max_new_tokens,
                       n_gpu_layers=cfg.evaluation.n_gpu_layers, temperature=temperature, seed=cfg.training.seed,
                       max_seq_len=cfg.model.max_seq_len, adapter_sha256=scored)
