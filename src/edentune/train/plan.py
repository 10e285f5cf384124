"""Memory planner: will this run fit, and which setting to change if not.

Peak training memory is estimated term by term (bytes):

- base weights: 4-bit NF4 + double quantization ~= 4.127 bits per quantized parameter; the
  embedding and an untied head stay in the residual-stream dtype: bf16 with the bf16 stream
  (`training.residual_dtype`, default on CUDA), fp32 after PEFT's `prepare_model_for_kbit_training`
  upcast. Without quantization every weight is `dtype` sized.
- LoRA: parameters x (4 weight + 4 gradient + optimizer state: 2 for 8-bit Adam, 8 for fp32 Adam).
- activations: with gradient checkpointing, one hidden state per layer boundary in the stream
  dtype (2 or 4 bytes x T x hidden x layers) plus the larger of two transients that never
  coexist, the logits/loss after the forward and one layer's recomputed working set in backward;
  without checkpointing, every layer's working set plus the logits. With
  `training.offload_checkpoints` on CUDA the layer inputs wait in host RAM (`train.offload`):
  two of them are on the GPU at a time (the one being copied out, the one brought back). A layer's working set counts
  the LoRA-dropout copy of each projection input (6 x hidden + intermediate per token, stream
  dtype) when lora.dropout > 0, and fewer MLP/norm intermediates under Liger's
  fused SwiGLU and RMSNorm (`training.kernels`).
- logits and loss: ~13.6 bytes x T x V with the default HF loss (fp32 upcast, softmax, grad).
  For Qwen's 152k vocabulary this dominates: 14B at 4 x 2048 tokens is ~17 GB on its own.
  edentune's engine computes logits for trained positions only, in checkpointed chunks of
  LOGITS_CHUNK_ELEMENTS (`train.trainer.trained_token_loss`), so the term is bounded by one
  chunk (~0.9 GB) whatever T is; Liger's fused linear cross-entropy is bounded the same way.
  `loss="hf"` estimates the default loss for comparison.
- attention: none stored on CUDA (flash / memory-efficient kernels); off CUDA SDPA keeps the
  batch x heads x s x s fp32 scores, and a packed batch is one row of batch x s tokens, so its
  scores are (batch x s)^2 per head.
- allocator reserve (CUDA): PyTorch's caching allocator holds more than it hands out; peak
  reserved was 10-14% above peak allocated on the H100 runs (docs/results/gpu_train_h100*.json),
  so 10% of the allocated terms is counted and the plan fits when the total fits the card.
- runtime overhead: CUDA context, dequantization buffers; on CPU the interpreter, torch and data.

T = tokens per micro-batch = per_device_batch_size x max_seq_len (worst case: a full batch).
Checked against measured peaks on CPU (tests) and on a lent H100/H200 (benchmarks/gpu_train.py,
docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1024**3

# config.json numbers of the supported families, so `plan` works offline for hub ids.
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2.5-3B-Instruct": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "Qwen/Qwen2.5-14B-Instruct": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "Qwen/Qwen2.5-32B-Instruct": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "meta-llama/Llama-3.1-8B-Instruct": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}

LOGITS_BYTES_PER_TOKEN_VOCAB = 13.6  # fp32 logits, upcast, softmax/log-softmax, gradient (measured, docs/benchmarks.md)
NF4_BITS = 4.127  # 4 bits + absmax per 64 weights, double-quantized to 8 bits per 256 blocks (QLoRA paper, arXiv:2305.14314)
CUDA_OVERHEAD_GB = 0.8  # CUDA context and library workspaces, outside the allocator (H100 calibration)
RESERVED_OVER_ALLOCATED = 0.10  # peak reserved / peak allocated - 1: 10-14% on the H100 runs
CPU_HEADROOM = 0.05  # off CUDA: keep 5% free (RSS has no allocator reserve to count)
CPU_OVERHEAD_GB = 1.0  # interpreter, torch, tokenizer and data in the process's RSS


@dataclass
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c) -> Arch:
        get = c.get if isinstance(c, dict) else lambda k, d=None: getattr(c, k, d)
        return cls(get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"), get("num_attention_heads"),
                   get("num_key_value_heads") or get("num_attention_heads"), get("vocab_size"),
                   bool(get("tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each of the seven projections in one block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.module_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.block_params + self.embedding_params


@dataclass
class Plan:
    terms: dict[str, float]  # GB per term
    device_gb: float
    tokens_per_micro_batch: int
    lora_params: int
    advice: list[str] = field(default_factory=list)

    @property
    def total_gb(self) -> float:
        return sum(self.terms.values())

    @property
    def limit_gb(self) -> float:
        """What the plan may use: the whole card on CUDA (the allocator reserve is a term), else 95%."""
        return self.device_gb * (1.0 if "allocator reserve" in self.terms else 1 - CPU_HEADROOM)

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.limit_gb

    @property
    def margin_gb(self) -> float:
        return self.limit_gb - self.total_gb


def lora_param_count(arch: Arch, r: int, targets: list[str]) -> int:
    shapes = arch.module_shapes()
    return arch.layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in targets)


def estimate(cfg, model_config, device_gb: float, device: str = "cuda", loss: str = "edentune") -> Plan:
    """Estimate peak memory of `cfg` for a model with `model_config` (a dict or HF config), with
    advice when it does not fit.

    `loss`: "edentune" (chunked loss on trained positions, what `edentune train` runs) or "hf"
    (transformers' default loss over every position)."""
    plan = _estimate_terms(cfg, model_config, device_gb, device, loss)
    plan.advice = _advice(plan, cfg, lambda c: _estimate_terms(c, model_config, device_gb, device, loss))
    return plan


def stream_bytes(cfg, device: str) -> int:
    """Bytes per element of the residual stream (mirrors `train.recipe.residual_dtype` without torch)."""
    t, q = cfg.training, cfg.quantization
    bf16_compute = q.compute_dtype == "bf16" and (t.precision == "bf16" or (t.precision == "auto" and device == "cuda"))
    if not q.load_in_4bit:
        return 2 if t.precision in ("auto", "bf16", "fp16") and device != "cpu" else 4
    bf16 = t.residual_dtype == "bf16" or (t.residual_dtype == "auto" and device == "cuda" and bf16_compute)
    return 2 if bf16 and bf16_compute else 4


def liger_kernels(cfg, device: str) -> bool:
    """Whether the run uses Liger's fused kernels (`training.kernels`; only ever on CUDA)."""
    if device != "cuda" or cfg.training.kernels == "none":
        return False
    if cfg.training.kernels == "liger":
        return True
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def _estimate_terms(cfg, model_config, device_gb: float, device: str, loss: str) -> Plan:
    arch = Arch.from_config(model_config)
    t, q = cfg.training, cfg.quantization
    T = t.per_device_batch_size * cfg.model.max_seq_len
    w16 = 2 if t.precision in ("auto", "bf16", "fp16") and device != "cpu" else 4
    resid = stream_bytes(cfg, device)
    if q.load_in_4bit:
        base = arch.block_params * NF4_BITS / 8 + arch.embedding_params * resid
    else:
        base = arch.params * w16
    n_lora = lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules)
    optim_bytes = 2 if "8bit" in t.optimizer else 8
    lora = n_lora * (4 + 4 + optim_bytes)
    # One block's working set under autograd: attention projections, norms and MLP intermediates
    # in 16-bit (Liger's fused RMSNorm and SwiGLU keep fewer: the norm input and rstd, gate and up
    # but not silu(gate)), plus the block's dequantized weights.
    fused = liger_kernels(cfg, device)
    layer_ws = T * ((6 if fused else 8) * arch.hidden + 2 * arch.kv_dim + (4 if fused else 5) * arch.intermediate) * w16
    if cfg.lora.dropout > 0:
        # PEFT applies a separate dropout to each LoRA module's input: q, k, v, gate, up see the
        # normed hidden state, o the attention output, down the MLP intermediate; each copy, in the
        # stream dtype, is saved by lora_A for backward. (The 1-byte masks are left out: with them
        # the CPU estimate overshoots the measured RSS by 13%, without them it is within +8%.)
        layer_ws += T * (6 * arch.hidden + arch.intermediate) * resid
    if q.load_in_4bit:
        layer_ws += max(a * b for a, b in arch.module_shapes().values()) * 2
    if loss == "hf":
        logits = LOGITS_BYTES_PER_TOKEN_VOCAB * T * arch.vocab
    else:
        from .trainer import LOGITS_CHUNK_ELEMENTS

        chunk_tokens = max(1, LOGITS_CHUNK_ELEMENTS // arch.vocab)
        logits = LOGITS_BYTES_PER_TOKEN_VOCAB * min(T, chunk_tokens) * arch.vocab + T * arch.hidden * 4
    terms = {"base weights": base / GB, "LoRA weights+grads+optimizer": lora / GB}
    if t.gradient_checkpointing:
        # The loss is computed after the forward, a layer is recomputed during backward: the two
        # transients never coexist, so only the larger counts.
        checkpoints = resid * T * arch.hidden * arch.layers
        if t.offload_checkpoints and device == "cuda":
            # In host RAM between forward and backward (`train.offload`); on the GPU only the layer
            # input being copied out in the forward and the one brought back for the recompute.
            terms["saved layer inputs (offloaded: 2 on the GPU)"] = 2 * checkpoints / arch.layers / GB
        else:
            terms["saved layer inputs (checkpoints)"] = checkpoints / GB
        terms["largest transient: " + ("logits+loss" if logits >= layer_ws else "layer recompute")] = max(logits, layer_ws) / GB
    else:
        terms["activations (all layers)"] = layer_ws * arch.layers / GB
        terms["logits+loss"] = logits / GB
    if device != "cuda":
        # No fused attention for training off CUDA: SDPA keeps batch x heads x s x s fp32 scores
        # per layer for backward (measured: the embedded model at 4 x 1024 on 2 CPU cores); a
        # packed batch is one row of all its tokens with a block-diagonal mask.
        s = cfg.model.max_seq_len
        packed = t.batching == "packed"
        scores = arch.heads * (T * T if packed else t.per_device_batch_size * s * s) * 4
        terms["attention scores" + (" (packed row)" if packed else "")] = scores * (1 if t.gradient_checkpointing else arch.layers) / GB
    else:
        terms["allocator reserve"] = RESERVED_OVER_ALLOCATED * sum(terms.values())
    terms["runtime overhead"] = CUDA_OVERHEAD_GB if device == "cuda" else CPU_OVERHEAD_GB
    return Plan(terms=terms, device_gb=device_gb, tokens_per_micro_batch=T, lora_params=n_lora)


MIN_ADVISED_SEQ_LEN = 256  # shorter than this cuts most real conversations


def _advice(plan: Plan, cfg, estimate_for) -> list[str]:
    """What to change, the change that frees most memory first, each re-estimated with the same
    formula (`estimate_for(changed_cfg) -> Plan`) so the advice is what the numbers say."""

    if plan.fits:
        return []
    scored, combined = [], {}
    for freed, changes, text in scored_options(plan, cfg, estimate_for):
        scored.append((freed, text))
        combined.update(changes)
    weights = plan.terms["base weights"]
    if weights > plan.device_gb and cfg.quantization.load_in_4bit:
        # Nothing else helps: batch, sequence length and optimizer do not shrink the weights.
        return [f"the base weights alone ({weights:.1f} GB in 4-bit) do not fit in {plan.device_gb:g} GB: "
                "pick a smaller model preset or a larger device"]
    out = [f"{text} (frees ~{freed:.1f} GB)" for freed, text in scored]
    after = estimate_for(cfg.updated(combined)).total_gb if combined else plan.total_gb
    if after > plan.limit_gb:
        out.append(f"even with {'all of these at once' if len(scored) > 1 else 'this' if scored else 'these settings'} "
                   f"the run needs ~{after:.1f} GB of {plan.device_gb:g} GB: halve again, pick a smaller model preset "
                   "or a larger device")
    return out


def scored_options(plan: Plan, cfg, estimate_for) -> list[tuple[float, dict, str]]:
    """(GB freed, config changes, what to write) of each setting that shrinks the run, the one
    that frees most first, each re-estimated with `estimate_for(changed_cfg) -> Plan`. The round
    planner applies them in this order until the run fits (`edentune.cycle.plan`)."""
    from ..errors import ConfigError

    t, m = cfg.training, cfg.model
    options: list[tuple[dict, str]] = []
    if not cfg.quantization.load_in_4bit:
        options.append(({"quantization.load_in_4bit": True}, "quantization.load_in_4bit: true (QLoRA: 4-bit NF4 base)"))
    if t.per_device_batch_size > 1:
        b = t.per_device_batch_size // 2
        acc = -(-t.per_device_batch_size * t.gradient_accumulation_steps // b)  # ceil: at least the same effective batch
        options.append(({"training.per_device_batch_size": b, "training.gradient_accumulation_steps": acc},
                        f"training.per_device_batch_size: {b} with gradient_accumulation_steps: {acc} "
                        "(same effective batch, half the tokens per micro-batch)"))
    if m.max_seq_len // 2 >= MIN_ADVISED_SEQ_LEN:
        options.append(({"model.max_seq_len": m.max_seq_len // 2},
                        f"model.max_seq_len: {m.max_seq_len // 2} if your conversations allow (check `edentune data stats`)"))
    if not t.gradient_checkpointing:
        options.append(({"training.gradient_checkpointing": True}, "training.gradient_checkpointing: true"))
    if t.gradient_checkpointing and not t.offload_checkpoints and plan.terms.get("allocator reserve") is not None:
        host = plan.terms["saved layer inputs (checkpoints)"]
        options.append(({"training.offload_checkpoints": True},
                        f"training.offload_checkpoints: true (layer inputs wait in ~{host:.1f} GB of pinned host RAM; "
                        "PCIe copies make steps a little slower)"))
    if cfg.quantization.load_in_4bit and t.residual_dtype == "fp32":
        options.append(({"training.residual_dtype": "auto"}, "training.residual_dtype: auto (bf16 residual stream and checkpoints)"))
    if cfg.lora.dropout > 0:
        options.append(({"lora.dropout": 0.0}, "lora.dropout: 0 (no dropout copy of each projection input; less regularisation)"))
    if "8bit" not in t.optimizer:
        options.append(({"training.optimizer": "paged_adamw_8bit"}, "training.optimizer: paged_adamw_8bit"))
    scored = []
    for changes, text in options:
        try:
            freed = plan.total_gb - estimate_for(cfg.updated(changes)).total_gb
        except ConfigError:  # a change this config cannot take (e.g. against another setting): not advice
            continue
        if freed >= 0.05:
            scored.append((freed, changes, text))
    scored.sort(key=lambda x: -x[0])
    return scored


def model_config_for(cfg):
    """The architecture numbers for cfg's model, offline where possible."""
    name = cfg.model.name_or_path
    if name in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[name]
    from transformers import AutoConfig

    from ..models import resolve_model_dir

    return AutoConfig.from_pretrained(resolve_model_dir(name, cfg.model.gguf_file, cfg.model.architecture),
                                      trust_remote_code=cfg.model.trust_remote_code)


def estimate_per_process(cfg, model_config, device_gb: float, num_processes: int, fsdp: bool,
                         device: str = "cuda", loss: str = "edentune") -> Plan:
    """Peak memory of one process of an `accelerate launch` run (one process per GPU), with advice.

    DDP: every process holds a full copy of the model, plus DDP's gradient buckets (a copy of the
    trainable, i.e. LoRA, gradients). FSDP: base weights, LoRA weights, gradients and optimizer
    state are split across the processes; each process additionally holds the layer being
    computed and the next one, all-gathered. Under FSDP a 4-bit base keeps its embeddings and
    residual stream in the training dtype (no fp32 upcast: see `recipe.load_training_model`).
    Activations and logits are per process and unchanged: they depend on the per-device batch.
    """
    def terms_for(c) -> Plan:
        return _per_process_terms(c, model_config, device_gb, num_processes, fsdp, device, loss)

    out = terms_for(cfg)
    out.advice = _advice(out, cfg, terms_for)
    if not out.fits and not fsdp and num_processes > 1:
        out.advice.insert(0, "shard the base across the GPUs with FSDP (docs/multi-gpu.md)")
    return out


def _per_process_terms(cfg, model_config, device_gb: float, num_processes: int, fsdp: bool, device: str, loss: str) -> Plan:
    plan = _estimate_terms(cfg, model_config, device_gb, device, loss)
    if num_processes < 2:
        return plan
    arch, q = Arch.from_config(model_config), cfg.quantization
    w16 = 2 if cfg.training.precision in ("auto", "bf16", "fp16") and device != "cpu" else 4
    terms = dict(plan.terms)
    reserve = terms.pop("allocator reserve", None)
    overhead = terms.pop("runtime overhead", 0.0)
    if not fsdp:
        terms["DDP gradient buckets"] = plan.lora_params * 4 / GB
    else:
        block_bytes = NF4_BITS / 8 if q.load_in_4bit else w16
        base = arch.block_params * block_bytes + arch.embedding_params * w16
        terms["base weights"] = base / num_processes / GB
        terms["FSDP all-gathered layers (current + next)"] = 2 * arch.block_params / arch.layers * block_bytes / GB
        terms["LoRA weights+grads+optimizer"] /= num_processes
        key = "saved layer inputs (checkpoints)"
        if q.load_in_4bit and key in terms and stream_bytes(cfg, device) == 4:
            terms[key] *= w16 / 4  # FSDP never upcasts the stream to fp32
    if reserve is not None:
        terms["allocator reserve"] = RESERVED_OVER_ALLOCATED * sum(terms.values())
    terms["runtime overhead"] = overhead
    return Plan(terms=terms, device_gb=device_gb, tokens_per_micro_batch=plan.tokens_per_micro_batch, lora_params=plan.lora_params)


# -- Apple unified memory (training.backend: mlx) ---------------------------------------------------
# On a Mac the GPU shares the RAM, but macOS lets Metal keep only part of it resident: the
# device's recommendedMaxWorkingSetSize, which mlx-lm wires for training
# (`mx.device_info()["max_recommended_working_set_size"]`, raised with `sudo sysctl
# iogpu.wired_limit_mb=N`). Reported values: 10.67 GB on a 16 GB M4 (exo-explore/exo#1672), about
# 3/4 on 64-96 GB machines (gpustack/gpustack#1375, ml-explore/mlx-lm#883).
MLX_4BIT_BITS = 4.5  # MLX affine 4-bit, group size 64: 4 bits + an fp16 scale and bias per 64 weights
APPLE_OVERHEAD_GB = 1.0  # Python, MLX, tokenizer and data
MIN_APPLE_LORA_R = 8  # the planner halves the rank down to this, no lower


def apple_gpu_budget_gb(ram_gb: float) -> float:
    """What macOS leaves to the GPU by default: about 2/3 of RAM up to 36 GB, 3/4 above."""
    return ram_gb * (2 / 3 if ram_gb <= 36 else 3 / 4)


def estimate_apple(cfg, model_config, ram_gb: float, working_set_gb: float | None = None) -> Plan:
    """Peak memory of `cfg` on the MLX backend of a Mac with `ram_gb` of unified memory.

    Terms as in `estimate`, for MLX: the 4-bit base quantizes every linear layer and the
    embeddings (mlx-lm's quantize_model), the frozen rest is bf16, LoRA weights and AdamW moments
    are fp32 (no 8-bit optimizer on MLX), logits are computed at trained positions in chunks
    (`mlx_backend.make_loss`), and the attention backward keeps batch x heads x s x s scores.
    `working_set_gb` (the Mac's own recommended working set) replaces the 2/3 / 3/4 rule."""
    from .trainer import LOGITS_CHUNK_ELEMENTS

    arch = Arch.from_config(model_config)
    t = cfg.training
    T = t.per_device_batch_size * cfg.model.max_seq_len
    w = 2  # bf16 activations
    base = arch.params * (MLX_4BIT_BITS / 8 if cfg.quantization.load_in_4bit else w)
    n_lora = lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules)
    layer_ws = T * (8 * arch.hidden + 2 * arch.kv_dim + 5 * arch.intermediate) * w + T * 7 * arch.hidden * w
    chunk_tokens = max(1, LOGITS_CHUNK_ELEMENTS // arch.vocab)
    logits = LOGITS_BYTES_PER_TOKEN_VOCAB * min(T, chunk_tokens) * arch.vocab + T * arch.hidden * 4
    scores = t.per_device_batch_size * arch.heads * cfg.model.max_seq_len ** 2 * w * 2  # probabilities + their gradient
    terms = {"base weights (MLX 4-bit)" if cfg.quantization.load_in_4bit else "base weights (bf16)": base / GB,
             "LoRA weights+grads+AdamW (fp32)": n_lora * 16 / GB}
    if t.gradient_checkpointing:
        terms["saved layer inputs (checkpoints)"] = w * T * arch.hidden * arch.layers / GB
        terms["largest transient: " + ("logits+loss" if logits >= layer_ws + scores else "layer recompute")] = max(logits, layer_ws + scores) / GB
    else:
        terms["activations (all layers)"] = (layer_ws + scores) * arch.layers / GB
        terms["logits+loss"] = logits / GB
    terms["runtime overhead"] = APPLE_OVERHEAD_GB
    budget = working_set_gb if working_set_gb is not None else apple_gpu_budget_gb(ram_gb)
    plan = Plan(terms=terms, device_gb=budget, tokens_per_micro_batch=T, lora_params=n_lora)
    plan.advice = _apple_advice(plan, cfg, ram_gb)
    return plan


def apple_options(cfg) -> list[tuple[dict, str]]:
    """(config changes, what to write) that shrink an MLX run, in the order they are advised."""
    t, out = cfg.training, []
    if t.per_device_batch_size > 1:
        out.append(({"training.per_device_batch_size": t.per_device_batch_size // 2,
                     "training.gradient_accumulation_steps": t.gradient_accumulation_steps * 2},
                    f"training.per_device_batch_size: {t.per_device_batch_size // 2} with gradient_accumulation_steps: "
                    f"{t.gradient_accumulation_steps * 2} (same effective batch)"))
    if not t.gradient_checkpointing:
        out.append(({"training.gradient_checkpointing": True}, "training.gradient_checkpointing: true"))
    if not cfg.quantization.load_in_4bit:
        out.append(({"quantization.load_in_4bit": True}, "quantization.load_in_4bit: true (QLoRA on an MLX 4-bit base)"))
    if cfg.lora.r >= 2 * MIN_APPLE_LORA_R:
        r, alpha = cfg.lora.r // 2, cfg.lora.alpha / 2
        out.append(({"lora.r": r, "lora.alpha": alpha},
                    f"lora.r: {r} with lora.alpha: {alpha:g} (same scale; half the adapter's fp32 weights, gradients and "
                    "AdamW state: MLX has no 8-bit optimizer)"))
    if cfg.model.max_seq_len // 2 >= MIN_ADVISED_SEQ_LEN:
        out.append(({"model.max_seq_len": cfg.model.max_seq_len // 2},
                    f"model.max_seq_len: {cfg.model.max_seq_len // 2} if your conversations allow (check `edentune data stats`)"))
    return out


def _apple_advice(plan: Plan, cfg, ram_gb: float) -> list[str]:
    if plan.fits:
        return []
    out = [text for _, text in apple_options(cfg)]
    if plan.total_gb <= ram_gb - 4:
        out.append(f"or let the GPU wire more of the {ram_gb:g} GB: sudo sysctl iogpu.wired_limit_mb={int((ram_gb - 4) * 1024)} "
                   "(until reboot; leave the OS at least 4 GB)")
    if plan.terms.get("base weights (MLX 4-bit)", 0) > plan.device_gb * 0.8:
        out.append("the 4-bit base alone nearly fills the GPU budget: pick a smaller model preset")
    return out


def apple_plan(cfg, model_config, ram_gb: float | None) -> tuple[Plan, str]:
    """`edentune plan --device apple`: this Mac's own numbers when run on one with MLX, else `ram_gb` (default 24)."""
    import importlib.util
    import platform

    working_set = None
    if ram_gb is None and platform.system() == "Darwin" and importlib.util.find_spec("mlx") is not None:
        import mlx.core as mx

        info = mx.device_info()
        ram_gb, working_set = info["memory_size"] / GB, info.get("max_recommended_working_set_size")
        working_set = working_set / GB if working_set else None
    ram_gb = ram_gb or 24.0
    plan = estimate_apple(cfg, model_config, ram_gb, working_set)
    source = "this Mac's recommended working set" if working_set else "about 2/3 of RAM up to 36 GB, 3/4 above"
    return plan, f"GPU budget on a {ram_gb:g} GB Mac: {plan.device_gb:.1f} GB ({source})"
