"""`edentune train CONFIG [--resume]`, `edentune train-feedback CONFIG --data kto.jsonl` and
`edentune inspect CONFIG` (what exactly is trained)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def _check_run_dir(run_dir: str | Path) -> None:
    """A run folder from the config is an output too: never inside a workspace's rounds (the cycle
    writes those, under its lock), an export or an adapter folder (io.managed_owner)."""
    from edentune.errors import EdentuneError
    from edentune.io import managed_owner

    if (owner := managed_owner(run_dir, folder=True)) is not None:
        raise EdentuneError(f"training.output_dir {run_dir} is inside {owner}, whose files edentune manages",
                            hint="set training.output_dir (or preference.output_dir) to a folder outside it; "
                                 "a workspace's rounds are trained by `edentune cycle run`")


def train_command(
    config: Path = typer.Argument(..., help="run config YAML"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint in training.output_dir "
                                "(a damaged newer one is skipped with a warning)"),
    fresh_optimizer: bool = typer.Option(False, "--fresh-optimizer", help="with --resume: accept a checkpoint without "
                                         "optimizer.pt/scheduler.pt; the optimizer and LR schedule then start from zero"),
    num_processes: int = typer.Option(None, "--num-processes", min=2,
                                      help="train in N processes (one per GPU; on CPU, gloo) through accelerate's launcher; "
                                           "see docs/multi-gpu.md"),
    accelerate_config: Path = typer.Option(None, "--accelerate-config", exists=True, dir_okay=False,
                                           help="with --num-processes: an accelerate config file (e.g. FSDP) for the launcher"),
) -> None:
    """Fine-tune the base model with LoRA/QLoRA on the assistant turns of the config's data."""
    from edentune.config import load_config
    from edentune.errors import EdentuneError

    from . import train

    cfg = load_config(config)
    _check_run_dir(cfg.training.output_dir)
    if fresh_optimizer and not resume:
        raise typer.BadParameter("only meaningful with --resume", param_hint="--fresh-optimizer")
    if accelerate_config is not None and num_processes is None:
        raise EdentuneError("--accelerate-config needs --num-processes", hint="e.g. --num-processes 2 --accelerate-config fsdp.yaml")
    if num_processes is not None:
        _relaunch(config, resume, fresh_optimizer, num_processes, accelerate_config)
        return
    if os.environ.get("RANK", "0") == "0":  # under a launch, the first process warns for all
        for w in cfg.range_warnings():
            console.print(f"[yellow]warning:[/] {w}")
    train(cfg, resume=resume, console=console, fresh_optimizer=fresh_optimizer)


def _relaunch(config: Path, resume: bool, fresh_optimizer: bool, num_processes: int, accelerate_config: Path | None) -> None:
    """`accelerate launch --num_processes N -m edentune train CONFIG`, with its exit status."""
    import subprocess

    from edentune.models import pick_device

    from .distributed import launcher_command

    args = ["train", str(config), *(["--resume"] if resume else []), *(["--fresh-optimizer"] if fresh_optimizer else [])]
    cmd = launcher_command(args, num_processes, pick_device(),
                           accelerate_config)
    console.print("launching: " + " ".join(cmd[1:]), highlight=False, markup=False)
    code = subprocess.run(cmd).returncode
    if code:
        raise typer.Exit(code)


def train_feedback_command(
    config: Path = typer.Argument(..., help="run config YAML (its `preference:` section picks KTO or DPO)"),
    data: Path = typer.Option(..., "--data", "-d", help="kto.jsonl or dpo.jsonl written by `edentune data feedback`"),
    adapter: Path = typer.Option(None, "--adapter", "-a", help="SFT adapter to continue (and to use as the reference)"),
    method: str = typer.Option(None, "--method", help="kto (thumbs up/down) or dpo (pairs); default: preference.method"),
) -> None:
    """Learn from thumbs up/down: KTO on unpaired ratings or DPO on pairs, continuing the SFT adapter."""
    from edentune.config import load_config

    from .preference import train_preferences

    cfg = load_config(config)
    if method is not None:
        cfg = cfg.updated({"preference.method": method})
    _check_run_dir(cfg.preference.output_dir or f"{cfg.training.output_dir}-{cfg.preference.method}")
    result = train_preferences(cfg, data, adapter=adapter, console=console)
    last = result.metrics.get("last_log", {})
    shown = {k: v for k, v in last.items() if k.startswith(("rewards/", "kl")) and isinstance(v, float)}
    if shown:
        console.print("  ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    console.print(f"compare it before deploying: `edentune compare --base base --candidate {result.adapter_dir}`", highlight=False)


def inspect_command(
    config: Path = typer.Argument(..., help="run config YAML"),
    index: int = typer.Option(0, "--index", "-n", help="which conversation (0-based, in file order)"),
    split: str = typer.Option("train", help="train or validation"),
) -> None:
    """Print one conversation as the model sees it, trained tokens highlighted."""
    from rich.text import Text

    from edentune.config import load_config
    from edentune.errors import EdentuneError
    from edentune.models import load_tokenizer, resolve_model_dir

    from edentune.data.encode import IGNORE, encode_conversation, load_splits

    cfg = load_config(config)
    convs = dict(zip(("train", "validation"), load_splits(cfg.data))).get(split)
    if convs is not None:  # as training encodes them (request_format eden: one example per reply)
        from edentune.data.eden_layout import request_layout

        convs = request_layout(cfg.export).conversations(convs)
    if convs is None:
        raise EdentuneError(f"--split must be train or validation, not {split!r}")
    if not 0 <= index < len(convs):
        raise EdentuneError(f"--index {index} is out of range: the {split} split has {len(convs)} conversation(s)")
    m = cfg.model
    tok = load_tokenizer(resolve_model_dir(m.name_or_path, m.gguf_file, m.architecture), m.trust_remote_code)
    ex = encode_conversation(tok, convs[index], m.system_prompt)
    text = Text()
    for token, label in zip(ex.input_ids, ex.labels):
        text.append(tok.decode([token]), style="bold black on green" if label != IGNORE else "dim")
    out = Console()
    out.print(f"[bold]{ex.source}[/]  ({len(ex.input_ids)} tokens, [green]{ex.trained_tokens} trained[/])")
    out.print(text)
    if len(ex.input_ids) > m.max_seq_len:
        out.print(f"[yellow]longer than max_seq_len={m.max_seq_len}[/]: training will {m.overlong} it")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("train-feedback")(train_feedback_command)
    app.command("inspect")(inspect_command)
    # `edentune data inspect`, the spelling of earlier releases, stays as a hidden alias for one release.
    for group in app.registered_groups:
        if group.name == "data":
            group.typer_instance.command("inspect", hidden=True)(inspect_command)
