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
SHORT = {"val_loss": "val loss", "korean_consistency": "KO", "persona_adherence": "rules", "forgetting": "forget"}
LEGEND = ("data: new+replay training records · KO: Korean consistency · rules: persona adherence · "
          "forget: forgetting (perplexity increase on general data) · ● live now")


def _data_cell(metrics: dict) -> str:
    from .report import format_metric

    new, replay = metrics.get("new_records"), metrics.get("replay_records")
    if new is not None and replay is not None:
        return f"{format_metric('new_records', new)}+{format_metric('replay_records', replay)}"
    return format_metric("train_records", metrics.get("train_records"))


def print_status(table, out: Console, title: str | None = None) -> None:
    """The history as a Rich table, then the reasons of refused/failed runs (cells are plain text,
    never markup: reasons may hold brackets)."""
    from rich import box
    from rich.text import Text

    from .report import format_metric, live_text, verdict_text

    t = Table(title=Text(title or f"edentune cycle: {table.workspace}"), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("round", no_wrap=True)
    t.add_column("persona", no_wrap=True)
    t.add_column("data", justify="right", no_wrap=True)
    for label in SHORT.values():
        t.add_column(label, justify="right", no_wrap=True)
    t.add_column("verdict", no_wrap=True)
    t.add_column("live", no_wrap=True)
    for row in table.rows:
        style = "bold green" if row.live_for else "red" if row.status in ("refused", "failed") else None
        t.add_row(Text(row.round_id), Text(row.persona), Text(_data_cell(row.metrics)),
                  *(Text(format_metric(k, row.metrics.get(k))) for k in SHORT),
                  Text(verdict_text(row, reasons=False)), Text(live_text(row, short=True)), style=style)
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
    ) -> None:
        """Create a workspace: a commented cycle.yaml, the registry and the folders."""
        from .workspace import init_workspace

        ws = init_workspace(directory, model=model, personas=_personas(persona), force=force)
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
        new: list[Path] = typer.Option(..., "--new", help="this month's conversations (any supported format), repeatable"),
        feedback: list[Path] = typer.Option([], "--feedback", help="thumbs up/down ratings (JSONL), repeatable"),
        round_id: Optional[str] = typer.Option(None, "--round", help="round id (default: this month, YYYY-MM; an unfinished round is continued)"),
    ) -> None:
        """Run one round: ingest, clean, replay, mix, train, evaluate, gate, export, deploy. Rerun to continue after a crash."""
        from .report import status
        from .round import run_round

        result = run_round(directory, new, feedback=feedback or None, round_id=round_id, console=err_console)
        table = status(directory)
        table.rows = [r for r in table.rows if r.round_id == result.round_id]
        print_status(table, Console(), title=f"round {result.round_id}: {result.status}")

    @group.command("status")
    def status_cmd(
        directory: Path = typer.Argument(..., help="workspace folder"),
        html: Optional[Path] = typer.Option(None, "--html", help="also write a report with per-round trend plots here"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    ) -> None:
        """The history: rounds, data counts, validation loss, key metrics, verdicts, what is live."""
        from .report import status, write_html

        from .live import replacement_status

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
            for rep in replaced:
                out.print(replaced_text(rep), markup=False, highlight=False)
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
