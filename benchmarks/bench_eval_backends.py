"""The quickstart's evaluation on the embedded model with each backend, one process per backend.

    python benchmarks/bench_eval_backends.py [--out docs/results/bench_eval_backends.json] [--backends gguf transformers]
        [--sides base fine-tuned] [--ppl-limit 40]

Each backend scores the base and a fine-tuned adapter (a fixed random LoRA, r=32 on all seven
projections like the quickstart's) on the quickstart's suite (8 cases, 96 new tokens, max_seq_len
384) with its perplexity sets (40 validation + 40 replay conversations), in a fresh process so that
peak RSS is its own. Reported per backend: wall seconds (load + answers + perplexity), answers/s and
tokens/s of generation, perplexity seconds, peak RSS, and the load average around the run (the
machine may be shared). `evaluation.backend: auto` orders backends by these numbers
(`evaluate.memory.FASTEST_FIRST`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(backend: str, work: Path, sides: list[str], ppl_limit: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edentune.config import config_for_model
    from edentune.evaluate.backends import backend_from_spec
    from edentune.evaluate.runner import evaluate, perplexity_sets
    from edentune.evaluate.suite import load_suite
    from edentune.models import resolve_model_dir
    from edentune.quickstart import SAMPLE_DIR, QuickstartOptions, write_suite

    torch.set_num_threads(os.cpu_count() or 1)
    opts = QuickstartOptions()
    cfg = config_for_model("embedded").updated({
        "model.max_seq_len": opts.max_seq_len, "evaluation.max_new_tokens": opts.max_new_tokens,
        "data.validation_files": [str(SAMPLE_DIR / "eden_sample.jsonl")], "data.train_files": [str(SAMPLE_DIR / "eden_sample.jsonl")],
        "data.replay_files": [str(SAMPLE_DIR / "replay.jsonl")], "export.num_ctx": 2048})
    adapter = work / "adapter"
    if not (adapter / "adapter_config.json").exists():
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_model_dir("embedded")),
                               LoraConfig(r=32, lora_alpha=64, target_modules=list(cfg.lora.target_modules)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.005)
        model.save_pretrained(adapter)
    suite = load_suite(write_suite(work, opts.eval_cases))  # the quickstart's 8-case subset
    validation, replay = perplexity_sets(cfg, limit=ppl_limit)
    load1 = os.getloadavg()[0]
    out = {"backend": backend, "cases": len(suite.cases), "max_new_tokens": opts.max_new_tokens,
           "perplexity_conversations": len(validation) + len(replay), "threads": os.cpu_count(), "sides": {}}
    start = time.perf_counter()
    for side, spec in [s for s in (("base", "base"), ("fine-tuned", str(adapter))) if s[0] in sides]:
        t0 = time.perf_counter()
        b = backend_from_spec(spec, cfg, backend=backend)
        loaded = time.perf_counter() - t0
        generate, gens, gen_s = b.generate, [], [0.0]

        def timed(conversations, max_new_tokens, generate=generate, gens=gens, gen_s=gen_s):
            t = time.perf_counter()
            answers = generate(conversations, max_new_tokens)
            gen_s[0] += time.perf_counter() - t
            gens.extend(answers)
            return answers

        b.generate = timed
        t2 = time.perf_counter()
        r = evaluate(cfg, b, suite, validation=validation, replay=replay)
        eval_s = time.perf_counter() - t2
        gen_s = gen_s[0]
        tokens = sum(g.completion_tokens or 0 for g in gens)
        out["sides"][side] = {"load_s": round(loaded, 2), "generation_s": round(gen_s, 2), "answers_per_s": round(len(gens) / gen_s, 3),
                              "tokens_per_s": round(tokens / gen_s, 2), "evaluate_s": round(eval_s, 2),
                              "perplexity_s": round(eval_s - gen_s, 2), "answers": [g.text for g in gens],
                              "metrics": {k: r.metrics.get(k) for k in ("perplexity_validation", "perplexity_replay", "case_pass_rate")},
                              "scored_backend": r.backend, "artifacts": r.artifacts}
        if hasattr(b, "close"):
            b.close()
        del b
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)
    out["loadavg_1m"] = [round(load1, 2), round(os.getloadavg()[0], 2)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/results/bench_eval_backends.json")
    ap.add_argument("--backends", nargs="+", default=["gguf", "transformers"])
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "edentune-bench-eval"))
    ap.add_argument("--sides", nargs="+", default=["base", "fine-tuned"])
    ap.add_argument("--ppl-limit", type=int, default=40, help="validation and replay conversations each (quickstart: 40)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(args.child, work, args.sides, args.ppl_limit)))
        return
    results = []
    for backend in args.backends:
        done = subprocess.run([sys.executable, __file__, "--child", backend, "--work", str(work), "--sides", *args.sides,
                               "--ppl-limit", str(args.ppl_limit)], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{backend}: {done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "sides"}))
    first = args.sides[0]
    same = [a == b for a, b in zip(results[0]["sides"][first]["answers"], results[-1]["sides"][first]["answers"])]
    report = {"machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "results": results, f"identical_{first}_answers": f"{sum(same)}/{len(same)}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
