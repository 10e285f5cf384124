"""FSDP-QLoRA and DDP on a machine with 2+ CUDA GPUs: what the CPU tests cannot run.

tests/train/test_train_distributed.py checks DDP and FSDP2 (plain fp32 base) in CPU processes
over gloo. A 4-bit base under FSDP needs CUDA (bitsandbytes), so this script runs, on a small
random Qwen2 with the embedded model's real ChatML tokenizer and the bundled Eden sample:

  1. one process, QLoRA (NF4, bf16), global batch 8            -> the reference
  2. `edentune train --num-processes 2` (DDP), same global batch
  3. `edentune train --num-processes 2 --accelerate-config fsdp.yaml` (FSDP2-QLoRA), same batch

and checks that every run finished with finite, falling loss and non-zero gradient norms (the
uint8 quant-storage failure mode is loss 0 / NaN gradients, accelerate#3983), reports the adapter
difference to the reference (bf16: ~1e-3 relative is expected, not 1e-7 as in fp32), and the
main process's peak memory next to `estimate_per_process`.

    python benchmarks/gpu_fsdp_check.py --tokenizer DIR --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

FSDP2 = """\
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
mixed_precision: 'no'
num_machines: 1
num_processes: 2
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()

    import torch
    import yaml
    from safetensors.torch import load_file

    from edentune.config import config_for_model
    from edentune.data.split import split
    from edentune.train.plan import estimate_per_process
    from gpu_recipe_smoke import build_model

    assert torch.cuda.device_count() >= 2, "this check needs 2 CUDA GPUs"
    a.out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(a.tokenizer, a.out / "model")
    sample = ROOT / "src" / "edentune" / "data" / "sample" / "eden_sample.jsonl"
    split([sample], a.out / "train.jsonl", a.out / "val.jsonl", val_fraction=0.1)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    (a.out / "fsdp.yaml").write_text(FSDP2)

    def config(name: str, accumulation: int) -> Path:
        cfg = config_for_model("qwen2.5-0.5b").updated({
            "model.name_or_path": str(model_dir), "model.max_seq_len": 1024,
            "data.train_files": [str(a.out / "train.jsonl")], "data.validation_files": [str(a.out / "val.jsonl")],
            "training.output_dir": str(a.out / name), "training.max_steps": a.steps, "training.optimizer": "adamw_torch",
            "training.per_device_batch_size": 2, "training.gradient_accumulation_steps": accumulation,
            "training.eval_steps": 10, "training.save_steps": 10, "training.logging_steps": 1, "lora.dropout": 0.0,
            "quantization.load_in_4bit": True, "quantization.compute_dtype": "bf16", "training.precision": "bf16",
        })
        path = a.out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        return path

    runs = {
        "single": [sys.executable, "-m", "edentune", "train", str(config("single", 4))],
        "ddp": [sys.executable, "-m", "edentune", "train", str(config("ddp", 2)), "--num-processes", "2"],
        "fsdp_qlora": [sys.executable, "-m", "edentune", "train", str(config("fsdp_qlora", 2)), "--num-processes", "2",
                       "--accelerate-config", str(a.out / "fsdp.yaml")],
    }
    report: dict = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        entry = report[name] = {"returncode": proc.returncode}
        if proc.returncode:
            entry["stderr_tail"] = proc.stderr[-4000:]
            continue
        events = [json.loads(line) for line in (a.out / name / "metrics.jsonl").read_text().splitlines()]
        train = [e for e in events if e["event"] == "train"]
        losses, norms = [e["loss"] for e in train], [e["grad_norm"] for e in train]
        entry.update(first_loss=losses[0], last_loss=losses[-1], min_grad_norm=min(norms),
                     peak_memory_gb=max(e["peak_memory_gb"] for e in train),
                     trained_tokens=json.loads((a.out / name / "result.json").read_text())["trained_tokens"],
                     finite=all(x == x and abs(x) != float("inf") for x in losses + norms),
                     falling=losses[-1] < losses[0], gradients=min(norms) > 0)
    ref = a.out / "single" / "adapter" / "adapter_model.safetensors"
    for name in ("ddp", "fsdp_qlora"):
        other = a.out / name / "adapter" / "adapter_model.safetensors"
        if ref.exists() and other.exists():
            x, y = load_file(ref), load_file(other)
            report[name]["max_adapter_diff"] = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
            report[name]["max_adapter_value"] = max(x[k].float().abs().max().item() for k in x)
    from edentune.config import load_config
    from transformers import AutoConfig

    for name, fsdp in (("ddp", False), ("fsdp_qlora", True)):
        cfg = load_config(a.out / f"{name}.yaml")
        gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        report[name]["planned_gb"] = estimate_per_process(cfg, AutoConfig.from_pretrained(model_dir), gb, 2, fsdp).total_gb
    (a.out / "gpu_fsdp_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = all(r.get("returncode") == 0 and r.get("finite") and r.get("falling") and r.get("gradients") for r in report.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
