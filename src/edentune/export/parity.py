"""Does the exported model behave like the trained one? Numbers instead of hope (llama.cpp#7062).

Three checks, each reported with its numbers and threshold:
- logits: llama.cpp (base GGUF + adapter GGUF, or merged GGUF) against the HF/PEFT model on the
  same token ids: max abs and relative difference, top-1 agreement along greedy continuations;
- adapter delta: (with adapter - without) in both, which isolates the adapter from base
  quantization noise (a quantized base GGUF re-quantizes activations, the HF copy does not);
- template: the prompt Ollama builds from TEMPLATE + SYSTEM tokenizes (llama.cpp, special=True)
  to exactly training's `apply_chat_template` ids.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdentuneError

# Probe conversations: plain, Korean, multi-turn, code and odd whitespace; prompts end at a user turn.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "안녕하세요! 오늘 날씨가 어때요?"}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
     {"role": "user", "content": "Now make it add three.  Thanks!\n\n"}],
    [{"role": "user", "content": "List 3 colours:\n- red\n- ...  \t(tab) 12345 ünïcödé 🙂"}],
]

_EXACT_TYPES = (0, 1, 32)  # GGUF file types ALL_F32, MOSTLY_F16, MOSTLY_BF16
_Q8_0_TYPE = 7  # MOSTLY_Q8_0


@dataclass
class Tolerance:
    max_rel: float  # max |llama.cpp - HF| / max |HF logit|
    min_top1: float  # top-1 agreement along the greedy continuations
    max_delta_rel: float | None = None  # ||delta_llama - delta_hf|| / ||delta_hf||


EXACT = Tolerance(max_rel=0.02, min_top1=0.95, max_delta_rel=0.10)
# Quantized files: llama.cpp also quantizes activations to 8 bits in every matmul while the HF
# copy runs fp32, so these bounds catch a broken export (wrong template, rope or permutation gives
# max rel > 0.5 and top-1 < 0.5) and the report says how much quality the format costs. Measured
# on the embedded SmolLM2 and its Qwen2 twin (~60 positions, base alone and with an adapter):
# the package's Q4_1 base (weights identical to HF's) max rel ~0.05; a merged model written as
# q8_0 0.056-0.076, top-1 0.93-0.97; as Q4_K_M 0.19-0.21, top-1 0.88-0.95. The adapter changes
# the activations, so the rounding noise does not cancel in the adapter delta (measured delta_rel
# 0.6-0.85): it is reported, not gated; the exact (f16) reference checks the adapter itself.
Q8 = Tolerance(max_rel=0.15, min_top1=0.85, max_delta_rel=None)
QUANTIZED = Tolerance(max_rel=0.35, min_top1=0.75, max_delta_rel=None)


@dataclass
class LogitReport:
    max_abs: float
    max_rel: float
    top1_agreement: float
    positions: int
    tolerance: dict
    delta_max_abs: float | None = None
    delta_rel: float | None = None
    passed: bool = False
    failures: list[str] = field(default_factory=list)


@dataclass
class TemplateReport:
    prompts: int
    mismatches: list[dict]
    passed: bool


def tolerance_for(*gguf_paths: str | os.PathLike) -> Tolerance:
    """The loosest tolerance any of the files needs: exact for f32/f16/bf16, Q8 for 8-bit, else QUANTIZED."""
    from .gguf_common import gguf_facts

    needed = [EXACT]
    for p in gguf_paths:
        facts = gguf_facts(p)
        if facts.fields.get("general.type") == "adapter":
            kinds = facts.tensor_types - {"F32", "F16", "BF16"}
            needed.append(EXACT if not kinds else Q8 if kinds == {"Q8_0"} else QUANTIZED)
        else:
            file_type = facts.fields.get("general.file_type", 0)
            needed.append(EXACT if file_type in _EXACT_TYPES else Q8 if file_type == _Q8_0_TYPE else QUANTIZED)
    return max(needed, key=lambda t: t.max_rel)


def probe_token_ids(tok, system: str | None, conversations: list | None = None) -> list[list[int]]:
    return [training_ids(tok, system, conv) for conv in conversations or PROBE_CONVERSATIONS]


def training_ids(tok, system: str | None, messages: list[dict]) -> list[int]:
    """Token ids of training's rendering of a prompt (system inserted when the conversation has none)."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + messages
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def llama_model(path, lora: str | os.PathLike | None = None, n_ctx: int = 512, vocab_only: bool = False,
                n_threads: int | None = None):
    """llama.cpp on a GGUF (+ a GGUF LoRA at scale 1, as Ollama passes it). Validate the adapter
    first (adapter_gguf.validate_adapter_against_base): a bad one segfaults llama-cpp-python."""
    from llama_cpp import Llama

    n_threads = n_threads or max(1, min(2, os.cpu_count() or 1))
    return Llama(str(path), lora_path=str(lora) if lora else None, lora_scale=1.0, logits_all=True, n_ctx=n_ctx,
                 n_threads=n_threads, n_threads_batch=n_threads, vocab_only=vocab_only, verbose=False)


def greedy_answer(llm, prompt: str, n_predict: int, stop: list[str]) -> str:
    """The greedy continuation of a rendered prompt (special tokens parsed, as Ollama's runner does)."""
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    llm.reset()  # no reuse of a cached prefix: evaluated in other batches, the logits (and a greedy answer) can differ
    out = llm.create_completion(ids, max_tokens=n_predict, temperature=0.0, top_k=1, seed=0, stop=stop or None)
    return out["choices"][0]["text"]


def _llama_logits(llm, sequences: list[list[int]]) -> list[np.ndarray]:
    out = []
    for ids in sequences:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return out


def _hf_logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]


def _greedy_sequences(model, prompts: list[list[int]], tok, n_new: int) -> list[list[int]]:
    import torch

    seqs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
            seqs.append(out[0].tolist())
    return seqs


def compare_logits(hf: list[np.ndarray], ll: list[np.ndarray], prompt_lens: list[int], tol: Tolerance,
                   hf_base: list[np.ndarray] | None = None, ll_base: list[np.ndarray] | None = None) -> LogitReport:
    diff = max(float(np.abs(h - g).max()) for h, g in zip(hf, ll))
    scale = max(float(np.abs(h).max()) for h in hf)
    # Top-1 agreement on the positions that predict the prompt's next token and the continuation.
    agree = [(h[n - 1:].argmax(-1) == g[n - 1:].argmax(-1)) for h, g, n in zip(hf, ll, prompt_lens)]
    agree_all = np.concatenate(agree)
    rep = LogitReport(max_abs=diff, max_rel=diff / scale, top1_agreement=float(agree_all.mean()),
                      positions=int(agree_all.size), tolerance=asdict(tol))
    if rep.max_rel > tol.max_rel:
        rep.failures.append(f"max relative logit difference {rep.max_rel:.4f} > {tol.max_rel}")
    if rep.top1_agreement < tol.min_top1:
        rep.failures.append(f"top-1 agreement {rep.top1_agreement:.3f} < {tol.min_top1}")
    if hf_base is not None and ll_base is not None:
        dh = np.concatenate([(a - b).ravel() for a, b in zip(hf, hf_base)])
        dl = np.concatenate([(a - b).ravel() for a, b in zip(ll, ll_base)])
        rep.delta_max_abs = float(np.abs(dh - dl).max())
        rep.delta_rel = float(np.linalg.norm(dh - dl) / max(np.linalg.norm(dh), 1e-12))
        if tol.max_delta_rel is not None and rep.delta_rel > tol.max_delta_rel:
            rep.failures.append(f"adapter delta relative error {rep.delta_rel:.3f} > {tol.max_delta_rel} "
                                "(1.0 means the adapter has no effect in llama.cpp)")
    rep.passed = not rep.failures
    return rep


def adapter_parity(base_dir: str, adapter_dir: str | Path, adapter_gguf: str | Path, base_ggufs: list[Path],
                   system: str | None, n_new: int = 8, label: str | None = None) -> list[LogitReport]:
    """llama.cpp base GGUF + adapter GGUF against HF base + PEFT adapter, with and without the
    adapter, once per base GGUF (the HF side is computed once). `label` names the adapter in
    errors (the GGUF may sit in a temporary folder that is gone when the error is read)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..models import load_tokenizer
    from .adapter_gguf import validate_adapter_against_base

    for ref in base_ggufs:
        validate_adapter_against_base(adapter_gguf, ref, label=label)  # before llama.cpp touches it: no segfault
    tok = load_tokenizer(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32"), str(adapter_dir))
    model.eval()
    prompts = probe_token_ids(tok, system)
    seqs = _greedy_sequences(model, prompts, tok, n_new)
    hf = _hf_logits(model, seqs)
    with model.disable_adapter():
        hf_base = _hf_logits(model, seqs)
    n_ctx = max(len(s) for s in seqs) + 16
    reports = []
    for ref in base_ggufs:
        ll = _llama_logits(llama_model(ref, adapter_gguf, n_ctx), seqs)
        ll_base = _llama_logits(llama_model(ref, None, n_ctx), seqs)
        reports.append(compare_logits(hf, ll, [len(p) for p in prompts], tolerance_for(ref, adapter_gguf), hf_base, ll_base))
    return reports


def model_parity(model, tok, model_gguf: str | Path, system: str | None, n_new: int = 8) -> LogitReport:
    """llama.cpp on a merged (or plain) GGUF model against the HF model it was written from."""
    prompts = probe_token_ids(tok, system)
    seqs = _greedy_sequences(model, prompts, tok, n_new)
    hf = _hf_logits(model, seqs)
    ll = _llama_logits(llama_model(model_gguf, None, max(len(s) for s in seqs) + 16), seqs)
    return compare_logits(hf, ll, [len(p) for p in prompts], tolerance_for(model_gguf))


def ollama_messages(system: str | None, messages: list[dict]) -> tuple[str, list[dict]]:
    """What Ollama's chat handler passes to the template: the Modelfile SYSTEM is prepended as a
    system message when the request has none, then system messages are joined into .System
    (they also stay in .Messages) and consecutive same-role messages are merged."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + messages
    systems, collated = [], []
    for m in messages:
        if m["role"] == "system":
            systems.append(m["content"])
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return "\n\n".join(systems), collated


def render_ollama_prompt(template: str, system: str | None, messages: list[dict]) -> str:
    from .gotemplate import render

    sys_text, msgs = ollama_messages(system, messages)
    return render(template, {"System": sys_text, "Messages": msgs, "Tools": None, "Prompt": "", "Response": ""})


def template_parity(template: str, system: str | None, tok, vocab_gguf: str | Path,
                    conversations: list | None = None) -> TemplateReport:
    """Every prompt prefix (ending at a user turn) must give the same ids through Ollama's path
    (Go template, then llama.cpp's tokenizer) as through training's `apply_chat_template`."""
    llm = llama_model(vocab_gguf, vocab_only=True)
    mismatches, count = [], 0
    for conv in conversations or PROBE_CONVERSATIONS:
        for end in (i + 1 for i, m in enumerate(conv) if m["role"] == "user"):
            msgs = conv[:end]
            want = training_ids(tok, system, msgs)
            text = render_ollama_prompt(template, system, msgs)
            got = llm.tokenize(text.encode(), add_bos=True, special=True)
            count += 1
            if got != want:
                mismatches.append({"messages": msgs, "ollama_text": text, "training_text": tok.decode(want),
                                   "ollama_ids": got[:64], "training_ids": want[:64]})
    return TemplateReport(prompts=count, mismatches=mismatches, passed=not mismatches)


def generate_request_messages(modelfile_system: str | None, prompt: str, request_system: str | None = None) -> list[dict]:
    """The message list Ollama's GenerateHandler (server/routes.go) builds for a non-raw
    /api/generate with no suffix, no context and a model without MESSAGE lines: the request's
    `system`, else the Modelfile's SYSTEM; then one user message holding the whole `prompt`."""
    system = request_system or modelfile_system
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def render_generate_prompt(template: str, modelfile_system: str | None, prompt: str) -> str:
    """The text Ollama renders for such a /api/generate request (TEMPLATE over .Messages)."""
    return render_ollama_prompt(template, None, generate_request_messages(modelfile_system, prompt))


PROBE_REPLY = "Sure: here it is."  # any reply: only the prompt before it is compared


def generate_parity(template: str, system: str | None, tok, vocab_gguf: str | Path, layout,
                    conversations: list | None = None) -> TemplateReport:
    """request_format eden: for each probe user message, the /api/generate request the app sends
    (`prompt` in the app's layout, no `system`), rendered by `template` with the Modelfile's SYSTEM
    and tokenized by llama.cpp, must give exactly the ids the training encoder puts before the
    first trained token of that message's example."""
    from ..data.encode import IGNORE, Conversation, encode_conversation

    llm = llama_model(vocab_gguf, vocab_only=True)
    mismatches, count = [], 0
    for conv in conversations or PROBE_CONVERSATIONS:
        for end in (i + 1 for i, m in enumerate(conv) if m["role"] == "user"):
            msgs = conv[:end]
            prompt = layout.prompt(msgs)[-1]["content"]  # the request's `prompt` field
            example = layout.examples([msgs[-1], {"role": "assistant", "content": PROBE_REPLY}])[0]
            enc = encode_conversation(tok, Conversation("probe", example), system)
            want = enc.input_ids[: next(i for i, label in enumerate(enc.labels) if label != IGNORE)]
            text = render_generate_prompt(template, system, prompt)
            got = llm.tokenize(text.encode(), add_bos=True, special=True)
            count += 1
            if got != want:
                mismatches.append({"prompt": prompt, "ollama_text": text, "training_text": tok.decode(want),
                                   "ollama_ids": got[:64], "training_ids": want[:64]})
    return TemplateReport(prompts=count, mismatches=mismatches, passed=not mismatches)


def serving_parity(cfg, template: str, tok, vocab_gguf: str | Path) -> TemplateReport:
    """The template check for the config's request format: chat prompts (/api/chat) or the app's
    single-turn /api/generate requests (request_format eden)."""
    from ..data.eden_layout import request_layout

    layout = request_layout(cfg.export)
    if layout.single_turn:
        return generate_parity(template, cfg.model.system_prompt, tok, vocab_gguf, layout)
    return template_parity(template, cfg.model.system_prompt, tok, vocab_gguf)


def raise_on_failure(logits: list[LogitReport], template: TemplateReport | None, report_path: Path) -> None:
    problems = [f for rep in logits for f in rep.failures]
    if template and not template.passed:
        problems.append(f"{len(template.mismatches)} template mismatch(es)")
    if problems:
        raise EdentuneError("export parity check failed: " + "; ".join(problems),
                            hint=f"details in {report_path}; the exported files were kept for inspection")
