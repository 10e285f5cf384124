"""`edentune` command line: a thin Typer layer over the Python API.

Each stage (data, train, evaluate, export, cycle) owns its commands in `<stage>/cli.py`, which
must import heavy libraries (torch, transformers) inside the command functions so that
`edentune --help` stays instant. User mistakes raise `EdentuneError`: printed without a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console

from .errors import EdentuneError

console = Console(stderr=True)
app = typer.Typer(
    name="edentune",
    help="Turn your assistant's conversations into a better local model, and deploy it to Ollama.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and check run configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.command()
def init(
    model: str = typer.Option("qwen2.5-14b", help="qwen2.5-0.5b…32b, llama-3.1-8b, embedded, a hub id or a path"),
    output: Path = typer.Option(Path("edentune.yaml"), "--output", "-o", help="where to write the config"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
) -> None:
    """Write a commented run config with the guide's preset for MODEL."""
    from .config import config_for_model, render_config_yaml
    from .io import write_text_atomic

    if output.exists() and not force:
        raise EdentuneError(f"{output} exists", hint="use --force to overwrite, or -o another path")
    cfg = config_for_model(model)
    write_text_atomic(output, render_config_yaml(cfg))
    console.print(f"wrote [bold]{output}[/] (preset [bold]{cfg.preset}[/]: {cfg.preset_obj.description})")


@config_app.command("check")
def config_check(path: Path = typer.Argument(..., help="run config YAML")) -> None:
    """Validate a config: errors name the key; values outside the preset's safe range are warned about."""
    from .config import load_config

    cfg = load_config(path)
    for w in cfg.range_warnings():
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"[green]ok[/] {path}: preset {cfg.preset}, model {cfg.model.name_or_path}")


@app.command()
def quickstart(
    out_dir: Path = typer.Option(Path("runs/quickstart"), "--out", help="where data, run, report and export go"),
    max_steps: int = typer.Option(60, help="optimizer steps (about 5.5 s each on 2 CPU cores)"),
    eval_cases: int = typer.Option(8, help="evaluation-suite cases scored before and after"),
    verify: bool = typer.Option(True, help="check the exported GGUF adapter against the PEFT model in llama.cpp"),
) -> None:
    """Clean the bundled data, QLoRA-fine-tune the embedded model, compare before/after, export for Ollama."""
    from .quickstart import QuickstartOptions, run_quickstart

    run_quickstart(QuickstartOptions(out_dir=out_dir, max_steps=max_steps, eval_cases=eval_cases, verify_export=verify),
                   Console())


@app.command()
def plan(
    config: Path = typer.Argument(..., help="run config YAML"),
    device_gb: float = typer.Option(None, help="memory of the training device in GB (default: the CUDA card, else 24)"),
    device: str = typer.Option("cuda", help="cuda | cpu | mps: where the run will train"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Estimate peak training memory term by term, and say what to change if it does not fit."""
    import json

    from rich.table import Table

    from .config import load_config
    from .train.plan import estimate, model_config_for

    cfg = load_config(config)
    if device_gb is None:
        import torch

        device_gb = torch.cuda.get_device_properties(0).total_memory / 1024**3 if torch.cuda.is_available() else 24.0
    p = estimate(cfg, model_config_for(cfg), device_gb, device)
    if as_json:
        print(json.dumps({"terms_gb": p.terms, "total_gb": p.total_gb, "device_gb": device_gb, "fits": p.fits,
                          "tokens_per_micro_batch": p.tokens_per_micro_batch, "advice": p.advice}, indent=2))
        return
    table = Table(title=f"Peak memory estimate: {cfg.model.name_or_path} ({p.tokens_per_micro_batch} tokens per micro-batch)")
    table.add_column("term")
    table.add_column("GB", justify="right")
    for k, v in p.terms.items():
        table.add_row(k, f"{v:.2f}")
    table.add_row("[bold]total[/]", f"[bold]{p.total_gb:.2f}[/]")
    Console().print(table)
    verdict = "[green]fits[/]" if p.fits else "[red]does not fit[/]"
    Console().print(f"{verdict} in {device_gb:.0f} GB")
    for a in p.advice:
        Console().print(f"  change: {a}")


# Stage command modules: `register(app)` adds top-level commands; a module-level Typer `app`
# becomes a command group named after the stage (`edentune data …`). Import errors are not
# swallowed: a broken stage module is a packaging bug.
for _stage in ("data", "train", "evaluate", "export", "cycle"):  # data first: train adds `data inspect`
    if importlib.util.find_spec(f"edentune.{_stage}.cli") is None:
        continue
    _mod = importlib.import_module(f"edentune.{_stage}.cli")
    if hasattr(_mod, "register"):
        _mod.register(app)
    else:
        app.add_typer(_mod.app, name=_stage)


# Library warnings that say nothing the user can act on, each already handled by edentune: peft
# and TRL call transformers APIs renamed in v5, and bitsandbytes' paged-optimizer fallback on CPU
# is announced by the recipe in its own words. (The CLI only: the Python API leaves filters alone.)
QUIET_WARNINGS = (
    (FutureWarning, r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"),
    (UserWarning, r"Paged optimizers are not supported on CPU"),
)


def main() -> None:
    logging.basicConfig(level=os.environ.get("EDENTUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # bitsandbytes tries to fetch an optional CPU kernel from the Hugging Face hub through the
    # `kernels` package and logs a warning when it cannot; its built-in CPU path is what runs.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        app()
    except EdentuneError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
