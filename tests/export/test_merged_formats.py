"""The merged route beyond f16: the pre-tokenizer names llama.cpp splits text by, and the q8_0 /
Q4_K_M files users deploy, each checked by running the written GGUF in llama.cpp."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from conftest import embedded_cfg, make_adapter

# Digits in runs (the two regexes differ only there), contractions, Korean, newlines and spaces.
PROBE_TEXT = "In 2024, 12345 users paid $1,234.56!\n\n  코드 123개를 it's WE'LL 돌려요\r\n\tend  "


def with_pre_tokenizer(tok, pattern: str | None):
    """The same vocabulary and merges under another split regex (as Qwen2.5 / Llama-3 write it)."""
    from tokenizers import Regex, pre_tokenizers

    if pattern is not None:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return tok


def llama_cpp_tokens(gguf_path, text: str) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=False, special=False)


@pytest.mark.parametrize("name", ["smollm", "qwen2", "llama-bpe"])
def test_pre_tokenizer_name_makes_llama_cpp_split_like_training(name, tiny_llama_dir, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edentune.export import model_gguf
    from edentune.export.gguf_common import field_value

    # The tiny llama keeps tokenizer.json's own pre-tokenizer (SmolLM2's); transformers' Qwen2Tokenizer
    # would impose Qwen's split whatever the file says. The SmolLM2 vocabulary has no multi-digit
    # tokens, so here qwen2 and llama-bpe (which differ only in digit runs) split the probe alike.
    pattern = {"smollm": None, "qwen2": model_gguf._QWEN2_SPLIT, "llama-bpe": model_gguf._LLAMA3_SPLIT}[name]
    tok = with_pre_tokenizer(AutoTokenizer.from_pretrained(tiny_llama_dir), pattern)
    path = model_gguf.write_model_gguf(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tok, tmp_path / "m.gguf", "f32")
    assert field_value(gguf.GGUFReader(path), "tokenizer.ggml.pre") == name
    assert llama_cpp_tokens(path, PROBE_TEXT) == tok.encode(PROBE_TEXT, add_special_tokens=False)


def test_a_wrong_pre_tokenizer_name_would_split_differently(tiny_llama_dir, tmp_path, monkeypatch):
    """The check above can fail: Qwen's split labelled as SmolLM's tokenizes the probe differently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edentune.export import model_gguf

    tok = with_pre_tokenizer(AutoTokenizer.from_pretrained(tiny_llama_dir), model_gguf._QWEN2_SPLIT)
    monkeypatch.setattr(model_gguf, "_SPLIT_TO_PRE", {model_gguf._QWEN2_SPLIT: "smollm"})
    path = model_gguf.write_model_gguf(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tok, tmp_path / "m.gguf", "f32")
    assert llama_cpp_tokens(path, PROBE_TEXT) != tok.encode(PROBE_TEXT, add_special_tokens=False)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_k_m"])
def test_quantized_merged_export_runs_in_llama_cpp(dtype, embedded_qwen2_dir, tmp_path):
    # All probe conversations (~60 positions): top-1 agreement over 9 positions is too coarse for a quantized file.
    import gguf

    from edentune.export import export_merged, parity
    from edentune.export.gguf_common import field_value

    cfg = embedded_cfg("qwen2", tmp_path)
    result = export_merged(cfg, make_adapter(embedded_qwen2_dir, tmp_path / "ad"), tmp_path / "export", dtype=dtype)
    report = json.loads(result.report_path.read_text())
    logits = report["logits"]["model.gguf"]
    assert logits["passed"] and report["template"]["passed"]
    tolerance = {"q8_0": parity.Q8, "q4_k_m": parity.QUANTIZED}[dtype]
    assert logits["tolerance"] == asdict(tolerance)  # judged by the format's tolerance, not the exact one
    assert logits["max_rel"] > parity.EXACT.max_rel  # the quantization is real: exact bounds would not hold
    want = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[dtype]
    assert field_value(gguf.GGUFReader(tmp_path / "export" / "model.gguf"), "general.file_type") == want
