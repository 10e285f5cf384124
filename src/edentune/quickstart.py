"""`make quickstart`: two months of the monthly cycle on the embedded model, without Ollama.

    bundled sample, split in two by content hash -> `cycle init --model embedded`
    -> month 1: `cycle run --no-deploy` (clean, fixed validation set, QLoRA from the base, scored
       against the base, gate, GGUF export)
    -> month 2: `cycle run --no-deploy` (70% new / 30% replayed from month 1, continues month 1's
       adapter, must beat it)
    -> status, loss curve, where the reports and exports are, how to deploy

Every step is the cycle's own (`cycle.round.run_round`); the quickstart only writes the months,
sizes the workspace's cycle.yaml for 2 CPU cores and under 15 minutes (conversations up to 384
tokens, a fixed number of optimizer steps, an 8-case subset of the evaluation suite) and prints
what happened. Rerun it and it continues: a finished month is kept, an interrupted one resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.panel import Panel

from .io import atomic_open, ensure_dir, write_text_atomic

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
MONTHS = ("month-1", "month-2")


@dataclass
class QuickstartOptions:
    out_dir: Path = Path("runs/quickstart")
    max_steps: int = 40  # per month
    max_seq_len: int = 384
    eval_cases: int = 8  # suite cases scored for the live model and the candidate
    max_new_tokens: int = 96
    verify_export: bool = True  # the export's llama.cpp parity check


@dataclass
class QuickstartResult:
    workspace: Path
    rounds: list = field(default_factory=list)  # cycle.round.RoundResult per month
    report_paths: dict = field(default_factory=dict)  # month -> report.html
    export_dirs: dict = field(default_factory=dict)  # month -> export folder (accepted months)
    loss_curve: Path | None = None
    deploy_command: str | None = None
    seconds: float = 0.0


def split_months(out: Path) -> list[Path]:
    """The bundled sample in two halves by content hash: one file per month (raw, as an app exports it)."""
    import hashlib

    lines = [line for line in (SAMPLE_DIR / "eden_sample.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    halves: list[list[str]] = [[], []]
    for line in lines:  # the lines as they are: reading, repairing and quarantining them is the cycle's ingest step
        halves[hashlib.sha256(line.encode()).digest()[0] % 2].append(line)
    paths = [out / "data" / f"{m}.jsonl" for m in MONTHS]
    for path, month in zip(paths, halves):
        write_text_atomic(path, "".join(line + "\n" for line in month))
    return paths


def write_suite(out: Path, n: int) -> Path:
    """`n` cases of the default suite, spread over its categories, so every metric gets a sample."""
    from .evaluate.suite import resolve_suite_path

    cases = yaml.safe_load(resolve_suite_path("default").read_text(encoding="utf-8"))["cases"]
    by_cat: dict[str, list] = {}
    for c in cases:
        by_cat.setdefault(c.get("category", "general"), []).append(c)
    picked: list = []
    while len(picked) < min(n, len(cases)):
        for group in by_cat.values():
            if group and len(picked) < n:
                picked.append(group.pop(0))
    path = out / "data" / "suite.yaml"
    write_text_atomic(path, yaml.safe_dump({"name": f"quickstart ({len(picked)} cases of default)", "cases": picked},
                                           allow_unicode=True, sort_keys=False))
    return path


def make_workspace(opts: QuickstartOptions, suite: Path) -> Path:
    """`cycle init --model embedded`, then cycle.yaml sized as a user would edit it (existing: kept)."""
    from .cycle.workspace import WorkspaceConfig, init_workspace, is_workspace, load_workspace, render_workspace_yaml

    ws_dir = opts.out_dir / "workspace"
    if is_workspace(ws_dir):
        return load_workspace(ws_dir).dir
    from .presets import quickstart_recipe

    ws = init_workspace(ws_dir, model="embedded")  # the embedded model's recipe, at its default size
    run = ws.config.run.updated({**quickstart_recipe(opts.max_steps, opts.max_seq_len, opts.max_new_tokens),
                                 "evaluation.suite": str(suite), "export.verify": opts.verify_export})
    data = ws.config.model_dump(mode="json")
    data["run"] = run.model_dump(mode="json")
    cfg = WorkspaceConfig.model_validate(data)
    write_text_atomic(ws.config_path, render_workspace_yaml(cfg, str(ws_dir)))
    return ws.dir


def loss_curve(ws_dir: Path, png: Path) -> list[tuple[str, list[float]]]:
    """Train and validation loss of every month on one axis (month 2 continues month 1's steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=120)
    offset, out = 0, []
    for month in MONTHS:
        metrics = ws_dir / "rounds" / month / "default" / "run" / "metrics.jsonl"
        if not metrics.is_file():
            continue
        train, val = [], []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("event") == "train":
                train.append((offset + rec["step"], rec["loss"]))
            elif rec.get("event") == "eval":
                val.append((offset + rec["step"], rec["eval_loss"]))
        if train:
            ax.plot(*zip(*train), label=f"{month} train loss")
        if val:
            ax.plot(*zip(*val), "o-", label=f"{month} validation loss")
        out.append((month, [v for _, v in train]))
        offset = max([s for s, _ in train + val], default=offset)
    ax.set_xlabel("optimizer step (months one after the other)")
    ax.set_ylabel("loss (assistant tokens)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(png, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
    return out


def sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def _finished(ws_dir: Path, month: str) -> bool:
    from .registry import REGISTRY_NAME, Registry

    with Registry(ws_dir / REGISTRY_NAME, readonly=True) as reg:
        rnd = reg.round(month)
    return rnd is not None and rnd.status != "running"


def run_quickstart(opts: QuickstartOptions | None = None, console: Console | None = None) -> QuickstartResult:
    from .cycle import round as cycle_round
    from .cycle.cli import print_status
    from .cycle.report import status
    from .cycle.workspace import load_workspace
    from .registry import REGISTRY_NAME, Registry
    from .train.run import quantization_summary, select_backend

    opts = opts or QuickstartOptions()
    opts.out_dir = opts.out_dir.resolve()  # the workspace config names absolute paths
    console = console or Console()
    started = time.perf_counter()
    out = ensure_dir(opts.out_dir)

    console.rule("[bold]The bundled conversations as two months")
    months = split_months(out)
    for month, path in zip(MONTHS, months):
        console.print(f"{month}: {sum(1 for _ in path.open(encoding='utf-8'))} conversations ({path})", highlight=False)
    ws_dir = make_workspace(opts, write_suite(out, opts.eval_cases))
    cfg = load_workspace(ws_dir).round_config(MONTHS[0], "default")
    quantized = quantization_summary(cfg, select_backend(cfg.training.backend))
    console.print(f"workspace: {ws_dir} (edentune cycle init --model embedded; cycle.yaml sized for 2 CPU cores: "
                  f"{cfg.training.max_steps} steps a month, max_seq_len {cfg.model.max_seq_len}, {opts.eval_cases} suite cases)",
                  highlight=False)
    console.print(f"training: {quantized}, LoRA r={cfg.lora.r}", highlight=False)

    result = QuickstartResult(ws_dir)
    for n, (month, path) in enumerate(zip(MONTHS, months), 1):
        console.rule(f"[bold]Month {n}: edentune cycle run {ws_dir.name} --new {path.name} --no-deploy")
        if _finished(ws_dir, month):
            console.print(f"{month} ran earlier: kept (remove {out} to start over)", highlight=False)
            continue
        result.rounds.append(cycle_round.run_round(ws_dir, [path], round_id=month, console=console, deploy=False))

    console.rule("[bold]What the cycle did")
    with Registry(ws_dir / REGISTRY_NAME, readonly=True) as reg:
        for month in MONTHS:
            mix = reg.step(month, "default", "mix")
            run = reg.run(month, "default")
            if mix is None or run is None:
                continue
            sources = mix.detail["sources"]
            replayed = {k: v for k, v in sources.items() if k != "new"}
            console.print(f"{month}: trained on {sources.get('new', 0)} new conversations"
                          + (f" + {sum(replayed.values())} replayed from " + ", ".join(replayed)
                             if replayed else " (the replay buffer was empty)"), highlight=False)
            verdict = run.verdict or {}
            if verdict:
                console.print(f"  gate: validation loss {verdict.get('live_val_loss') or float('nan'):.4f} → "
                              f"{verdict.get('val_loss') or float('nan'):.4f}; {run.status}"
                              + (f" ({'; '.join(map(str, run.reasons))})" if run.reasons else ""), highlight=False)
            report = ws_dir / "rounds" / month / "default" / "eval" / "report.html"
            if report.is_file():
                result.report_paths[month] = report
            if run.status == "accepted" and run.export_dir:
                result.export_dirs[month] = Path(run.export_dir)
    print_status(status(ws_dir), console)
    for r in result.rounds:  # where the time went (also in `edentune cycle status --json`)
        by_step = {k.split("/", 1)[1]: v for k, v in r.step_seconds.items()}
        console.print(f"{r.round_id}: {r.seconds:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in by_step.items() if v >= 1),
                      highlight=False)

    result.loss_curve = out / "loss_curve.png"
    for month, losses in loss_curve(ws_dir, result.loss_curve):
        if losses:
            console.print(f"{month} train loss  {sparkline(losses)}  {losses[0]:.3f} → {losses[-1]:.3f}", highlight=False)
    lines = [f"loss curve: {result.loss_curve}"]
    lines += [f"{m} base-vs-candidate report: {p}" for m, p in result.report_paths.items()]
    lines += [f"{m} GGUF adapter + Modelfile: {p}" for m, p in result.export_dirs.items()]
    if result.export_dirs:
        newest = list(result.export_dirs)[-1]
        result.deploy_command = f"edentune cycle deploy {ws_dir} --round {newest}"
        lines += ["deploy where Ollama runs (ollama pull smollm2:135m first):", f"  {result.deploy_command}",
                  f"next month: edentune cycle run {ws_dir} --new NEW.jsonl"]
    else:
        lines += ["the gate accepted no month, so there is nothing to deploy: the reports say why"]
    result.seconds = time.perf_counter() - started
    console.print(Panel.fit("\n".join(lines), title=f"done in {result.seconds / 60:.1f} min"))
    return result
