"""How often does the gate call a NO-CHANGE candidate worse? The old rule vs the paired tests.

The same month (the quickstart's first month of the bundled sample, cleaned, 90 % of it) is trained K times on the
embedded model, with K training seeds and nothing else different. Any two of these adapters are
the same model up to training noise, so a gate comparing one (as the live model) with another (as
the candidate) should call no metric worse, except by the chance its test allows. Every ordered
pair (live, candidate) is compared twice with `evaluate.compare`, on the quickstart's suite and
perplexity sets:

- `tolerance` (the gate before): a rate lower by more than `evaluation.tolerance` (0.02), a
  validation perplexity higher by more than 2 %, or forgetting above 10 % is worse;
- `paired` (the gate now): exact McNemar on each pass/fail metric, a paired bootstrap interval on
  the per-token losses, at `evaluation.significance` 0.05.

Reported: the share of ordered pairs in which each gate calls at least one gating metric worse,
and per metric. Cheap on purpose (few steps, the quickstart's 8 cases); on 2 CPU cores each
adapter takes about two minutes.

    python benchmarks/bench_gate_noise.py --seeds 5 --steps 5 --lora --out docs/results/bench_gate_noise.json
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6, help="adapters trained (ordered pairs: seeds x (seeds - 1))")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cases", type=int, default=8, help="suite cases (the quickstart's subset)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_gate_noise.json")
    ap.add_argument("--lora", action="store_true",
                    help="plain LoRA on the unquantized base (faster on CPU; the question does not depend on QLoRA)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep each adapter's evaluation here; a rerun reuses them (default: a temporary folder)")
    a = ap.parse_args()

    from rich.console import Console

    from edentune.cycle.workspace import init_workspace, is_workspace, load_workspace
    from edentune.data.clean import clean
    from edentune.data.split import split_records
    from edentune.evaluate.backends import backend_from_spec
    from edentune.evaluate.compare import compare
    from edentune.evaluate.runner import EvalResult, evaluate, perplexity_sets
    from edentune.evaluate.suite import load_suite
    from edentune.io import write_jsonl_atomic
    from edentune.presets import quickstart_recipe
    from edentune.quickstart import split_months, write_suite
    from edentune.train import train

    quiet = Console(file=io.StringIO())
    started = time.perf_counter()
    results: list[EvalResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as scratch:
        tmp = a.work or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        # The quickstart's first month, cleaned and split as the cycle does, on the embedded recipe.
        records, _ = clean(split_months(tmp)[:1])
        train_records, val_records = split_records(records, 0.1)
        train_file, val_file = tmp / "data" / "train.jsonl", tmp / "data" / "validation.jsonl"
        write_jsonl_atomic(train_file, train_records)
        write_jsonl_atomic(val_file, val_records)
        ws_dir = tmp / "workspace"  # `cycle init --model embedded`: the embedded model's recipe
        ws = load_workspace(ws_dir) if is_workspace(ws_dir) else init_workspace(ws_dir, model="embedded")
        base_cfg = ws.config.run.updated({**quickstart_recipe(a.steps, 384, a.max_new_tokens),
                                "data.train_files": [str(train_file)], "data.validation_files": [str(val_file)],
                                "evaluation.suite": str(write_suite(tmp, a.cases))})
        if a.lora:
            base_cfg = base_cfg.updated({"quantization.load_in_4bit": False})
        suite = load_suite(base_cfg.evaluation.suite)
        validation, replay = perplexity_sets(base_cfg, [str(val_file)], limit=40)
        seconds = []
        for seed in range(a.seeds):
            t0 = time.perf_counter()
            if (tmp / f"eval-{seed}.json").is_file():  # measured by an earlier, interrupted run
                results.append(EvalResult.load(tmp / f"eval-{seed}.json"))
                continue
            cfg = base_cfg.updated({"training.seed": seed, "training.output_dir": str(tmp / f"run-{seed}")})
            if (tmp / f"run-{seed}").exists():
                import shutil

                shutil.rmtree(tmp / f"run-{seed}")  # a run killed part-way: train it again from the start
            adapter = train(cfg, resume=False, console=quiet).adapter_dir
            backend = backend_from_spec(str(adapter), cfg)
            result = evaluate(cfg, backend, suite, validation=validation, replay=replay)
            result.save(tmp / f"eval-{seed}.json")
            results.append(EvalResult.load(tmp / f"eval-{seed}.json"))
            del backend
            seconds.append(round(time.perf_counter() - t0, 1))
            print(f"seed {seed}: {seconds[-1]} s, validation perplexity {result.metrics['perplexity_validation']:.4f}", file=sys.stderr)

    gates = {name: base_cfg.updated({"evaluation.gate_test": name}) for name in ("tolerance", "paired")}
    pairs, worse = [], {name: 0 for name in gates}
    by_metric: dict[str, dict[str, int]] = {name: {} for name in gates}
    for live, cand in itertools.permutations(range(a.seeds), 2):
        row = {"live_seed": live, "candidate_seed": cand}
        for name, cfg in gates.items():
            c = compare(results[live], results[cand], cfg)
            bad = [r.key for r in c.metrics if r.gating and r.verdict == "worse"]
            row[name] = {"worse": bad, "reasons": [r for r in c.reasons if "is worse" in r]}
            worse[name] += bool(bad)
            for key in bad:
                by_metric[name][key] = by_metric[name].get(key, 0) + 1
        pairs.append(row)
    n = len(pairs)
    out = {
        "what": "share of no-change pairs (same month, another training seed) in which the gate calls a gating metric worse",
        "model": "embedded SmolLM2-135M-Instruct", "quantized_base": base_cfg.quantization.load_in_4bit, "steps": a.steps, "seeds": a.seeds, "ordered_pairs": n,
        "suite_cases": len(suite.cases), "validation_conversations": len(validation), "replay_conversations": len(replay),
        "significance": base_cfg.evaluation.significance, "tolerance": base_cfg.evaluation.tolerance,
        "called_worse_rate": {name: round(worse[name] / n, 3) for name in gates},
        "called_worse_pairs": worse, "by_metric": by_metric,
        "metrics_per_seed": [{k: r.metrics.get(k) for k in ("perplexity_validation", "perplexity_replay", "persona_adherence",
                                                              "keyword_hit_rate", "code_pass_rate", "case_pass_rate", "language_mixing")}
                             for r in results],
        "seconds_per_adapter": seconds, "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {platform.python_version()}", "pairs": pairs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("ordered_pairs", "called_worse_rate", "by_metric", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
