"""HF causal LM (optionally with a LoRA merged in) -> a complete GGUF model file, from Python.

This is the fallback route (unsloth#341: no llama.cpp checkout, converter or build needed) and
also how edentune makes a GGUF of a base that has none (the Qwen2 twin in tests). It writes the
hyperparameters llama.cpp reads for `llama` and `qwen2`, the BPE tokenizer with its pre-tokenizer
name and special-token flags, the chat template, and the weights (F32 norms, f16/q8_0 matrices);
Q4_K_M goes through llama.cpp's own quantizer because the gguf package has no K-quants.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import EdentuneError
from .gguf_common import PROJ_TO_GGUF, gguf_arch, permute_rows_for_llama_rope, write_gguf

MODEL_DTYPES = ("f32", "f16", "q8_0", "q4_k_m")

# Pre-tokenizer fingerprints -> llama.cpp's `tokenizer.ggml.pre` name. llama.cpp picks its split
# regex by this name; a wrong one tokenizes differently from training without any error, so an
# unknown pre-tokenizer is refused and `tokenizer_parity` checks the result.
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")
_SPLIT_TO_PRE = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}

_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "smollm"  # GPT-2's split regex without detokenizer space cleanup (SmolLM's tokenizer)
    for step in pre.get("pretokenizers", []):
        pattern = (step.get("pattern") or {}).get("Regex")
        if step.get("type") == "Split" and pattern in _SPLIT_TO_PRE:
            return _SPLIT_TO_PRE[pattern]
    raise EdentuneError(
        f"unknown pre-tokenizer {json.dumps(pre)[:200]}: llama.cpp would split text differently from training",
        hint="use the adapter route (FROM an Ollama base) or a Qwen2.5 / SmolLM2 / Llama-3 tokenizer",
    )


def add_tokenizer(w, tok, vocab_size: int) -> None:
    """BPE ("gpt2") vocabulary, merges, special ids and flags exactly as the HF tokenizer has them."""
    state = json.loads(tok.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE" or (state.get("decoder") or {}).get("type") != "ByteLevel":
        raise EdentuneError("only byte-level BPE tokenizers (GPT-2 style, as Qwen2.5 / SmolLM2 / Llama-3) can be exported to GGUF")
    id_to_token = {i: t for t, i in tok.get_vocab().items()}
    added = {a["id"]: a for a in state.get("added_tokens", [])}
    size = max(vocab_size, len(id_to_token))
    tokens, types = [], []
    for i in range(size):
        if i not in id_to_token:  # embedding rows beyond the tokenizer (e.g. Qwen2.5's padding)
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
            continue
        tokens.append(id_to_token[i])
        types.append(_TOKEN_NORMAL if i not in added else _TOKEN_CONTROL if added[i]["special"] else _TOKEN_USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(state))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for setter, token_id in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                             (w.add_unk_token_id, tok.unk_token_id), (w.add_pad_token_id, tok.pad_token_id)):
        if token_id is not None:
            setter(token_id)
    # Whether BOS/EOS are added is behaviour, not a config flag: observe it.
    probe = tok("a", add_special_tokens=True)["input_ids"]
    w.add_add_bos_token(tok.bos_token_id is not None and probe[0] == tok.bos_token_id)
    w.add_add_eos_token(tok.eos_token_id is not None and probe[-1] == tok.eos_token_id)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _hparams(w, cfg, arch: str) -> None:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise EdentuneError(f"rope scaling {rope.get('rope_type')!r} is not supported by the GGUF writer")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise EdentuneError("the model config has no rope_theta; llama.cpp would silently use 10,000")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(theta))  # qwen2 must set it: llama.cpp silently defaults to 10,000
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)


def _gguf_tensor_name(hf_name: str) -> str | None:
    parts = hf_name.split(".")
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    if parts[:2] == ["model", "layers"]:
        layer, module, kind = parts[2], parts[-2], parts[-1]
        if len(parts) == 6 and module in PROJ_TO_GGUF:
            return f"blk.{layer}.{PROJ_TO_GGUF[module]}.{kind}"
        norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        if parts[3] in norms:
            return f"blk.{layer}.{norms[parts[3]]}.weight"
    return None


def _add_weight(w, name: str, t: np.ndarray, dtype: str) -> None:
    import gguf

    if t.ndim == 1 or dtype == "f32":  # norms and biases stay F32: llama.cpp expects them so
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    elif dtype == "q8_0" and t.shape[-1] % 32 == 0:
        w.add_tensor(name, gguf.quants.quantize(t.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float16))


def write_model_gguf(model, tok, path: str | os.PathLike, dtype: str = "f16", name: str = "edentune") -> Path:
    """Write `model` (a plain HF LlamaForCausalLM / Qwen2ForCausalLM) and `tok` as one GGUF file."""
    import gguf

    if dtype not in MODEL_DTYPES:
        raise EdentuneError(f"model dtype {dtype!r} not supported; choose one of {', '.join(MODEL_DTYPES)}")
    if dtype == "q4_k_m":
        return _quantize_q4_k_m(model, tok, Path(path), name)
    refuse_quantized(model)
    cfg = model.config
    arch = gguf_arch(cfg.model_type)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    w = gguf.GGUFWriter(None, arch)
    w.add_name(name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hparams(w, cfg, arch)
    add_tokenizer(w, tok, cfg.vocab_size)
    for hf_name, param in model.state_dict().items():
        gname = _gguf_tensor_name(hf_name)
        if gname is None:
            if "rotary_emb" in hf_name:
                continue
            raise EdentuneError(f"the GGUF writer does not know tensor {hf_name}")
        if gname == "output.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        t = param.detach().float().cpu().numpy()
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
            t = permute_rows_for_llama_rope(t, heads)
        _add_weight(w, gname, t, dtype)
    return write_gguf(w, path)


def _quantize_q4_k_m(model, tok, path: Path, name: str) -> Path:
    import llama_cpp

    f16 = path.with_name(f".{path.name}.f16.tmp")
    tmp = path.with_name(f".{path.name}.q4.tmp")
    try:
        write_model_gguf(model, tok, f16, "f16", name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = max(1, min(4, os.cpu_count() or 1))
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params) != 0:
            raise EdentuneError(f"llama.cpp could not quantize {f16} to Q4_K_M")
        os.replace(tmp, path)  # the quantizer writes by path; the rename keeps the result atomic
    finally:
        for p in (f16, tmp):
            p.unlink(missing_ok=True)
    return path


def refuse_quantized(model) -> None:
    """Never merge into or export 4-bit weights: the LoRA update is rounded away (peft#2321)."""
    quant = getattr(model.config, "quantization_config", None) or getattr(model, "hf_quantizer", None)
    if quant is not None or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise EdentuneError(
            "the model is loaded quantized (4/8-bit): merging a LoRA into quantized weights rounds the fine-tune away",
            hint="merge into the full-precision base (bf16/fp16/fp32); edentune does this when given the base directory",
        )


def merged_model(base_dir: str, adapter_dir: str | Path):
    """The base in full precision with the PEFT adapter merged in (PEFT's own merge, so DoRA,
    biases and modules_to_save are included too)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    refuse_quantized(base)
    if base.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise EdentuneError(f"{base_dir}: unexpected weight dtype {base.dtype}; merge needs a bf16/fp16/fp32 base")
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
