"""`edentune cycle …`: the monthly loop. Thin wrappers over edentune.cycle; the round runner and
its training stack are imported inside `cycle run` only, so `status` and `--help` stay instant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import EdentuneError

err_console = Console(stderr=True)


def _personas(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, model = spec.partition("=")
        if not name.strip():
            raise EdentuneError(f"--persona {spec!r}: expected NAME or NAME=OLLAMA_MODEL", hint="e.g. --persona professional=eden-professional")
        if name.strip() in out:
            raise EdentuneError(f"--persona {name.strip()!r} is given twice")
        out[name.strip()] = model.strip() if sep else ""
    return out


# Short headers so the table fits 80 columns; the legend under the table spells them out.
SHORT = {"val_loss": "val loss", "korean_consistency": "KO", "persona_adherence": "rules", "forgetting": "forget",
         "forgetting_base": "f·base"}
LEGEND = ("data: new+replay records mixed · trained: kept by training (−N: dropped, longer than max_seq_len) · "
          "from: the adapter the round continued (base: trained from the base model) · KO: Korean consistency · "
          "rules: persona adherence · forget: forgetting (perplexity increase on general data) against the live model · "
          "f·base: the same against the original base · time: the round's wall time · ● live now")


def _data_cell(metrics: dict) -> str:
    from .report import format_metric

    new, replay = metrics.get("new_records"), metrics.get("replay_records")
    if new is not None and replay is not None:
        return f"{format_metric('new_records', new)}+{format_metric('replay_records', replay)}"
    return format_metric("train_records", metrics.get("train_records"))


def _trained_cell(metrics: dict) -> str:
    from .report import format_metric

    trained, dropped = metrics.get("trained_records"), metrics.get("dropped_for_length")
    return format_metric("trained_records", trained) + (f" −{dropped:,}" if dropped else "")


def print_status(table, out: Console, title: str | None = None) -> None:
    """The history as a Rich table, then the reasons of refused/failed runs (cells are plain text,
    never markup: reasons may hold brackets)."""
    from rich import box
    from rich.text import Text

    from .report import format_duration, format_metric, live_text, verdict_text

    t = Table(title=Text(title or f"edentune cycle: {table.workspace}"), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("round", no_wrap=True)
    t.add_column("persona", no_wrap=True)
    t.add_column("data", justify="right", no_wrap=True)
    t.add_column("trained", justify="right", no_wrap=True)
    t.add_column("from", no_wrap=True)
    for label in SHORT.values():
        t.add_column(label, justify="right", no_wrap=True)
    t.add_column("time", justify="right", no_wrap=True)
    t.add_column("verdict", no_wrap=True)
    t.add_column("live", no_wrap=True)
    for row in table.rows:
        style = "bold green" if row.live_for else "red" if row.status in ("refused", "failed") else None
        started = str(row.metrics.get("started_from") or "–").removeprefix("round ")
        t.add_row(Text(row.round_id), Text(row.persona), Text(_data_cell(row.metrics)), Text(_trained_cell(row.metrics)),
                  Text(started), *(Text(format_metric(k, row.metrics.get(k))) for k in SHORT),
                  Text(format_duration(row.wall_s)), Text(verdict_text(row, reasons=False)), Text(live_text(row, short=True)),
                  style=style)
    out.print(t)
    out.print(Text(LEGEND, style="dim"))
    for row in table.rows:
        if row.reasons:
            out.print(Text(f"{row.round_id} {row.persona}: {verdict_text(row)}"))


def replaced_text(rep: dict) -> str:
    """One line on a tag deployed with ollama.replace: still ours, or undone behind our back."""
    tag, backup = rep["tag"], rep.get("backup")
    return {
        "unchanged": f"replaced: {tag} is what the cycle put there (digest {str(rep.get('digest'))[:12]})",
        "original": f"replaced: WARNING {tag} is the stock model again ({backup}'s digest; an `ollama pull {tag}`?): "
                    "the app no longer gets the fine-tune; deploy again with `edentune cycle rollback DIR --to ROUND`",
        "changed": f"replaced: WARNING {tag} changed since the cycle deployed it (digest {str(rep.get('digest'))[:12]}, recorded "
                   f"{str(rep.get('recorded_digest'))[:12]}; an `ollama pull {tag}`?): the app no longer gets the fine-tune",
        "missing": f"replaced: WARNING {tag} is not in Ollama any more",
    }.get(rep["state"], f"replaced: {tag} not checked ({rep.get('error')})")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The monthly loop: one workspace, one command per month, a registry of every round, rollback to any month.",
                        no_args_is_help=True)
    app.add_typer(group, name="cycle")

    @group.command("init")
    def init(
        directory: Path = typer.Argument(..., help="workspace folder (new or empty)"),
        model: str = typer.Option("qwen2.5-14b", help="base model: qwen2.5-0.5b…32b, llama-3.1-8b, embedded, a hub id or a path"),
        persona: list[str] = typer.Option([], "--persona", help="NAME or NAME=OLLAMA_MODEL, repeatable (default: one persona)"),
        force: bool = typer.Option(False, help="rewrite the cycle.yaml of an existing workspace (the old one is kept as .bak)"),
        host: Optional[str] = typer.Option(None, "--host", help="Ollama URL, written to cycle.yaml's ollama.host (default: $OLLAMA_HOST, then 127.0.0.1:11434)"),
    ) -> None:
        """Create a workspace: a commented cycle.yaml, the registry and the folders."""
        from .workspace import init_workspace

        ws = init_workspace(directory, model=model, personas=_personas(persona), force=force, host=host)
        out = Console()
        # markup=False: paths and model names are the user's text, not Rich markup.
        out.print(f"workspace {ws.dir} (preset {ws.config.run.preset}, base {ws.config.run.model.name_or_path})",
                  markup=False, highlight=False)
        for name in ws.persona_names:
            out.print(f"  persona {name} -> Ollama model {ws.ollama_model(name)}", markup=False, highlight=False)
        out.print(f"edit {ws.config_path}, then each month: edentune cycle run {directory} --new NEW.jsonl", markup=False, highlight=False)

    @group.command("run")
    def run(
        directory: Path = typer.Argument(..., help="workspace folder"),
        new: list[Path] = typer.Option([], "--new", help="this month's conversations (any supported format), repeatable"),
        feedback: list[Path] = typer.Option([], "--feedback", help="thumbs up/down ratings (JSONL), repeatable"),
        round_id: Optional[str] = typer.Option(None, "--round", help="round id (default: this month, YYYY-MM; an unfinished round is continued)"),
        host: Optional[str] = typer.Option(None, "--host", help="Ollama URL for this round (default: the workspace's ollama.host, then $OLLAMA_HOST)"),
        from_eden: bool = typer.Option(False, "--from-eden", help="import Garden of Eden V3's conversations and thumbs since the last round"),
        eden_db: Optional[Path] = typer.Argument(None, help="with --from-eden: the app's database (default: its path on this OS)", show_default=False),
        no_deploy: bool = typer.Option(False, "--no-deploy", help="stop after the gate and the export (no Ollama needed); "
                                       "deploy later with `edentune cycle deploy`"),
    ) -> None:
        """Run one round: ingest, clean, replay, mix, train, evaluate, gate, export, deploy. Rerun to continue after a crash."""
        from .report import status, waiting_rounds
        from .round import run_round

        if eden_db is not None and not from_eden:
            raise EdentuneError(f"{eden_db}: a database is read only with --from-eden", hint=f"edentune cycle run {directory} --from-eden {eden_db}")
        if from_eden:
            from . import eden as eden_import
            from .lock import workspace_lock

            with workspace_lock(directory, "cycle run"):  # the import writes into the round: under the round's lock
                eden = eden_import.prepare(directory, eden_db, round_id, err_console)
                # run_round's own lock is the one held here: the undecorated function (functools.wraps' __wrapped__)
                result = getattr(run_round, "__wrapped__", run_round)(directory, [*new, *eden.new], feedback=[*feedback, *eden.feedback] or None, round_id=eden.round_id,
                                   console=err_console, host=host, deploy=not no_deploy)
                eden_import.record(directory, eden)
        else:
            result = run_round(directory, new, feedback=feedback or None, round_id=round_id, console=err_console, host=host,
                               deploy=not no_deploy)
        table = status(directory)
        table.rows = [r for r in table.rows if r.round_id == result.round_id]
        print_status(table, Console(), title=f"round {result.round_id}: {result.status}")
        if waiting_rounds(table):
            Console().print(f"deploy it where Ollama runs: edentune cycle deploy {directory} --round {result.round_id}",
                            markup=False, highlight=False)

    @group.command("status")
    def status_cmd(
        directory: Path = typer.Argument(..., help="workspace folder"),
        html: Optional[Path] = typer.Option(None, "--html", help="also write a report with per-round trend plots here"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    ) -> None:
        """The history: rounds, data counts, validation loss, key metrics, verdicts, what is live."""
        from ..io import check_outputs
        from .live import replacement_status
        from .report import status, waiting_rounds, write_html
        from .schedule import status_lines as schedule_lines

        if html is not None:  # refused before the registry is opened
            check_outputs([], [html], user_paths=True)
        table = status(directory)
        replaced = replacement_status(directory)  # ollama.replace: is the app's tag still the fine-tune?
        if html is not None:
            write_html(table, html)
        if as_json:
            print(json.dumps(table.to_json() | {"replaced": replaced}, ensure_ascii=False, indent=2, allow_nan=False))
        else:
            out = Console()
            if table.rows:
                print_status(table, out)
            else:
                out.print(f"no rounds yet: edentune cycle run {directory} --new NEW.jsonl", markup=False, highlight=False)
            for persona, lv in table.live.items():
                out.print(f"live: {persona} -> round {lv['round_id']} ({lv['model']}, since {lv['since']})", markup=False, highlight=False)
            for line in schedule_lines(directory):
                out.print(line, markup=False, highlight=False)
            for rep in replaced:
                out.print(replaced_text(rep), markup=False, highlight=False)
            for waiting in waiting_rounds(table):
                out.print(f"accepted, not deployed: round {waiting} (edentune cycle deploy {directory} --round {waiting})",
                          markup=False, highlight=False)
        if html is not None:
            err_console.print(f"wrote {html}", markup=False, highlight=False)

    @group.command("rollback")
    def rollback_cmd(
        directory: Path = typer.Argument(..., help="workspace folder"),
        to: Optional[str] = typer.Option(None, "--to", help="the accepted round to make live (default: the one before the live round)"),
        persona: Optional[str] = typer.Option(None, "--persona", help="only this persona (default: every live persona)"),
        host: Optional[str] = typer.Option(None, "--host", help="Ollama URL (default: the workspace's ollama.host, then $OLLAMA_HOST)"),
        original: bool = typer.Option(False, "--original", help="ollama.replace: put the tag's original model back (kept by the first replace)"),
    ) -> None:
        """Make an earlier accepted round live again in Ollama; recorded in the registry."""
        from .live import restore_original, rollback

        if original:
            rec = restore_original(directory, host=host)
            Console().print(f"{rec['model']} is the original again (restored from {rec['restored_from']}); "
                            "`edentune cycle rollback DIR --to ROUND` deploys a round again", markup=False, highlight=False)
            return

        for rec in rollback(directory, to_round=to, persona=persona, host=host):
            Console().print(f"{rec['persona']}: {rec['model']} is round {rec['round_id']} again (was {rec['from_round'] or '-'})",
                            markup=False, highlight=False)

    @group.command("schedule")
    def schedule_cmd(
        directory: Path = typer.Argument(..., help="workspace folder"),
        day: int = typer.Option(1, "--day", help="day of the month, 1-28"),
        at: str = typer.Option("03:00", "--at", help="local time, HH:MM"),
        db: Optional[Path] = typer.Option(None, "--db", help="Garden of Eden's database (default: the app's path on this OS)"),
        remove: bool = typer.Option(False, "--remove", help="unregister the schedule and delete its files"),
        print_only: bool = typer.Option(False, "--print", help="show the scheduler file(s) instead of installing"),
        platform: Optional[str] = typer.Option(None, "--platform", help="macos, linux or windows (default: this OS); with --print"),
    ) -> None:
        """Run `cycle run --from-eden` every month by itself: a launchd agent, systemd user timer or Task Scheduler task."""
        from .schedule import schedule_command

        for line in schedule_command(directory, day=day, at=at, db=db, remove=remove, print_only=print_only, platform=platform):
            Console().print(line, markup=False, highlight=False, soft_wrap=True)

    @group.command("deploy")
    def deploy_cmd(
        directory: Path = typer.Argument(..., help="workspace folder"),
        round_id: Optional[str] = typer.Option(None, "--round", help="the round to deploy (default: the newest accepted, not deployed)"),
        host: Optional[str] = typer.Option(None, "--host", help="Ollama URL (default: the workspace's ollama.host, then $OLLAMA_HOST)"),
    ) -> None:
        """Deploy a round that `cycle run --no-deploy` accepted: the gate re-checked, then Ollama."""
        from .deploy_later import deploy_round

        for d in deploy_round(directory, round_id, host=host, console=err_console):
            Console().print(f"round {d.round_id} ({d.unit}) live at {d.host}: {', '.join(d.models)}", markup=False, highlight=False)

    @group.command("plan")
    def plan_cmd(
        directory: Path = typer.Argument(..., help="workspace folder"),
        device: str = typer.Option("cuda", help="cuda, apple (a Mac, MLX) or cpu"),
        device_gb: Optional[float] = typer.Option(None, help="GB of the CUDA card, of the Mac's unified memory, or of RAM"),
        ram_gb: Optional[float] = typer.Option(None, help="host RAM in GB beside a CUDA card (default: this machine's)"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    ) -> None:
        """The round's plan: peak memory of each step (train, evaluate, export, smoke check) and disk."""
        from .plan import DEVICES, print_round_plan, round_plan_for
        from .workspace import load_workspace

        if device not in DEVICES:
            raise EdentuneError(f"--device {device!r}: choose cuda, apple or cpu")
        for value, name in ((device_gb, "--device-gb"), (ram_gb, "--ram-gb")):
            if value is not None and not (value == value and 0 < value < float("inf")):
                raise EdentuneError(f"{name}: must be a finite number of GB above 0, not {value:g}")
        ws = load_workspace(directory)
        cfg = ws.round_config("plan", ws.training_units()[0])
        rp = round_plan_for(cfg, device, device_gb, ram_gb=ram_gb, where=ws.dir)
        if as_json:
            print(json.dumps(rp.to_json(), indent=2))
        else:
            print_round_plan(rp, Console())
