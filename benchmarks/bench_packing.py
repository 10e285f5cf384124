"""Packed (padding-free) vs length-grouped padded batches on CPU: one forward+backward each.

The embedded preset (4-bit NF4 base, LoRA r=32, batch 4, edentune's trained-position loss) on the
bundled Eden sample at max_seq_len 1024. Conversations are sorted by length and cut into groups
of 4 (what the length-grouped sampler produces); each group is run padded to its longest (no
padding mask, SDPA's fused causal kernel) and packed into one row (position_ids restarting, the
block-diagonal mask SDPA then needs), alternately, so machine load hits both alike.

    python benchmarks/bench_packing.py --groups 6 --out packing.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from edentune.config import config_for_model
from edentune.models import load_tokenizer, resolve_model_dir
from edentune.data.encode import IGNORE, encode_all, read_conversations
from edentune.train.recipe import engine_model
from edentune.train.trainer import trained_token_loss

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "edentune" / "data" / "sample" / "eden_sample.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=6, help="groups of 4, spread over the length range")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    cfg = config_for_model("embedded").updated({"model.max_seq_len": 1024, "model.overlong": "truncate"})
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.architecture)
    tok = load_tokenizer(model_dir)
    tok.padding_side = "right"
    examples, _ = encode_all(tok, read_conversations(SAMPLE), 1024, "truncate", cfg.model.system_prompt)
    examples.sort(key=lambda e: len(e.input_ids))
    model = engine_model(cfg, model_dir, "cpu", torch.float32).train()
    pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE)
    flat = DataCollatorWithFlattening(return_position_ids=True)
    step = max(1, len(examples) // 4 // a.groups)
    times = {"padded": 0.0, "packed": 0.0}
    tokens = 0
    warm = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples[:4]]
    for batch in (pad(warm), flat(warm)):  # first calls pay one-off set-up costs: untimed
        loss, n = trained_token_loss(model, batch)
        (loss / n).backward()
        model.zero_grad(set_to_none=True)
    for g in range(a.groups):
        group = examples[g * step * 4: g * step * 4 + 4]
        feats = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in group]
        tokens += sum(e.trained_tokens for e in group)
        for mode, batch in (("padded", pad(feats)), ("packed", flat(feats))):
            t0 = time.perf_counter()
            loss, n = trained_token_loss(model, batch)
            (loss / n).backward()
            times[mode] += time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
        print(g, [len(e.input_ids) for e in group], {k: round(v, 1) for k, v in times.items()}, flush=True)
    res = {**{f"{k}_s": v for k, v in times.items()}, "trained_tokens": tokens,
           "packed_over_padded_time": times["packed"] / times["padded"], "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    print(json.dumps(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
