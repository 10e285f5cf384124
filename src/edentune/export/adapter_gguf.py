"""PEFT LoRA adapter -> GGUF LoRA adapter (what Ollama's `ADAPTER` line needs for Qwen2.5 bases).

The GGUF LoRA format holds, per projection, the two matrices A (r, in) and B (out, r) plus one
global alpha; llama.cpp adds (alpha / r) * B(Ax) beside the (possibly quantized) base matmul.
Everything else a PEFT adapter may contain has no place in it, so it is refused with the reason
and the alternative instead of being silently dropped (ollama#8132, llama.cpp#11554).

llama-cpp-python does not catch a failed adapter load and segfaults on the first eval (llama-cpp-python 0.3.36),
hence `validate_adapter_against_base` runs before any llama.cpp load.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdentuneError
from .gguf_common import PROJ_TO_GGUF, gguf_arch, gguf_facts, permute_rows_for_llama_rope, write_gguf

ADAPTER_DTYPES = ("f32", "f16", "q8_0")
_LAYER_KEY = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_LM_HEAD_KEY = re.compile(r"^base_model\.model\.lm_head\.lora_([AB])\.weight$")
_MERGED_HINT = "export the merged model instead (`edentune export --merged`), which bakes any adapter into the weights"


class AdapterRefused(EdentuneError):
    """The adapter holds something a GGUF LoRA cannot represent."""

    def __init__(self, message: str):
        super().__init__(message, hint=_MERGED_HINT)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter reduced to what GGUF can hold: (A, B) per GGUF base tensor + alpha."""

    arch: str
    r: int
    alpha: float  # the value llama.cpp must read so that alpha / r equals PEFT's scaling
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # "blk.3.attn_q" -> (A, B)


def read_peft_adapter(adapter_dir: str | Path, base_config: dict) -> LoraAdapter:
    """Load adapter_config.json + adapter_model.safetensors (never pickle) and refuse what GGUF can't hold."""
    from safetensors.torch import load_file  # numpy has no bfloat16: a KTO/DPO adapter saved in bf16 must load too

    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.exists():
        raise EdentuneError(f"{adapter_dir}: no adapter_config.json; is this a PEFT adapter directory?")
    if not weights_path.exists():
        found = ", ".join(sorted(p.name for p in adapter_dir.iterdir()))
        raise EdentuneError(
            f"{adapter_dir}: no adapter_model.safetensors (found: {found})",
            hint="edentune reads adapters only as safetensors; pickled .bin files can run code when loaded",
        )
    cfg = _read_adapter_config(cfg_path)
    _refuse_unrepresentable_config(cfg)
    arch = gguf_arch(base_config.get("model_type", "?"))
    try:
        tensors = {k: v.float().numpy() for k, v in load_file(weights_path).items()}
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError/ValueError) on a broken file
        raise EdentuneError(f"{weights_path}: not a readable safetensors file ({str(err)[:160]}); is it truncated or corrupt?",
                            hint="save the adapter again (`model.save_pretrained`) or use the run's final adapter folder") from None
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    # llama.cpp scales by alpha / r; rsLoRA scales by alpha / sqrt(r): store alpha * sqrt(r).
    adapter = LoraAdapter(arch=arch, r=r, alpha=alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha)
    halves: dict[str, dict[str, np.ndarray]] = {}
    # lm_head keys first: on a tied base PEFT also saves the embedding, and the lm_head LoRA is the cause.
    for key, value in sorted(tensors.items(), key=lambda kv: not _LM_HEAD_KEY.match(kv[0])):
        halves.setdefault(_gguf_target(key, base_config), {})[_ab(key)] = value.astype(np.float32)
    for name, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise EdentuneError(f"{weights_path}: {name} has lora_{''.join(ab)} without its partner; the adapter file is incomplete")
        adapter.pairs[name] = (ab["A"], ab["B"])
    if not adapter.pairs:
        raise EdentuneError(f"{weights_path}: no LoRA tensors found")
    check_shapes_against_config(adapter, base_config, weights_path)  # before the permutation, which needs the right shapes
    if arch == "llama":
        for name, (a, b) in adapter.pairs.items():
            if name.endswith(("attn_q", "attn_k")):
                heads = base_config["num_attention_heads"] if name.endswith("attn_q") else base_config["num_key_value_heads"]
                adapter.pairs[name] = (a, permute_rows_for_llama_rope(b, heads))
    return adapter


def _read_adapter_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise EdentuneError(f"{path}: not readable JSON ({str(err)[:160]})", hint="save the adapter again with PEFT") from None
    if not isinstance(cfg, dict):
        raise EdentuneError(f"{path}: not a PEFT adapter config (a JSON object is expected)", hint="save the adapter again with PEFT")
    bad = [k for k in ("r", "lora_alpha") if isinstance(cfg.get(k), bool) or not isinstance(cfg.get(k), (int, float)) or not cfg[k] > 0]
    if bad:
        raise EdentuneError(f"{path}: not a LoRA adapter config: {', '.join(bad)} missing or not a positive number",
                            hint="point --adapter at the folder PEFT's save_pretrained wrote (adapter_config.json + adapter_model.safetensors)")
    return cfg


def expected_shape(stem: str, base_config: dict) -> tuple[int, int] | None:
    """(out, in) of the base weight a GGUF tensor stem names, from the HF config; None if unknown."""
    hidden = base_config.get("hidden_size")
    heads, kv_heads = base_config.get("num_attention_heads"), base_config.get("num_key_value_heads") or base_config.get("num_attention_heads")
    if not hidden or not heads:
        return None
    head_dim = base_config.get("head_dim") or hidden // heads
    ffn = base_config.get("intermediate_size")
    shapes = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden), "attn_v": (kv_heads * head_dim, hidden),
              "attn_output": (hidden, heads * head_dim), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn),
              "output": (base_config.get("vocab_size"), hidden)}
    shape = shapes.get(stem.rsplit(".", 1)[-1])
    return shape if shape and all(shape) else None


def check_shapes_against_config(adapter: LoraAdapter, base_config: dict, source: Path | str) -> None:
    """Every A (r, in) / B (out, r) must fit the base the export targets: cheap (the HF config
    only), so it runs on every export, not only with --verify."""
    layers = base_config.get("num_hidden_layers")
    problems = []
    for stem, (a, b) in sorted(adapter.pairs.items()):
        if stem.startswith("blk.") and layers is not None and int(stem.split(".")[1]) >= layers:
            problems.append(f"{stem}: the base has only {layers} layers")
            continue
        want = expected_shape(stem, base_config)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{stem}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not share a rank")
        elif want is not None and (a.shape[1] != want[1] or b.shape[0] != want[0]):
            problems.append(f"{stem}: lora_A {tuple(a.shape)} x lora_B {tuple(b.shape)} does not fit the base weight (out, in) = {want}")
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise EdentuneError(f"adapter {source} does not fit the base model:\n  {shown}",
                            hint="export with the base the adapter was trained on (model.name_or_path / model.architecture in the config)")


def _ab(key: str) -> str:
    return "A" if ".lora_A." in key else "B"


def _refuse_unrepresentable_config(cfg: dict) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterRefused(f"adapter type {cfg.get('peft_type')!r} is not LoRA; GGUF adapters hold LoRA only")
    if cfg.get("use_dora"):
        raise AdapterRefused("DoRA adapter (use_dora: true): GGUF LoRA has no place for DoRA's per-column magnitude vector")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise AdapterRefused(
            f"the adapter trains biases (bias: {cfg.get('bias')!r}, lora_bias: {cfg.get('lora_bias', False)}): "
            "GGUF LoRA holds only the A and B matrices, the trained biases would be silently lost"
        )
    if cfg.get("modules_to_save"):
        raise AdapterRefused(
            f"modules_to_save={cfg['modules_to_save']}: the adapter carries full copies of those modules "
            "(embeddings / lm_head), which a GGUF LoRA cannot hold"
        )
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterRefused("per-module rank_pattern/alpha_pattern: a GGUF LoRA stores a single alpha for all tensors")


def _gguf_target(key: str, base_config: dict) -> str:
    """Map one PEFT tensor key to its GGUF base tensor stem, refusing anything without one."""
    if m := _LAYER_KEY.match(key):
        layer, module = m.group(1), m.group(2)
        if module not in PROJ_TO_GGUF:
            raise AdapterRefused(
                f"LoRA on unknown module {module!r} ({key}); GGUF export knows {', '.join(PROJ_TO_GGUF)}"
            )
        return f"blk.{layer}.{PROJ_TO_GGUF[module]}"
    if _LM_HEAD_KEY.match(key):
        if base_config.get("tie_word_embeddings", False):
            raise AdapterRefused(
                "LoRA on lm_head of a base with tied embeddings: the base GGUF has no separate output.weight, "
                "so llama.cpp fails to load the adapter"
            )
        return "output"
    if "lora_embedding_" in key or "embed_tokens" in key:
        raise AdapterRefused(f"LoRA or trained copy of the token embeddings ({key}): not representable in a GGUF LoRA")
    if key.endswith(".bias"):
        raise AdapterRefused(f"trained bias tensor {key}: GGUF LoRA holds only the A and B matrices")
    if key.endswith("lm_head.weight"):
        raise AdapterRefused(f"full lm_head copy {key} (modules_to_save): not representable in a GGUF LoRA")
    raise AdapterRefused(f"unrecognised adapter tensor {key}; GGUF export knows LoRA on {', '.join(PROJ_TO_GGUF)}")


def write_adapter_gguf(adapter: LoraAdapter, path: str | Path, dtype: str = "f16") -> Path:
    import gguf

    if dtype not in ADAPTER_DTYPES:
        raise EdentuneError(f"adapter dtype {dtype!r} not supported; choose one of {', '.join(ADAPTER_DTYPES)}")
    w = gguf.GGUFWriter(None, adapter.arch)
    w.add_type(gguf.GGUFType.ADAPTER)  # without it Ollama stores the file as a second model
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
    for stem, (a, b) in adapter.pairs.items():
        _add_tensor(w, f"{stem}.weight.lora_a", a, dtype)
        _add_tensor(w, f"{stem}.weight.lora_b", b, dtype)
    return write_gguf(w, path)


def _add_tensor(w, name: str, t: np.ndarray, dtype: str) -> None:
    import gguf

    # Q8_0 packs rows in blocks of 32; B's rows are r long, so small ranks fall back to f16.
    if dtype == "q8_0" and t.shape[-1] % 32 == 0:
        w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    elif dtype == "f32":
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    else:
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float16))


def validate_adapter_against_base(adapter_path: str | Path, base_path: str | Path, *, label: str | None = None) -> dict:
    """Check every lora_a/lora_b pair against the base GGUF's tensors, without llama.cpp.

    Returns a summary; raises EdentuneError naming the first problems (the adapter as `label`,
    default its path). This is what stands between a mismatched adapter and a segfault inside
    llama-cpp-python.
    """
    facts = []
    for path, what in ((adapter_path, f"adapter {label or adapter_path}"), (base_path, f"base {base_path}")):
        try:
            facts.append(gguf_facts(path))
        except Exception as err:  # gguf raises ValueError/struct/numpy errors on a truncated or foreign file
            raise EdentuneError(f"{what} is not a readable GGUF file ({str(err)[:160]})",
                                hint="export it again with `edentune export`") from None
    af, bf = facts
    problems: list[str] = []
    if af.fields.get("general.type") != "adapter" or af.fields.get("adapter.type") != "lora":
        problems.append("metadata general.type must be 'adapter' and adapter.type 'lora'")
    alpha = af.fields.get("adapter.lora.alpha")
    if alpha is None:
        problems.append("adapter.lora.alpha is missing (llama.cpp would use scale 1 instead of alpha/r)")
    a_arch, b_arch = af.fields.get("general.architecture"), bf.fields.get("general.architecture")
    if a_arch != b_arch:
        problems.append(f"architecture {a_arch!r} does not match the base's {b_arch!r}")
    base, lora = bf.shapes, af.shapes
    stems = {n.rsplit(".lora_", 1)[0] for n in lora}
    for stem in sorted(stems):
        a, b = lora.get(f"{stem}.lora_a"), lora.get(f"{stem}.lora_b")
        if a is None or b is None:
            problems.append(f"{stem}: lora_a and lora_b must both be present")
        elif stem not in base:
            problems.append(f"{stem}: the base has no such tensor")
        elif len(base[stem]) != 2 or a[0] != b[1] or a[1] != base[stem][1] or b[0] != base[stem][0]:
            problems.append(
                f"{stem}: lora_a {a} x lora_b {b} does not fit base {base[stem]} (need A (r, in), B (out, r))"
            )
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise EdentuneError(
            f"adapter {label or adapter_path} does not fit base {base_path}:\n  {shown}",
            hint="export the adapter from a model of the same architecture and size as the base",
        )
    return {"tensors": len(stems), "architecture": a_arch, "alpha": float(alpha)}
