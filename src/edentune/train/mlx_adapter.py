"""MLX LoRA weights <-> the PEFT adapter layout that eval, compare, export and deploy read.

mlx-lm's `LoRALinear` computes `y = W x + scale * (x @ lora_a) @ lora_b` with `lora_a` (in, r)
and `lora_b` (r, out); PEFT computes `y = W x + (alpha / r) * B (A x)` with `lora_A.weight`
(r, in) and `lora_B.weight` (out, r). So A = lora_a.T, B = lora_b.T and scale = alpha / r
(alpha / sqrt(r) for rsLoRA, which PEFT and the GGUF export both handle). Module paths are the
same in both (`model.layers.N.self_attn.q_proj`) for the llama and qwen2 families, PEFT only
prefixes `base_model.model.`.

No library converts between the two: mlx-lm's own `fuse --export-gguf` only writes merged
llama/mistral models, and it writes no PEFT adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edentune.errors import EdentuneError

MLX_SUBDIR = "mlx"  # mlx-lm's own adapter (adapters.safetensors + its adapter_config.json)
MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """mlx-lm's `scale` for PEFT's (alpha, r, use_rslora)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def mlx_to_peft(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`model.layers.0.self_attn.q_proj.lora_a` (in, r) -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (r, in)."""
    out = {}
    for name, value in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise EdentuneError(f"MLX adapter tensor {name}: only LoRA A/B matrices can become a PEFT adapter")
        half = "A" if leaf == "lora_a" else "B"
        out[f"base_model.model.{path}.lora_{half}.weight"] = np.ascontiguousarray(np.asarray(value, dtype=np.float32).T)
    return out


def peft_to_mlx(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `mlx_to_peft`: a PEFT adapter's tensors as mlx-lm LoRA parameters."""
    out = {}
    for name, value in weights.items():
        path, sep, half = name.removeprefix("base_model.model.").rpartition(".lora_")
        if not sep or half not in ("A.weight", "B.weight"):
            raise EdentuneError(f"adapter tensor {name}: only LoRA A/B matrices can continue on the MLX backend")
        out[f"{path}.lora_{half[0].lower()}"] = np.ascontiguousarray(np.asarray(value, dtype=np.float32).T)
    return out


def load_peft_into_mlx(model, adapter_dir: str | Path) -> None:
    """Set the LoRA layers of `model` (made by `add_lora` with the adapter's r and targets) to a saved
    PEFT adapter's weights, in the model's dtype: `edentune cycle` continues the live adapter."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from safetensors.numpy import load_file

    weights = peft_to_mlx(load_file(str(Path(adapter_dir) / PEFT_WEIGHTS)))
    current = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(current):
        missing, extra = sorted(set(current) - set(weights)), sorted(set(weights) - set(current))
        raise EdentuneError(f"{adapter_dir}: its LoRA tensors do not match this model's LoRA layers "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})",
                            hint="continue an adapter trained on the same base with the same lora settings")
    for name, value in weights.items():
        if value.shape != tuple(current[name].shape):
            raise EdentuneError(f"{adapter_dir}: {name} has shape {value.shape}, the model's LoRA layer {tuple(current[name].shape)}")
    model.load_weights([(k, mx.array(v).astype(current[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())


def write_peft_adapter(out_dir: str | Path, weights: dict[str, np.ndarray], *, r: int, alpha: float, dropout: float,
                       target_modules: list[str], use_rslora: bool, base_model: str) -> None:
    """adapter_model.safetensors + adapter_config.json, the config written by PEFT's own LoraConfig."""
    from peft import LoraConfig
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    save_file(mlx_to_peft(weights), str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(target_modules),
                        use_rslora=use_rslora, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    config.save_pretrained(str(out_dir))


def write_mlx_adapter(out_dir: str | Path, weights: dict, *, num_layers: int, rank: int, scale: float, dropout: float,
                      keys: list[str], base_model: str) -> None:
    """mlx-lm's layout, loadable with `mlx_lm.generate --adapter-path <out_dir>` or `mlx_lm.utils.load_adapters`."""
    import mlx.core as mx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / MLX_WEIGHTS), {k: mx.array(v) for k, v in weights.items()})
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": num_layers, "model": base_model,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": sorted(keys)},
    }, indent=2) + "\n")
