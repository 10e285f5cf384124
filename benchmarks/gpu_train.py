"""QLoRA on the Qwen2.5-14B architecture (random weights): peak memory, tokens/s, MFU.

For a lent GPU without internet: the model is built on the meta device and each projection is
created directly as a bitsandbytes NF4 (double-quant) Linear4bit from random bf16 weights, one
layer at a time, so the full bf16 model (29.5 GB) never exists. Then edentune's recipe:
`prepare_model_for_kbit_training` (embeddings/head/norms to fp32, gradient checkpointing), LoRA
r=32 alpha=64 on the seven projections, paged 8-bit AdamW, HF's default loss, batch 4, for seq
1024 and 2048. Speed and memory do not depend on weight values.

Imports only torch, transformers, peft, bitsandbytes (no trl, no edentune needed; the memory
planner `edentune.train.plan.estimate` is reported beside the measurement when importable).

MFU. N = parameters of the base (embeddings excluded: a lookup, no matmul). Per trained token:
forward 2N, backward 2N (activation gradients only: the base is frozen; LoRA's weight gradients
are < 1%), and gradient checkpointing recomputes the forward, 2N more. Attention scores add
2·L·s·d per token forward under a causal mask (QK^T and AV, half of the s×s), twice that backward.
    model FLOPs/token    = 4N + 6·L·s·d     (useful work; the usual ≈4·N of LoRA on a frozen base)
    hardware FLOPs/token = 6N + 8·L·s·d     (plus the forward recomputed by checkpointing)
MFU = tokens/s × model FLOPs/token / peak; "HFU" uses hardware FLOPs. Peak is the bf16 dense spec
(989 TFLOP/s for H100/H200 SXM) and, as `measured_peak`, a large bf16 matmul timed here.

    python benchmarks/gpu_train.py --out gpu_train.json           # on the GPU, < 6 minutes
    python benchmarks/gpu_train.py --smoke --out /tmp/smoke.json  # tiny config on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # edentune's loss and planner
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN25_14B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                  num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6,
                  max_position_embeddings=32768, rms_norm_eps=1e-6)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False, rope_theta=1e6,
             max_position_embeddings=512)
SPEC_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_qlora_base(config: Qwen2Config, device: str) -> Qwen2ForCausalLM:
    """Qwen2 with NF4 projections from random weights, never holding the whole model in bf16."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name not in SEVEN:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="meta")
                w = torch.randn(lin.out_features, lin.in_features, dtype=torch.bfloat16, device=device) * 0.02
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                             module=q).to(device)  # .to() quantizes
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=torch.bfloat16, device=device), requires_grad=False)
                setattr(parent, name, q)
    # The rest (embeddings, untied head, norms) is small next to the projections: materialise it
    # module by module (Module.to_empty would also wipe the quantized weights).
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                data = torch.ones(p.shape, device=device) if "norm" in type(module).__name__.lower() else torch.randn(p.shape, device=device) * 0.02
                setattr(module, name, torch.nn.Parameter(data.to(torch.bfloat16), requires_grad=False))
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # its inv_freq buffer was on meta
    model.is_loaded_in_4bit = True  # how PEFT and prepare_model_for_kbit_training recognise a bnb 4-bit model
    return model


def base_params(config: Qwen2Config) -> int:
    h, i, L, kv = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_key_value_heads
    head_dim = h // config.num_attention_heads
    attn = h * h * 2 + 2 * h * kv * head_dim + 2 * kv * head_dim + h  # q,o + k,v weights + biases
    return L * (attn + 3 * h * i) + h * config.vocab_size  # + lm_head (a matmul); embeddings excluded


def measured_peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ a
    torch.cuda.synchronize()
    return n * 2 * 8192**3 / (time.perf_counter() - t0)


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def planner_estimate(config: Qwen2Config, batch: int, seq: int, device_gb: float, loss: str) -> dict | None:
    try:
        from edentune.config import config_for_model
        from edentune.train.plan import estimate
    except ImportError as err:
        return {"unavailable": str(err)}
    cfg = config_for_model("qwen2.5-14b")
    cfg.model.max_seq_len, cfg.training.per_device_batch_size = seq, batch
    cfg.training.gradient_checkpointing, cfg.lora.r, cfg.lora.alpha = True, 32, 64.0
    try:
        plan = estimate(cfg, config, device_gb, loss=loss)
    except Exception as err:  # the planner is being written concurrently: report, never crash the benchmark
        return {"error": repr(err)}
    return {"total_gb": plan.total_gb, "terms": plan.terms}


def compute_loss(model, ids: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "hf":
        return model(input_ids=ids, labels=ids).loss  # transformers' default: fp32 logits at every position
    from edentune.train.trainer import trained_token_loss  # edentune's engine: trained positions, chunked

    total, n = trained_token_loss(model, {"input_ids": ids, "labels": ids})
    return total / n


def run_seq(model, optimizer, config, device: str, batch: int, seq: int, steps: int, warmup: int, loss_kind: str) -> dict:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device="cpu").manual_seed(0)
    times = []
    try:
        for step in range(steps):
            ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            # bf16 autocast, as Trainer runs with `bf16=True`: without it the fp32 norms and head
            # (prepare_model_for_kbit_training) keep activations in fp32 and attention falls back
            # to kernels that materialise the s x s scores.
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = compute_loss(model, ids, loss_kind)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as err:
        return {"seq": seq, "batch": batch, "loss": loss_kind, "oom": str(err).splitlines()[0], "peak_memory_gb": peak_memory_gb(device)}
    timed = times[warmup:] or times
    tokens_per_s = batch * (seq - 1) / (sum(timed) / len(timed))  # trained tokens: every position but the first
    N, L, d = base_params(config), config.num_hidden_layers, config.hidden_size
    attn_fwd = 2 * L * seq * d  # causal attention matmuls per token, see the module docstring
    model_flops, hw_flops = 4 * N + 3 * attn_fwd, 6 * N + 4 * attn_fwd
    out = {"seq": seq, "batch": batch, "loss": loss_kind, "steps": steps, "timed_steps": len(timed), "step_s": sum(timed) / len(timed),
           "trained_tokens_per_s": tokens_per_s, "peak_memory_gb": peak_memory_gb(device),
           "model_flops_per_token": model_flops, "hardware_flops_per_token": hw_flops, "final_loss": loss.item()}
    if device == "cuda":
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the script, measures nothing useful")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--losses", nargs="+", default=["hf", "edentune"], choices=["hf", "edentune"])
    a = ap.parse_args()
    t_start = time.time()
    device = "cpu" if a.smoke else "cuda"
    if a.smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        a.steps, a.seqs = min(a.steps, 3), [64, 128]
    config = Qwen2Config(**(SMOKE if a.smoke else QWEN25_14B), use_sliding_window=False)
    config._attn_implementation = "sdpa"

    torch.manual_seed(0)
    t0 = time.time()
    model = build_qlora_base(config, device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=SEVEN,
                                             bias="none", task_type="CAUSAL_LM"))
    build_s = time.time() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.01)
    weights_gb = peak_memory_gb(device)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    device_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else 0.0
    spec = next((v for k, v in SPEC_PEAK.items() if k in gpu), None)
    measured = measured_peak_flops(device)

    runs = []
    for loss_kind, seq in [(lk, sq) for lk in a.losses for sq in a.seqs]:
        r = run_seq(model, optimizer, config, device, a.batch, seq, a.steps, warmup=2 if a.steps > 3 else 1, loss_kind=loss_kind)
        if "trained_tokens_per_s" in r:
            for label, peak in (("spec", spec), ("measured_peak", measured)):
                if peak:
                    r[f"mfu_{label}"] = r["trained_tokens_per_s"] * r["model_flops_per_token"] / peak
                    r[f"hfu_{label}"] = r["trained_tokens_per_s"] * r["hardware_flops_per_token"] / peak
        r["planner"] = planner_estimate(config, a.batch, seq, device_gb, loss_kind)
        runs.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "planner"}), flush=True)

    result = {
        "device": gpu, "device_gb": device_gb, "smoke": a.smoke, "torch": torch.__version__,
        "bitsandbytes": bnb.__version__, "base_params_N": base_params(config), "trainable_params": trainable,
        "build_s": build_s, "memory_after_build_gb": weights_gb, "spec_peak_flops": spec, "measured_peak_flops": measured,
        "lora": {"r": 32, "alpha": 64, "targets": SEVEN}, "optimizer": "PagedAdamW8bit", "gradient_checkpointing": True,
        "runs": runs, "total_s": time.time() - t_start,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
