"""The monthly cycle on the embedded model (2 CPU cores): two measurements.

`strategies`: continue from the live adapter vs retrain from the base, over three monthly rounds
of new data (three disjoint thirds of the bundled Eden sample, by content hash), each round mixed
as a cycle round mixes (`data.mix.mix_records`): all its new conversations plus replay from the
earlier rounds' data, the buffer capped at QUOTAS, so that replay is 30% of the mix. (The results
in docs/benchmarks.md were measured before issue 23, when QUOTAS capped the whole training set.)
After every round both adapters are scored on the general-knowledge set that is never trained
on (the bundled replay sample: forgetting = its perplexity / the base's - 1) and on a fixed
validation set. Whichever forgets less after round 3 is `continue_from`'s default.

`round`: one `edentune cycle run` round end to end (workspace, clean, mix, QLoRA, evaluation,
gate, export with llama.cpp parity, deploy to the Ollama stand-in), with the seconds of each
step as the registry records them.

    python benchmarks/bench_cycle.py strategies --steps 20 --out docs/results/bench_cycle_strategies.json
    python benchmarks/bench_cycle.py round --steps 10 --tolerance 0.2 --out docs/results/bench_cycle_round.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "edentune" / "data" / "sample"
QUOTAS = {"persona": 6, "korean": 12, "coding": 14, "general": 8}  # 40 conversations a round


def month_files(tmp: Path, rounds: int = 3) -> tuple[list[Path], Path]:
    """Cleaned sample split by content hash: a fixed validation set and `rounds` disjoint months."""
    from edentune.data.clean import clean
    from edentune.data.split import bucket, split_records
    from edentune.io import write_jsonl_atomic

    records, _ = clean([SAMPLE / "eden_sample.jsonl"])
    train, val = split_records(records, 0.08)
    months = [[r for r in train if int(bucket(r) * 1e6) % rounds == i] for i in range(rounds)]
    paths = [tmp / f"month{i + 1}.jsonl" for i in range(rounds)]
    for p, recs in zip(paths, months):
        write_jsonl_atomic(p, recs)
    write_jsonl_atomic(tmp / "validation.jsonl", val)
    return paths, tmp / "validation.jsonl"


def scores(cfg, adapter, validation: list, general: list) -> dict:
    from edentune.evaluate.backends import backend_from_spec

    backend = backend_from_spec(str(adapter) if adapter else "base", cfg)
    ppl_val = backend.perplexity(validation, cfg.model.system_prompt)
    ppl_gen = backend.perplexity(general, cfg.model.system_prompt)
    return {"validation_loss": math.log(ppl_val), "perplexity_general": ppl_gen}


def strategies(a: argparse.Namespace) -> dict:
    from edentune.config import MixConfig, config_for_model
    from edentune.data.mix import mix_records
    from edentune.evaluate.runner import perplexity_sets
    from edentune.io import write_jsonl_atomic
    from edentune.train import train

    out: dict = {"steps_per_round": a.steps, "quotas": QUOTAS, "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        months, val_file = month_files(tmp)
        base_cfg = config_for_model("embedded").updated({
            "model.max_seq_len": 256, "training.max_steps": a.steps, "training.warmup_steps": 2,
            "training.per_device_batch_size": a.batch_size,
            "training.eval_steps": a.steps, "training.save_steps": a.steps, "training.logging_steps": 1,
            "data.validation_files": [str(val_file)], "export.ollama_base": "smollm2:135m",
        })
        validation, general = perplexity_sets(base_cfg, [str(val_file)], [str(SAMPLE / "replay.jsonl")], limit=a.eval_limit)
        base = scores(base_cfg, None, validation, general)
        out["base"] = base
        print(f"base: validation loss {base['validation_loss']:.4f}, general perplexity {base['perplexity_general']:.3f}", flush=True)
        live = {"live": None, "base": None}
        seen: list[dict] = []
        for r, month in enumerate(months, 1):
            new = [json.loads(line) for line in month.read_text(encoding="utf-8").splitlines()]
            mixed, _ = mix_records(new, seen, MixConfig(new_ratio=1.0 if not seen else 0.7, quotas=QUOTAS, seed=42))
            train_file = tmp / f"train{r}.jsonl"
            write_jsonl_atomic(train_file, mixed)
            row = {"round": r, "train_records": len(mixed)}
            for mode in ("live", "base"):
                cfg = base_cfg.updated({"data.train_files": [str(train_file)], "training.output_dir": str(tmp / f"{mode}{r}")})
                started = time.perf_counter()
                result = train(cfg, init_adapter=live[mode] if mode == "live" else None)
                seconds = time.perf_counter() - started
                s = scores(cfg, result.adapter_dir, validation, general)
                s["forgetting"] = s["perplexity_general"] / base["perplexity_general"] - 1
                s["train_seconds"] = round(seconds, 1)
                row[mode] = s
                live[mode] = result.adapter_dir
                print(f"round {r} {mode}: validation loss {s['validation_loss']:.4f}, general perplexity "
                      f"{s['perplexity_general']:.3f} (forgetting {100 * s['forgetting']:+.2f}%), train {seconds:.0f} s", flush=True)
            out["rounds"].append(row)
            seen += new
    last = out["rounds"][-1]
    out["forgets_less"] = "live" if last["live"]["forgetting"] < last["base"]["forgetting"] else "base"
    return out


def round_timing(a: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "export"))
    from ollama_standin import OllamaStandIn

    from edentune.registry import Registry
    from edentune.cycle.round import run_round
    from edentune.cycle.workspace import init_workspace
    from edentune.export.modelfile import CHATML_TEMPLATE
    from edentune.models import embedded_gguf_path

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        months, _ = month_files(tmp)
        # The base with its GGUF, so that deploy's smoke check gets real answers from /api/chat.
        base = {"gguf": str(embedded_gguf_path()), "template": CHATML_TEMPLATE, "parameters": {"stop": ["<|im_end|>"]}}
        with OllamaStandIn({"smollm2:135m": base}) as server:
            ws = init_workspace(tmp / "ws", model="embedded")
            _size_workspace(ws.dir / "cycle.yaml", a.steps, server.host, a.tolerance)
            started = time.perf_counter()
            result = run_round(ws.dir, [months[0]], client=None)
            total = time.perf_counter() - started
        with Registry(ws.dir / "registry.sqlite", readonly=True) as reg:
            steps = [{"persona": s.persona, "step": s.step, "seconds": s.record.detail.get("seconds")}
                     for s in reg.list_steps(result.round_id)]
    for s in steps:
        print(f"{s['persona']:>10} {s['step']:<12} {s['seconds']:>8.1f} s")
    print(f"total {total:.0f} s, verdict {[(u.unit, u.status) for u in result.units]}")
    return {"steps_per_round": a.steps, "gate_tolerance": a.tolerance, "status": result.status,
            "total_seconds": round(total, 1), "steps": steps}


def _size_workspace(path: Path, steps: int, host: str, tolerance: float | None = None) -> None:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    run = data.setdefault("run", {})
    run.setdefault("training", {}).update({"max_steps": steps, "warmup_steps": 2, "eval_steps": steps, "save_steps": steps})
    run.setdefault("model", {})["max_seq_len"] = 256
    run.setdefault("evaluation", {})["max_new_tokens"] = 48
    if tolerance is not None:
        run["evaluation"]["tolerance"] = tolerance
    run.setdefault("export", {})["ollama_base"] = "smollm2:135m"
    data["replay"] = {**data.get("replay", {}), "quotas": QUOTAS}
    data.setdefault("ollama", {})["host"] = host
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("strategies", "round"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-limit", type=int, default=40, help="conversations per perplexity set")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="round: the gate's evaluation.tolerance (to time export and deploy when the suite's noise on the 135M model refuses the month)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    started = time.perf_counter()
    result = strategies(a) if a.what == "strategies" else round_timing(a)
    result.update(wall_seconds=round(time.perf_counter() - started, 1), machine=platform.processor() or platform.machine(),
                  date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
