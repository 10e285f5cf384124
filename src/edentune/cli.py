"""`edentune` command line: a thin Typer layer over the Python API.

Each stage (data, train, evaluate, export, cycle) owns its commands in `<stage>/cli.py`, which
must import heavy libraries (torch, transformers) inside the command functions so that
`edentune --help` stays instant. User mistakes raise `EdentuneError`: printed without a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
import types
import typing
import warnings
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from .errors import ConfigError, EdentuneError, os_error

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


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("edentune")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "unknown (not installed)"
        print(f"edentune {number}")
        raise typer.Exit()


@app.callback()
def _root(_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                        help="Print the version and exit.")) -> None:
    pass


@app.command()
def init(
    model: str = typer.Option("qwen2.5-14b", help="qwen2.5-0.5b…32b, llama-3.1-8b, embedded, a hub id or a path"),
    output: Path = typer.Option(Path("edentune.yaml"), "--output", "-o", help="where to write the config"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
) -> None:
    """Write a commented run config with the guide's preset for MODEL."""
    from .config import config_for_model, render_config_yaml
    from .io import check_outputs, write_text_atomic
    from .models import model_reference_problem

    if output.is_dir():
        raise ConfigError(f"{output} is a directory; --output names the config file to write",
                          hint=f"e.g. -o {output / 'edentune.yaml'}")
    if output.exists() and not output.is_file():
        raise ConfigError(f"{output} is not a regular file (a device or pipe?); --force replaces only files",
                          hint="-o another path")
    if output.exists() and not force:
        raise EdentuneError(f"{output} exists", hint="use --force to overwrite, or -o another path")
    check_outputs([], [output], user_paths=True)  # --force never replaces a workspace's or an export's file
    cfg = config_for_model(model)
    problem = model_reference_problem(cfg.model.name_or_path)
    if problem is not None and problem[0] == "error":
        raise ConfigError(f"--model: {problem[1]}")
    write_text_atomic(output, render_config_yaml(cfg))
    console.print(f"wrote [bold]{escape(str(output))}[/] (preset [bold]{cfg.preset}[/]: {cfg.preset_obj.description})")
    if problem is not None:
        console.print(f"[yellow]warning:[/] {escape(problem[1])}", highlight=False, soft_wrap=True)


@config_app.command("check")
def config_check(path: Path = typer.Argument(..., help="run config YAML")) -> None:
    """Validate a config: errors name the key; missing data files and unknown models are errors;
    values outside the preset's safe range are warned about."""
    from .config import load_config, reference_problems

    cfg = load_config(path)
    errors, warns = reference_problems(cfg)
    for w in [*cfg.range_warnings(), *warns]:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    if errors:
        raise ConfigError(f"{path}: " + "\n  ".join([f"{len(errors)} problem(s):", *errors]),
                          hint="fix the paths and model.name_or_path; relative paths are relative to the config file")
    console.print(f"[green]ok[/] {escape(str(path))}: preset {cfg.preset}, model {escape(cfg.model.name_or_path)}", highlight=False)


@app.command()
def quickstart(
    out_dir: Path = typer.Option(Path("runs/quickstart"), "--out", help="where the months, the cycle workspace and the loss curve go"),
    max_steps: int = typer.Option(40, help="optimizer steps per month (about 5.5 s each on 2 CPU cores)"),
    eval_cases: int = typer.Option(8, help="evaluation-suite cases scored for the live model and the candidate"),
    verify: bool = typer.Option(True, help="check the exported GGUF adapter against the PEFT model in llama.cpp"),
) -> None:
    """Two months of the cycle on the embedded model without Ollama: the bundled data split in two,
    `cycle run --no-deploy` for each (clean, replay mix, QLoRA, evaluate, gate, export), then how to deploy."""
    from .io import managed_owner
    from .quickstart import QuickstartOptions, run_quickstart

    if (owner := managed_owner(out_dir, folder=True)) is not None:
        raise EdentuneError(f"--out {out_dir} is inside {owner}, whose files edentune manages", hint="give a folder outside it")
    run_quickstart(QuickstartOptions(out_dir=out_dir, max_steps=max_steps, eval_cases=eval_cases, verify_export=verify),
                   Console())


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"
    mps = "mps"
    apple = "apple"  # the MLX backend on a Mac's unified memory (docs/apple-silicon.md)


def _device_gb(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number of GB above 0, not {value:g}")
    return value


@app.command()
def plan(
    config: Path = typer.Argument(..., help="run config YAML"),
    device_gb: float = typer.Option(None, callback=_device_gb,
                                    help="memory of the training device in GB (default: the CUDA card, else 24; apple: the Mac's RAM)"),
    device: Device = typer.Option(Device.cuda, help="where the run will train"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    ram_gb: float = typer.Option(None, callback=_device_gb, help="host RAM in GB beside a CUDA card (default: this machine's)"),
    disk_free_gb: float = typer.Option(None, callback=_device_gb, help="free disk in GB (default: free space where the run writes)"),
) -> None:
    """Estimate peak training memory term by term, and say what to change if it does not fit; then
    the whole round's plan: each step's peak (train, evaluate per backend, export, smoke check) and disk."""
    import json

    from rich.table import Table

    from .config import load_config
    from .train.plan import estimate, model_config_for

    from .cycle.plan import print_round_plan, round_plan_for

    cfg = load_config(config)
    rp = round_plan_for(cfg, device.value, device_gb, ram_gb=ram_gb, disk_free_gb=disk_free_gb, where=cfg.training.output_dir)
    if device_gb is None and device is not Device.apple:
        import torch

        device_gb = torch.cuda.get_device_properties(0).total_memory / 1024**3 if torch.cuda.is_available() else 24.0
    if device is Device.apple:
        from .train.plan import apple_plan

        p, note = apple_plan(cfg, model_config_for(cfg), device_gb)
        Console(stderr=True).print(note)
        device_gb = p.device_gb
    else:
        p = estimate(cfg, model_config_for(cfg), device_gb, device.value)
    if as_json:
        print(json.dumps({"terms_gb": p.terms, "total_gb": p.total_gb, "device_gb": device_gb, "fits": p.fits, "margin_gb": p.margin_gb,
                          "tokens_per_micro_batch": p.tokens_per_micro_batch, "advice": p.advice, "round": rp.to_json()}, indent=2))
        return
    table = Table(title=f"Peak memory estimate: {cfg.model.name_or_path} ({p.tokens_per_micro_batch} tokens per micro-batch)")
    table.add_column("term")
    table.add_column("GB", justify="right")
    for k, v in p.terms.items():
        table.add_row(k, f"{v:.2f}")
    table.add_row("[bold]total[/]", f"[bold]{p.total_gb:.2f}[/]")
    Console().print(table)
    verdict = "[green]fits[/]" if p.fits else "[red]does not fit[/]"
    room = "the whole card (the allocator reserve is a term)" if "allocator reserve" in p.terms else "95% of it"
    Console().print(f"{verdict} in {device_gb:g} GB: {abs(p.margin_gb):.1f} GB {'to spare' if p.fits else 'over'}, using {room}")
    for a in p.advice:
        Console().print(f"  change: {a}")
    print_round_plan(rp, Console())


# Each stage's cli module adds its commands (or its command group) through `register(app)`.
# A stage that has no cli module yet is skipped; import errors in one that exists are not
# swallowed: a broken stage module is a packaging bug.
STAGES = ("data", "train", "evaluate", "export", "cycle", "review")


def _register_stages() -> None:
    for stage in STAGES:
        if importlib.util.find_spec(f"edentune.{stage}") is None or importlib.util.find_spec(f"edentune.{stage}.cli") is None:
            continue
        importlib.import_module(f"edentune.{stage}.cli").register(app)


_register_stages()


def _nonempty_path(value: str | Path) -> Path:
    if isinstance(value, str) and not value.strip():  # typer also passes the default (a Path) through here
        raise typer.BadParameter("an empty path is not a file or folder name")
    return Path(value)


def _path_checks(info) -> bool:
    """Does typer check this path itself (exists=, dir_okay=False, ...)? A parser would replace
    those checks, and they refuse an empty path already ('' does not exist / is a folder)."""
    return bool(info.exists or not info.file_okay or not info.dir_okay or info.writable or info.resolve_path)


def _refuse_empty_paths(typer_app: typer.Typer) -> None:
    """Every path option and argument of every command refuses an empty value: Path('') is
    Path('.'), so `data feedback -o ''` wrote into the current folder. typer converts the text
    with the parameter's `parser`; one is set here on each path parameter that has none, so no
    command can forget it."""
    for info in typer_app.registered_commands:
        hints = typing.get_type_hints(info.callback, include_extras=True)
        signature = inspect.signature(info.callback)
        for name, param in signature.parameters.items():
            hint = hints.get(name)
            metadata = list(getattr(hint, "__metadata__", ())) + [param.default]
            base = typing.get_args(hint)[0] if hasattr(hint, "__metadata__") else hint
            while typing.get_origin(base) in (list, typing.Union, types.UnionType):
                base = next(a for a in typing.get_args(base) if a is not type(None))
            if base is not Path:
                continue
            for param_info in metadata:
                if isinstance(param_info, typer.models.ParameterInfo) and getattr(param_info, "parser", None) is None \
                        and getattr(param_info, "click_type", None) is None and not _path_checks(param_info):
                    param_info.parser = _nonempty_path
                    if param_info.metavar is None:
                        param_info.metavar = "PATH" if isinstance(param_info, typer.models.OptionInfo) else name.upper()
                    # String annotations (PEP 563) are evaluated anew on every read: keep this object.
                    info.callback.__annotations__[name] = hint
    for group in typer_app.registered_groups:
        _refuse_empty_paths(group.typer_instance)


_refuse_empty_paths(app)


# Library warnings that say nothing the user can act on, each already handled by edentune: peft
# and TRL call transformers APIs renamed in v5, and bitsandbytes' paged-optimizer fallback on CPU
# is announced by the recipe in its own words. (The CLI only: the Python API leaves filters alone.)
QUIET_WARNINGS = (
    (FutureWarning, r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"),
    (UserWarning, r"Paged optimizers are not supported on CPU"),
)


EX_SOFTWARE = 70  # sysexits.h: an internal software error (a bug), as opposed to a user mistake (2)


def write_crash_log(exc: BaseException) -> Path | None:
    """Write the full traceback of an unexpected exception to a log file and return its path.

    The log goes to <cache>/logs (EDENTUNE_CACHE or ~/.cache/edentune), else to the system temp
    folder; None when neither can be written (the caller then prints the trace itself).
    """
    import tempfile
    import time
    import traceback

    from .io import write_text_atomic
    from .models import cache_root

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = (f"edentune {' '.join(sys.argv[1:])}\n{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for folder in (cache_root() / "logs", Path(tempfile.gettempdir())):
        path = folder / f"edentune-crash-{stamp}-{os.getpid()}.log"
        try:
            write_text_atomic(path, text)
            return path
        except (OSError, EdentuneError):  # the io helpers turn a blocked folder into EdentuneError
            continue
    return None


def _fail(err: EdentuneError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    sys.exit(err.exit_code)


def main() -> None:
    """The `edentune` entry point: every way a command can end is one clear line, never a traceback.

    - EdentuneError (a user mistake or broken input): its message and hint, exit code 2.
    - OSError (permission, read-only file system, a directory or file in the way, no space, ...):
      mapped to what happened on which path and what to do, exit code 2.
    - Ctrl-C: exit code 130 without a trace (Typer ends a running command so; "interrupted" when
      it comes outside one).
    - anything else is a bug: one line naming it and a log file with the full traceback, exit 70.
    Usage errors (unknown option, bad value) are click's own messages, exit code 2.
    """
    logging.basicConfig(level=os.environ.get("EDENTUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty():
        # Weight-loading and dataset bars redraw one line per tick: in a log file (cron, nohup,
        # `2> log`) that is thousands of lines. Read by huggingface_hub / transformers / datasets
        # when they are first imported, which is later, inside the commands.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # bitsandbytes tries to fetch an optional CPU kernel from the Hugging Face hub through the
    # `kernels` package and logs a warning when it cannot; its built-in CPU path is what runs.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        app()
    except EdentuneError as err:
        _fail(err)
    except OSError as err:
        _fail(os_error(err))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug, reported in one line + a log file
        try:
            log_path = write_crash_log(exc)
        except Exception:  # noqa: BLE001 - the report of a bug must not itself end in a second trace
            log_path = None
        if log_path is None:
            import traceback

            traceback.print_exception(type(exc), exc, exc.__traceback__)
        first_line = next(iter(str(exc).splitlines()), "")[:300]
        where = f"full trace written to {log_path}" if log_path else "full trace above"
        console.print(f"[bold red]internal error:[/] {escape(f'{type(exc).__name__}: {first_line}; {where}')} "
                      "(a bug in edentune, please report it with that file)", highlight=False, soft_wrap=True)
        sys.exit(EX_SOFTWARE)


if __name__ == "__main__":
    main()
