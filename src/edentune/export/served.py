"""The files Ollama would serve, gathered for evaluation: base GGUF, adapter GGUF, chat template
and stop tokens (the `gguf` evaluation backend scores exactly these through llama.cpp).

Where the base GGUF comes from, first match wins:
1. `evaluation.base_gguf` in the config;
2. the run's own GGUF (the embedded SmolLM2 Q4_1 file, a `.gguf` model path, `model.gguf_file`);
3. the Ollama store's blob of `export.ollama_base` (manifest under $OLLAMA_MODELS or
   ~/.ollama/models, or the `FROM` path `/api/show` reports when that file is on this machine),
   read in place and never written;
4. one written from the HF base (the merged-GGUF writer) and quantized to Q4_K_M with llama.cpp's
   quantizer, cached under the edentune cache.

The adapter GGUF is the export's own `adapter.gguf` when given an export folder, else the PEFT
adapter written by the same writer `edentune export` uses (cached by the adapter's content), so
its sha256 is the one a later export produces. Every adapter is checked against the base's
tensors before llama.cpp sees it (a bad one segfaults llama-cpp-python).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdentuneError
from ..io import file_sha256

log = logging.getLogger(__name__)

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_REGISTRY = "registry.ollama.ai"
SHOW_TIMEOUT_S = 5.0  # the /api/show lookup is optional: a missing Ollama must not hold evaluation up


@dataclass
class ServedModel:
    base_gguf: Path
    base_source: str  # how the base was found: config | run | ollama store | ollama /api/show | written from HF
    template: str  # Ollama (Go) template the prompt is rendered with
    stop: list[str]
    adapter_gguf: Path | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # base_gguf / adapter_gguf -> sha256

    def render_prompt(self, messages: list[dict]) -> str:
        """The prompt text Ollama builds for `messages` (a system turn, if any, is in the messages)."""
        from .parity import render_ollama_prompt

        return render_ollama_prompt(self.template, None, messages)


def served_model(cfg, base_dir: str, spec_path: Path | None = None) -> ServedModel:
    """The served files for `spec_path`: None (the base alone), a PEFT adapter folder, an export
    folder (adapter or merged route) or a .gguf model file."""
    from .modelfile import CHATML_TEMPLATE, STOP_TOKENS, modelfile_for

    template = modelfile_for(cfg).template or CHATML_TEMPLATE
    stop = list(STOP_TOKENS)
    adapter = None
    if spec_path is not None and spec_path.is_file() and spec_path.suffix == ".gguf":
        base, source = spec_path, "file"
    elif spec_path is not None and (spec_path / "export_report.json").is_file():
        template, stop = _export_template(spec_path, template, stop)
        if (spec_path / "model.gguf").is_file():
            base, source = spec_path / "model.gguf", "export (merged)"
        else:
            base, source = base_gguf(cfg, base_dir)
            adapter = spec_path / "adapter.gguf"
    elif spec_path is not None and not (spec_path / "adapter_config.json").is_file():
        from ..models import resolve_model_dir

        base, source = written_base_gguf(resolve_model_dir(str(spec_path))), "written from HF"  # another HF model folder
    else:
        base, source = base_gguf(cfg, base_dir)
        if spec_path is not None:
            adapter = adapter_gguf(cfg, spec_path, base_dir)
    _check_gguf(base, "base")
    if adapter is not None:
        from .adapter_gguf import validate_adapter_against_base

        validate_adapter_against_base(adapter, base)  # before llama.cpp loads it: no segfault
    artifacts = {"base_gguf": file_sha256(base)}
    if adapter is not None:
        artifacts["adapter_gguf"] = file_sha256(adapter)
    return ServedModel(base_gguf=base, base_source=source, template=template, stop=stop, adapter_gguf=adapter, artifacts=artifacts)


def _export_template(export_dir: Path, template: str, stop: list[str]) -> tuple[str, list[str]]:
    """TEMPLATE and stop list of an export's Modelfile (what `ollama create` gets)."""
    from .modelfile import parse_modelfile

    mf_path = export_dir / "Modelfile"
    if not mf_path.is_file():
        return template, stop
    mf = parse_modelfile(mf_path.read_text(encoding="utf-8"))
    return mf.template or template, [str(s) for s in mf.parameters.get("stop", stop)]


def _check_gguf(path: Path, what: str) -> None:
    from .gguf_common import gguf_facts

    if not path.is_file():
        raise EdentuneError(f"{what} GGUF {path} does not exist", hint="set evaluation.base_gguf to an existing .gguf file")
    try:
        gguf_facts(path)
    except Exception as err:  # gguf raises ValueError / struct / numpy errors on a foreign or truncated file
        raise EdentuneError(f"{what} GGUF {path} is not a readable GGUF file ({str(err)[:160]})",
                            hint="point evaluation.base_gguf at a GGUF model file") from None


def base_gguf(cfg, base_dir: str) -> tuple[Path, str]:
    """(path, source) of the base GGUF for `cfg`, in the order of the module docstring."""
    found = existing_base_gguf(cfg, base_dir)
    return found if found is not None else (written_base_gguf(base_dir), "written from HF")


def existing_base_gguf(cfg, base_dir: str) -> tuple[Path, str] | None:
    """Steps 1-3 of the module docstring (nothing written), or None."""
    from .api import _run_gguf
    from .gguf_common import gguf_facts

    if cfg.evaluation.base_gguf:
        return Path(cfg.evaluation.base_gguf).expanduser(), "config"
    own, _ = _run_gguf(cfg, base_dir)
    if own is not None:
        return own, "run"
    model_type = json.loads((Path(base_dir) / "config.json").read_text())["model_type"]
    for found, source in ((ollama_store_blob(cfg.export.ollama_base), "ollama store"), (_show_blob(cfg), "ollama /api/show")):
        if found is None:
            continue
        arch = gguf_facts(found).fields.get("general.architecture")
        if arch == model_type:
            return found, source
        log.info("%s: %s is a %s model, the run's base is %s: not used", cfg.export.ollama_base, found, arch, model_type)
    cached = written_base_gguf(base_dir, write=False)
    return (cached, "written from HF") if cached.exists() else None


def ollama_models_dirs() -> list[Path]:
    """Where Ollama keeps manifests and blobs: $OLLAMA_MODELS, the user's, the Linux service's."""
    dirs = [Path(os.environ["OLLAMA_MODELS"])] if os.environ.get("OLLAMA_MODELS") else []
    return dirs + [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def ollama_store_blob(name: str, models_dirs: list[Path] | None = None) -> Path | None:
    """The model-weights blob of Ollama model `name` (`qwen2.5:14b`, `user/model`, `host/ns/model:tag`)
    from the store's manifest, or None. Read-only."""
    repo, _, tag = name.partition(":")
    parts = repo.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, "library", parts[0]]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    for models in models_dirs if models_dirs is not None else ollama_models_dirs():
        manifest = models.joinpath("manifests", *parts, tag or "latest")
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        except (OSError, ValueError, AttributeError):
            continue
        for layer in layers if isinstance(layers, list) else []:
            digest = layer.get("digest", "") if isinstance(layer, dict) else ""
            if layer.get("mediaType") == MODEL_MEDIA_TYPE and digest.startswith("sha256:"):
                blob = models / "blobs" / digest.replace(":", "-")
                if blob.is_file():
                    return blob
    return None


def _show_blob(cfg) -> Path | None:
    """The `FROM` file `/api/show` names for export.ollama_base, when it exists on this machine."""
    import httpx

    from .ollama import ollama_host

    try:
        host = ollama_host(cfg)
    except EdentuneError:  # a malformed host is deploy's error to report; here it only means "no lookup"
        return None
    url = (host if "://" in host else f"http://{host}").rstrip("/") + "/api/show"
    try:
        shown = httpx.post(url, json={"model": cfg.export.ollama_base}, timeout=SHOW_TIMEOUT_S).json()
    except (httpx.HTTPError, ValueError):
        return None
    for line in (shown.get("modelfile", "") if isinstance(shown, dict) else "").splitlines():
        if line.startswith("FROM "):
            path = Path(line[5:].strip())
            if path.is_absolute() and path.is_file():
                return path
    return None


def written_base_gguf(base_dir: str, dtype: str = "q4_k_m", *, write: bool = True) -> Path:
    """The HF base written as GGUF once and quantized with llama.cpp (Ollama's usual Q4_K_M), cached."""
    from transformers import AutoModelForCausalLM

    from ..models import cache_root, load_tokenizer
    from .model_gguf import write_model_gguf

    cfg_file = Path(base_dir) / "config.json"
    key = hashlib.sha256(f"{Path(base_dir).resolve()}|{cfg_file.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    path = cache_root() / "gguf-bases" / f"{Path(base_dir).name}-{key}-{dtype}.gguf"
    if write and not path.exists():
        log.info("writing the base as %s GGUF to %s (once)", dtype, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
        write_model_gguf(model, load_tokenizer(base_dir), path, dtype, name=Path(base_dir).name)
    return path


def adapter_gguf(cfg, adapter_dir: Path, base_dir: str) -> Path:
    """The PEFT adapter as the GGUF LoRA `edentune export` writes (same writer, same dtype),
    cached by the adapter files' content, the dtype and the base architecture."""
    from transformers import AutoConfig

    from ..models import cache_root
    from .adapter_gguf import read_peft_adapter, write_adapter_gguf

    base_config = AutoConfig.from_pretrained(base_dir).to_dict()
    dtype = cfg.export.adapter_dtype
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(file_sha256(adapter_dir / name).encode())
    digest.update(f"{dtype}|{base_config.get('model_type')}".encode())
    path = cache_root() / "eval-adapters" / f"{digest.hexdigest()[:24]}-{dtype}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_adapter_gguf(read_peft_adapter(adapter_dir, base_config), path, dtype)
    return path


def exported_adapter_sha256(export_dir: Path) -> str | None:
    """The sha256 of the PEFT weights an export folder was made from (its export_report.json)."""
    from .api import load_export

    return load_export(export_dir).get("adapter_sha256")
