"""`evaluation.backend: auto`: what fits on the device (estimated per backend), then the faster,
with the reason printed; and the compare rule on results scored by different backends."""

from __future__ import annotations

import pytest
from test_compare import result

from edentune.config import RunConfig
from edentune.evaluate.compare import comparability, compare
from edentune.evaluate.memory import choose_backend, eval_memory_terms

QWEN14 = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
              num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)
QWEN7 = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


def peak(config, backend, device, **kw) -> float:
    return sum(eval_memory_terms(config, backend, device=device, max_seq_len=2048, max_new_tokens=256, **kw).values())


def test_estimates_follow_the_weights():
    # 14B: bf16 ~27.5 GiB of weights alone, NF4 ~7.6 GiB + embeddings, Q4_K_M ~8.4 GiB.
    assert 29 < peak(QWEN14, "transformers", "cuda") < 34
    assert 9 < peak(QWEN14, "transformers-nf4", "cuda") < 14
    assert 9 < peak(QWEN14, "gguf", "cuda") < 13
    # A known file size replaces the estimate of the weights.
    assert peak(QWEN14, "gguf", "cuda", base_gguf_bytes=1024**3) < peak(QWEN14, "gguf", "cuda") - 7


@pytest.mark.parametrize("config, device, budget, gguf, expected", [
    (QWEN14, "cpu", 16, True, "gguf"),                 # fp32 on CPU needs ~60 GB
    (QWEN14, "cuda", 24, True, "gguf"),
    (QWEN14, "cuda", 24, False, "transformers-nf4"),   # no llama-cpp-python: the training quantization
    (QWEN7, "cuda", 16, False, "transformers-nf4"),    # 7B bf16: ~14 GiB of weights + ~3.5 GiB perplexity logits
    (QWEN7, "cuda", 24, False, "transformers"),
    (QWEN14, "mps", 24 * 2 / 3, True, "gguf"),          # Metal on a 24 GB Mac
])
def test_auto_picks_what_fits_then_the_faster(config, device, budget, gguf, expected):
    choice = choose_backend(config, device=device, budget_gb=budget, max_seq_len=2048, max_new_tokens=256,
                            gguf_available=gguf)
    assert choice.backend == expected, choice.reason
    assert choice.backend in choice.reason and f"{budget:.1f} GB available" in choice.reason
    assert choice.estimates_gb[expected] <= budget


def test_auto_says_when_nothing_fits():
    choice = choose_backend(QWEN14, device="cuda", budget_gb=6, max_seq_len=2048, max_new_tokens=256)
    assert "nothing fits" in choice.reason and choice.backend == min(choice.estimates_gb, key=choice.estimates_gb.get)


def scored(name, backend, artifacts=None):
    r = result(name)
    r.backend, r.artifacts = backend, artifacts or {}
    return r


def test_compare_refuses_other_backends_or_base_files_unless_asked():
    cfg = RunConfig()
    gguf = {"base_gguf": "a" * 64}
    same = (scored("b", "gguf", gguf), scored("c", "gguf", {**gguf, "adapter_gguf": "c" * 64}))
    assert comparability(*same) == [] and compare(*same, cfg).ship
    other = (scored("b", "transformers-float32"), scored("c", "gguf", gguf))
    assert any("different backends" in p for p in comparability(*other))
    assert not compare(*other, cfg).ship
    assert comparability(*other, allow_different_backends=True) == []
    assert compare(*other, cfg, allow_different_backends=True).ship
    other_base = (scored("b", "gguf", {"base_gguf": "b" * 64}), scored("c", "gguf", gguf))
    assert any("different base GGUF" in p for p in comparability(*other_base))
    assert comparability(*other_base, allow_different_backends=True) == []
    # Asking is not enough when one side does not record what scored it (an older results file).
    unrecorded = (scored("b", None), scored("c", "gguf", gguf))
    problems = comparability(*unrecorded, allow_different_backends=True)
    assert any("not recorded" in p for p in problems) and any("re-run eval" in p for p in problems)
    # Two older files (neither records a backend) still compare as before.
    assert comparability(scored("b", None), scored("c", None)) == []


def test_transformers_backend_loads_the_base_in_nf4(tiny_llama_dir):
    from edentune.evaluate.backends import LocalBackend

    convs = [[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]]
    nf4 = LocalBackend(tiny_llama_dir, device="cpu", load_in_4bit=True, quantization=RunConfig().quantization)
    assert nf4.backend == "transformers-nf4"
    assert any(type(m).__name__ == "Linear4bit" for m in nf4.model.modules())
    (answer,) = nf4.generate(convs, 4)
    assert 0 < answer.completion_tokens <= 4
    assert LocalBackend(tiny_llama_dir, device="cpu").backend == "transformers-float32"
