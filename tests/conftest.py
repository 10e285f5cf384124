"""Shared fixtures: the embedded model (and its Qwen2 twin) and tiny random models built here.

Tiny models reuse the embedded model's real ChatML tokenizer (pad = eos = <|im_end|>, the
pitfall the masking must survive) with a few-layer random body, so tests exercise the real
template and token ids at a fraction of the cost.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two compute threads, as on the 2-core CI machine, set before anything imports torch (which
# reads it then): torch itself is imported only by the fixtures and tests that need it, so
# `make test-fast` does not pay for it.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, os.cpu_count() or 1))))

# A test that uses one of these fixtures loads or builds a model, trains, or serves one: it is
# `slow` (left out by `make test-fast`, run by `make test`). Tests that do so without a fixture
# carry the marker themselves.
HEAVY_FIXTURES = {"embedded_dir", "embedded_qwen2_dir", "tiny_llama_dir", "tiny_qwen2_dir", "standin_factory",
                  "make_workspace", "first_round", "embedded_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    from edentune.models import resolve_model_dir

    return resolve_model_dir("embedded", architecture="llama")


@pytest.fixture(scope="session")
def embedded_qwen2_dir() -> str:
    from edentune.models import resolve_model_dir

    return resolve_model_dir("embedded", architecture="qwen2")


def _build_tiny(arch: str, out: Path, tokenizer_dir: str) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_dir) -> str:
    return _build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), embedded_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, embedded_dir) -> str:
    return _build_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), embedded_dir)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "src" / "edentune" / "data" / "sample"


@pytest.fixture
def trickle_server():
    """An HTTP server that sends its headers, then one byte every 0.25 s forever (tests/trickle_server.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from trickle_server import TrickleServer

    with TrickleServer() as server:
        yield server
