"""edentune's own training recipe on CUDA: QLoRA (bitsandbytes NF4), bf16, paged 8-bit AdamW.

CI has no GPU, so this is the check that the CUDA branches of `edentune.train` (device and dtype
selection, 4-bit loading with `device_map`, the paged optimizer, peak-memory reporting) run. It
builds a small random Qwen2 model with the embedded model's real ChatML tokenizer (no internet on
the lent machine), trains it on the bundled Eden sample for a few dozen steps through
`edentune.train.train`, and checks that validation loss fell and an adapter was written.

    python benchmarks/gpu_recipe_smoke.py --tokenizer DIR --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build_model(tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--cpu", action="store_true", help="dry run of this script on a machine without CUDA")
    a = ap.parse_args()

    import torch

    from edentune.config import config_for_model
    from edentune.data.split import split
    from edentune.train import train
    from edentune.train.plan import estimate

    assert a.cpu or torch.cuda.is_available(), "this check is for a CUDA machine"
    cuda = torch.cuda.is_available()
    a.out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(a.tokenizer, a.out / "model")
    sample = ROOT / "src" / "edentune" / "data" / "sample" / "eden_sample.jsonl"
    split([sample], a.out / "train.jsonl", a.out / "val.jsonl", val_fraction=0.1)

    steps = a.steps
    cfg = config_for_model("qwen2.5-0.5b").updated({
        "model.name_or_path": str(model_dir), "model.max_seq_len": 1024, "lora.r": 16, "lora.alpha": 32.0,
        "training.output_dir": str(a.out / "run"), "training.max_steps": steps, "training.warmup_steps": min(5, steps - 1),
        "training.learning_rate": 1e-3, "training.eval_steps": max(1, steps // 3), "training.save_steps": max(1, steps // 3),
        "training.logging_steps": max(1, steps // 12), "training.per_device_batch_size": 8,
        "training.gradient_accumulation_steps": 1,
        "data.train_files": [str(a.out / "train.jsonl")], "data.validation_files": [str(a.out / "val.jsonl")],
    })
    t = cfg.training

    started = time.time()
    result = train(cfg)
    seconds = time.time() - started
    events = [json.loads(line) for line in (Path(t.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in events if e["event"] == "eval"]
    trains = [e for e in events if e["event"] == "train"]
    from transformers import AutoConfig

    plan = estimate(cfg, AutoConfig.from_pretrained(model_dir), device_gb=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 24,
                    device="cuda" if cuda else "cpu")
    summary = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "seconds": seconds, "eval_losses": evals,
        "train_losses": [e["loss"] for e in trains], "tokens_per_s": [e.get("trained_tokens_per_s") for e in trains],
        "measured_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "plan_total_gb": plan.total_gb, "plan_terms": plan.terms,
        "adapter_written": (result.adapter_dir / "adapter_model.safetensors").exists(),
        "manifest_device": json.loads((Path(t.output_dir) / "manifest.json").read_text()).get("device"),
    }
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ok = summary["adapter_written"] and len(evals) >= 2 and evals[-1] < evals[0]
    print("RECIPE SMOKE", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
