"""Thumbs up/down on the embedded model: KTO (QLoRA, CPU) speed and whether it moves the model.

There is no real feedback log in the repository, so ratings are built from the bundled Eden
sample: thumbs up = a conversation's own answer, thumbs down = the answer of another
conversation (fluent but wrong for the question). Both halves use different prompts, as real
unpaired feedback does. Reported: seconds per optimizer step, and the mean per-token log-prob of
liked minus disliked answers on the rated set before and after (it must rise).

    python benchmarks/bench_feedback.py --steps 32 --out bench_feedback.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from edentune.config import config_for_model
from edentune.data.feedback import prepare_feedback
from edentune.models import load_tokenizer, resolve_model_dir
from edentune.train.preference import read_preferences, train_preferences

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "edentune" / "data" / "sample" / "eden_sample.jsonl"


def write_ratings(path: Path, n: int) -> None:
    convs = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    convs = [c for c in convs if len(json.dumps(c, ensure_ascii=False)) < 900][:n]
    with path.open("w", encoding="utf-8") as f:
        for i, conv in enumerate(convs):
            turn = [m for m in conv["messages"] if m["role"] != "system"][:2]
            if i % 2:
                other = convs[(i + 7) % len(convs)]["messages"]
                turn = turn[:1] + [{"role": "assistant", "content": next(m["content"] for m in other if m["role"] == "assistant")}]
            f.write(json.dumps({"messages": turn, "rating": "down" if i % 2 else "up"}, ensure_ascii=False) + "\n")


def liked_minus_disliked(model_dir: str, adapter, rows: list[dict], system: str) -> float:
    """Mean per-token log-prob of liked answers minus that of disliked answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    means = {True: [], False: []}
    for row in rows:
        prompt = [{"role": "system", "content": system}, *row["prompt"]]
        head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = tok.apply_chat_template(prompt + row["completion"], tokenize=True, return_dict=False)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        targets = torch.tensor(ids[1:])
        answer = logp[torch.arange(len(targets)), targets][len(head) - 1:]
        means[bool(row["label"])].append(float(answer.mean()))
    return sum(means[True]) / len(means[True]) - sum(means[False]) / len(means[False])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_ratings(tmp / "ratings.jsonl", a.ratings)
        fb = prepare_feedback([tmp / "ratings.jsonl"], tmp / "feedback")
        cfg = config_for_model("embedded").updated({
            "training.output_dir": str(tmp / "sft"), "model.max_seq_len": 384,
            "preference.max_steps": a.steps, "preference.learning_rate": a.lr, "training.logging_steps": 4,
        })
        rows = read_preferences(fb.paths["kto"], "kto")
        model_dir = resolve_model_dir("embedded")
        before = liked_minus_disliked(model_dir, None, rows, cfg.model.system_prompt)
        start = time.perf_counter()
        result = train_preferences(cfg, fb.paths["kto"], console=Console(quiet=True))
        seconds = time.perf_counter() - start
        after = liked_minus_disliked(model_dir, result.adapter_dir, rows, cfg.model.system_prompt)
    summary = {"ratings": {"up": fb.desirable, "down": fb.undesirable}, "steps": result.metrics["global_step"],
               "batch_size": cfg.training.per_device_batch_size, "learning_rate": a.lr, "beta": cfg.preference.beta,
               "seconds": seconds, "seconds_per_step": seconds / result.metrics["global_step"],
               "liked_minus_disliked_logprob": {"before": before, "after": after}, "last_log": result.metrics["last_log"]}
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
