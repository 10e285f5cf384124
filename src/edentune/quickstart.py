"""The end-to-end recipe on the embedded default, readable top to bottom.

    bundled sample -> validate + clean -> split -> base answers and scores
    -> QLoRA fine-tune -> loss curve -> fine-tuned answers and scores
    -> base-vs-fine-tuned report -> GGUF adapter + Modelfile -> the `ollama create` command

Sized for 2 CPU cores and under 15 minutes: short conversations (max_seq_len 384), a fixed
number of optimizer steps and a subset of the evaluation suite. Every stage is the same public
API that `edentune data/train/eval/export` call; only the sizes differ from a real run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .config import RunConfig, config_for_model, render_config_yaml
from .io import atomic_open, ensure_dir, write_text_atomic

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"


@dataclass
class QuickstartOptions:
    out_dir: Path = Path("runs/quickstart")
    max_steps: int = 60
    max_seq_len: int = 384
    eval_cases: int = 8  # suite cases scored for base and fine-tuned
    max_new_tokens: int = 96
    shown_prompts: int = 2  # held-out prompts shown before/after
    verify_export: bool = True


@dataclass
class QuickstartResult:
    config_path: Path
    adapter_dir: Path
    report_paths: dict = field(default_factory=dict)
    export_dir: Path | None = None
    create_commands: list[str] = field(default_factory=list)
    seconds: float = 0.0


def quickstart_config(opts: QuickstartOptions, train_file: Path, val_file: Path) -> RunConfig:
    steps, every = opts.max_steps, max(1, opts.max_steps // 2)
    return config_for_model("embedded").updated({
        "model.max_seq_len": opts.max_seq_len,
        "model.overlong": "drop",  # keep whole conversations: the model must see each <|im_end|>
        "training.output_dir": str(opts.out_dir / "run"),
        "training.max_steps": steps,
        "training.warmup_steps": min(5, max(0, steps // 5)),
        "training.logging_steps": max(1, steps // 20),
        "training.eval_steps": every,
        "training.save_steps": every,
        "data.train_files": [str(train_file)],
        "data.validation_files": [str(val_file)],
        "data.replay_files": [str(SAMPLE_DIR / "replay.jsonl")],
        "evaluation.max_new_tokens": opts.max_new_tokens,
        "export.ollama_base": "smollm2:135m",
        "export.num_ctx": max(2048, opts.max_seq_len),
    })


def _step(console: Console, n: int, title: str) -> None:
    console.rule(f"[bold]{n}. {title}")


def prepare_data(out: Path, console: Console) -> tuple[Path, Path]:
    from .data.clean import clean
    from .data.split import split

    data = out / "data"
    records, report = clean([SAMPLE_DIR / "eden_sample.jsonl"], write=data / "clean.jsonl",
                            quarantine=data / "quarantine.jsonl")
    console.print(report.summary())
    n_train, n_val = split([data / "clean.jsonl"], data / "train.jsonl", data / "validation.jsonl", val_fraction=0.08)
    console.print(f"split by content hash: {n_train} train / {n_val} validation")
    return data / "train.jsonl", data / "validation.jsonl"


def held_out_conversations(cfg: RunConfig, n: int) -> list[tuple[str, list[dict]]]:
    rows = [json.loads(line) for line in (SAMPLE_DIR / "heldout_prompts.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    # One persona question and one coding question in different languages show the change best.
    picked = [next(r for r in rows if r["category"] == "persona" and r["language"] == "en"),
              next(r for r in rows if r["category"] == "coding" and r["language"] == "ko")] + rows
    seen, out = set(), []
    for r in picked:
        if r["prompt"] not in seen and len(out) < n:
            seen.add(r["prompt"])
            out.append((r["prompt"], [{"role": "system", "content": cfg.model.system_prompt},
                                      {"role": "user", "content": r["prompt"]}]))
    return out


def loss_curve(metrics_jsonl: Path, png: Path) -> tuple[list[float], list[tuple[int, float]]]:
    """Plot train and validation loss (PNG) and return the series for the terminal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("event") == "train":
            train.append((rec["step"], rec["loss"]))
        elif rec.get("event") == "eval":
            val.append((rec["step"], rec["eval_loss"]))
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(png, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
    return [v for _, v in train], val


def sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def run_quickstart(opts: QuickstartOptions | None = None, console: Console | None = None) -> QuickstartResult:
    from .evaluate.backends import backend_from_spec
    from .evaluate.compare import compare
    from .evaluate.report import rich_table, write_reports
    from .evaluate.runner import evaluate, perplexity_sets
    from .evaluate.suite import Suite, load_suite
    from .export.api import export_adapter
    from .train import train
    from .train.run import quantization_summary, select_backend

    opts = opts or QuickstartOptions()
    opts.out_dir = opts.out_dir.resolve()  # the written config must name absolute data paths
    console = console or Console()
    started = time.perf_counter()
    out = opts.out_dir
    ensure_dir(out)

    _step(console, 1, "Validate and clean the bundled Eden conversations")
    train_file, val_file = prepare_data(out, console)
    cfg = quickstart_config(opts, train_file, val_file)
    config_path = out / "edentune.yaml"
    write_text_atomic(config_path, render_config_yaml(cfg))
    quantized = quantization_summary(cfg, select_backend(cfg.training.backend))
    console.print(f"run config: {config_path} (preset embedded, {quantized}, r={cfg.lora.r}, {opts.max_steps} steps)")

    full = load_suite(cfg.evaluation.suite)
    suite = Suite(full.name, full.path, _spread(full.cases, opts.eval_cases))
    validation, replay = perplexity_sets(cfg, limit=40)
    shown = held_out_conversations(cfg, opts.shown_prompts)

    _step(console, 2, "Score the base model")
    base = backend_from_spec("base", cfg)
    before = base.generate([c for _, c in shown], opts.max_new_tokens)
    base_result = evaluate(cfg, base, suite, validation=validation, replay=replay)
    del base

    _step(console, 3, "Fine-tune with QLoRA")
    result = train(cfg, resume=False, console=console)
    train_loss, val_loss = loss_curve(Path(cfg.training.output_dir) / "metrics.jsonl", out / "loss_curve.png")
    if train_loss:
        console.print(f"train loss  {sparkline(train_loss)}  {train_loss[0]:.3f} → {train_loss[-1]:.3f}")
    if val_loss:
        console.print("validation loss  " + "  ".join(f"step {s}: {v:.3f}" for s, v in val_loss))
    console.print(f"loss curve: {out / 'loss_curve.png'}")

    _step(console, 4, "Compare base and fine-tuned")
    tuned = backend_from_spec(str(result.adapter_dir), cfg)
    after = tuned.generate([c for _, c in shown], opts.max_new_tokens)
    tuned_result = evaluate(cfg, tuned, suite, validation=validation, replay=replay)
    del tuned
    for (prompt, _), b, a in zip(shown, before, after):
        table = Table(title=f"held-out prompt: {prompt}", show_lines=True, expand=True)
        table.add_column("base", ratio=1)
        table.add_column("fine-tuned", ratio=1)
        table.add_row(b.text, a.text)
        console.print(table)
    comparison = compare(base_result, tuned_result, cfg, metrics_jsonl=Path(cfg.training.output_dir) / "metrics.jsonl")
    console.print(rich_table(comparison))
    reports = {p.name: p for p in write_reports(comparison, out / "report", base=base_result, candidate=tuned_result).values()}

    _step(console, 5, "Export for Ollama")
    exported = export_adapter(cfg, result.adapter_dir, out / "ollama", verify=opts.verify_export)
    seconds = time.perf_counter() - started
    console.print(Panel.fit(
        "\n".join([f"adapter (PEFT): {result.adapter_dir}", f"GGUF adapter + Modelfile: {exported.out_dir}",
                   f"report: {reports.get('report.html', out / 'report')}",
                   "deploy where Ollama runs:", *[f"  {c}" for c in exported.create_commands]]),
        title=f"done in {seconds / 60:.1f} min"))
    return QuickstartResult(config_path, result.adapter_dir, reports, exported.out_dir, exported.create_commands, seconds)


def _spread(cases: list, n: int) -> list:
    """n cases spread over the suite's categories (round-robin), so every metric gets a sample."""
    by_cat: dict[str, list] = {}
    for c in cases:
        by_cat.setdefault(c.category, []).append(c)
    picked: list = []
    while len(picked) < min(n, len(cases)):
        for group in by_cat.values():
            if group and len(picked) < n:
                picked.append(group.pop(0))
    return picked
