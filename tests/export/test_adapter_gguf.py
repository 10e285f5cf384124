"""Adapter conversion: what GGUF cannot hold is refused with its reason; shapes are validated
against the base GGUF without loading llama.cpp (a bad adapter segfaults llama-cpp-python)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from conftest import make_adapter
from safetensors.numpy import load_file, save_file

from edentune.errors import EdentuneError
from edentune.export.adapter_gguf import read_peft_adapter, validate_adapter_against_base, write_adapter_gguf
from edentune.models import embedded_gguf_path


def _config(model_dir) -> dict:
    return json.loads((__import__("pathlib").Path(model_dir) / "config.json").read_text())


@pytest.mark.parametrize(
    ("lora_kwargs", "message"),
    [
        (dict(use_dora=True), "DoRA"),
        (dict(bias="all"), "trains biases"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["q_proj", "lm_head"]), "tied embeddings"),
        (dict(target_modules=["q_proj", "embed_tokens"]), "token embeddings"),
        (dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}), "rank_pattern"),
    ],
)
def test_refusals_name_the_reason(tiny_llama_dir, tmp_path, lora_kwargs, message):
    ad = make_adapter(tiny_llama_dir, tmp_path / "ad", **lora_kwargs)
    with pytest.raises(EdentuneError, match=message) as err:
        read_peft_adapter(ad, _config(tiny_llama_dir))
    assert "--merged" in str(err.value)  # the alternative is named


def test_unknown_module_and_pickle_only_adapters_are_refused(tiny_llama_dir, tmp_path):
    ad = make_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=["q_proj"])
    weights = load_file(ad / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "qkv_proj"): v for k, v in weights.items()}, ad / "adapter_model.safetensors")
    with pytest.raises(EdentuneError, match="unknown module 'qkv_proj'"):
        read_peft_adapter(ad, _config(tiny_llama_dir))
    (ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")
    with pytest.raises(EdentuneError, match="no adapter_model.safetensors"):
        read_peft_adapter(ad, _config(tiny_llama_dir))


def test_untied_lm_head_lora_becomes_output_weight(tiny_llama_dir, tmp_path):
    ad = make_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=["q_proj", "lm_head"])
    weights = load_file(ad / "adapter_model.safetensors")  # PEFT adds the embedding on a tied model
    save_file({k: v for k, v in weights.items() if "embed_tokens" not in k and "base_layer" not in k}, ad / "adapter_model.safetensors")
    adapter = read_peft_adapter(ad, _config(tiny_llama_dir) | {"tie_word_embeddings": False})
    assert "output" in adapter.pairs


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_metadata_shapes_and_rslora_alpha(tiny_qwen2_dir, tmp_path, dtype):
    ad = make_adapter(tiny_qwen2_dir, tmp_path / "ad", r=32, lora_alpha=8, use_rslora=True)
    adapter = read_peft_adapter(ad, _config(tiny_qwen2_dir))
    path = write_adapter_gguf(adapter, tmp_path / "a.gguf", dtype)
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "qwen2" and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(8 * 32 ** 0.5)  # llama.cpp's alpha/r == PEFT's alpha/sqrt(r)
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in r.tensors}
    assert shapes["blk.1.attn_q.weight.lora_a"] == (32, 64) and shapes["blk.1.attn_q.weight.lora_b"] == (64, 32)
    assert shapes["blk.1.attn_k.weight.lora_b"] == (32, 32)  # 2 KV heads x 16
    assert shapes["blk.0.ffn_down.weight.lora_a"] == (32, 128) and len(shapes) == 2 * 7 * 2
    weights = load_file(ad / "adapter_model.safetensors")
    a = weights["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    got = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight.lora_a")
    if dtype != "q8_0":  # qwen2 needs no Q/K permutation and nothing is transposed
        np.testing.assert_allclose(np.asarray(got.data, dtype=np.float32), a, atol=1e-3)


def test_shape_mismatch_is_caught_before_llama_cpp(tiny_llama_dir, tmp_path):
    """An adapter for the tiny model against the embedded base: must raise, not segfault."""
    adapter = read_peft_adapter(make_adapter(tiny_llama_dir, tmp_path / "ad"), _config(tiny_llama_dir))
    path = write_adapter_gguf(adapter, tmp_path / "a.gguf")
    with pytest.raises(EdentuneError, match=r"(?s)does not fit base .*blk\.0\.attn_k\.weight: lora_a \(8, 64\)"):
        validate_adapter_against_base(path, embedded_gguf_path())


def test_missing_base_tensor_and_wrong_arch_are_reported(tiny_llama_dir, tmp_path):
    adapter = read_peft_adapter(make_adapter(tiny_llama_dir, tmp_path / "ad"), _config(tiny_llama_dir))
    adapter.pairs = {"blk.99.attn_q": adapter.pairs["blk.0.attn_q"]}
    adapter.arch = "qwen2"
    path = write_adapter_gguf(adapter, tmp_path / "a.gguf")
    with pytest.raises(EdentuneError) as err:
        validate_adapter_against_base(path, embedded_gguf_path())
    assert "blk.99.attn_q.weight: the base has no such tensor" in str(err.value)
    assert "architecture 'qwen2' does not match the base's 'llama'" in str(err.value)
