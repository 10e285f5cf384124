"""`edentune data ...`: thin Typer wrappers over the data pipeline API; printing lives here only.

Pipeline modules are imported inside the commands so `edentune --help` does not load numpy,
datasketch or transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from edentune.config import CleanConfig, MixConfig
from edentune.data.records import MAX_LINE_BYTES, Report
from edentune.errors import DataError

console = Console()

Files = Annotated[list[Path], typer.Argument(help="Input JSONL files.", show_default=False)]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the kept records here (JSONL).")]
Quarantine = Annotated[Optional[Path], typer.Option(help="Write rejected lines here with their reasons (JSONL).")]
ReportPath = Annotated[Optional[Path], typer.Option("--report", help="Write the full report as JSON.")]
MaxLine = Annotated[int, typer.Option(help="Reject lines longer than this many bytes.")]
ConfigPath = Annotated[Optional[Path], typer.Option("--config", "-c", help="Run config YAML whose data section gives the defaults; options given here win.")]
SHOWN_PROBLEMS = 20


def _default(section: type, key: str) -> str:
    """Help text suffix naming the config key and its default: the config class is the one source."""
    name = {CleanConfig: "clean", MixConfig: "mix"}[section]
    return f" Default: data.{name}.{key} ({section.model_fields[key].get_default(call_default_factory=True)})."


def _section(config: Path | None, name: str, changes: dict[str, object]):
    """data.clean / data.mix from --config (or the defaults) with the options given on the command line."""
    from edentune.config import RunConfig, load_config, with_overrides

    base = getattr((load_config(config) if config else RunConfig()).data, name)
    return with_overrides(base, changes, f"edentune data {name}")


def _printable(text: object) -> str:
    """File names with undecodable bytes are lone surrogates in Python; a UTF-8 terminal cannot
    print those, so they are shown escaped (\\udcXX), as the JSON outputs write them."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _show(report: Report, title: str, more: str = "see --quarantine / --report") -> None:
    table = Table(title=title, show_header=False)
    for name in ("lines", "kept", "repaired", "quarantined", "blank"):
        table.add_row(name, str(getattr(report, name)))
    for label, counts in (("quarantined", report.reasons), ("repaired", report.repairs)):
        for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            table.add_row(f"  {label}: {reason}", str(n))
    console.print(table)
    console.print(report.summary())
    for problem in report.problems[:SHOWN_PROBLEMS]:
        console.print(f"  {_printable(problem)}", markup=False, highlight=False, soft_wrap=True)
    if len(report.problems) > SHOWN_PROBLEMS:
        console.print(_printable(f"  ... {len(report.problems) - SHOWN_PROBLEMS} more ({more})"), markup=False)


def _guard(inputs, outputs) -> None:
    """The outputs named on the command line: never an input, nor a file of a workspace, export or adapter folder."""
    from edentune.io import check_outputs

    check_outputs(inputs, outputs, user_paths=True)
def show_eden_import(res, out: Console | None = None) -> None:
    """The counts of an import from the Garden of Eden database, its ratings and its warnings."""
    out = out or console
    table = Table(title=_printable(f"import-eden {res.db}"), show_header=False)
    for key in ("conversations", "messages", "user_messages", "assistant_messages", "pairs", "orphans",
                "replies_without_user", "screen_context_blocks", "records_written", "quarantined"):
        table.add_row(key.replace("_", " "), str(res.counts.get(key, 0)))
    for reason, n in sorted(res.report.reasons.items(), key=lambda kv: -kv[1]):
        table.add_row(f"  quarantined: {reason}", str(n))
    r = res.ratings
    table.add_row("ratings", f"{r['written']} ({r['up']} up, {r['down']} down; {r['exact']} exact, {r['by_time']} by time)")
    for reason, n in sorted(r["dropped"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"  ratings dropped: {reason}", str(n))
    out.print(table)
    for warning in res.warnings:
        out.print(_printable(f"warning: {warning}"), style="yellow", markup=False, highlight=False)


def _quotas(specs: list[str] | None) -> dict[str, int] | None:
    if not specs:
        return None
    quotas = {}
    for spec in specs:
        name, _, n = spec.partition("=")
        if not name or not n.isdigit():
            raise DataError(f"bad quota {spec!r}", hint="write quotas as category=count, e.g. --quota coding=300")
        quotas[name] = int(n)
    return quotas


def register(root: typer.Typer) -> None:
    """Add the `edentune data ...` group to the root app."""
    group = typer.Typer(help="Validate, convert, clean, split and mix chat datasets; turn thumbs up/down into preference data.",
                        no_args_is_help=True)
    root.add_typer(group, name="data")

    @group.command()
    def validate(files: Files, out: Out = None, quarantine: Quarantine = None, report: ReportPath = None,
                 max_line_bytes: MaxLine = MAX_LINE_BYTES) -> None:
        """Check ChatML records; report every problem as file:line: reason."""
        from edentune.data.validate import validate as run

        _guard(files, [out, quarantine, report])
        _, rep = run(files, write=out, quarantine=quarantine, max_line_bytes=max_line_bytes, report_path=report)
        _show(rep, "validate")

    @group.command()
    def convert(files: Files, out: Out = None, quarantine: Quarantine = None, report: ReportPath = None,
                fmt: Annotated[str, typer.Option("--from", help="alpaca, sharegpt, openai or auto (per record).")] = "auto",
                system: Annotated[Optional[str], typer.Option(help="System prompt for conversations without one.")] = None,
                max_line_bytes: MaxLine = MAX_LINE_BYTES) -> None:
        """Convert alpaca / ShareGPT / OpenAI records to ChatML."""
        from edentune.data.convert import convert as run

        _guard(files, [out, quarantine, report])
        _, rep = run(files, fmt=fmt, system=system, write=out, quarantine=quarantine, max_line_bytes=max_line_bytes,
                     report_path=report)
        _show(rep, f"convert --from {fmt}")

    @group.command()
    def clean(files: Files, out: Out = None, quarantine: Quarantine = None, report: ReportPath = None,
              config: ConfigPath = None,
              scrub: Annotated[Optional[str], typer.Option(help="Secrets/personal data: redact, drop or off." + _default(CleanConfig, "scrub"), show_default=False)] = None,
              near_dup: Annotated[Optional[float], typer.Option(help="Near-duplicate Jaccard threshold in (0, 1]; 1 disables." + _default(CleanConfig, "near_duplicate_threshold"), show_default=False)] = None,
              min_chars: Annotated[Optional[int], typer.Option(help="Minimum characters per conversation." + _default(CleanConfig, "min_chars"), show_default=False)] = None,
              max_chars: Annotated[Optional[int], typer.Option(help="Maximum characters per conversation." + _default(CleanConfig, "max_chars"), show_default=False)] = None,
              max_turn_chars: Annotated[Optional[int], typer.Option(help="Maximum characters per turn." + _default(CleanConfig, "max_turn_chars"), show_default=False)] = None,
              language_check: Annotated[Optional[bool], typer.Option("--language-check/--no-language-check", help="Drop answers in another language than the question." + _default(CleanConfig, "language_mismatch"), show_default=False)] = None,
              max_line_bytes: MaxLine = MAX_LINE_BYTES) -> None:
        """Validate, scrub, and drop duplicates, length outliers, broken turns and language mismatches."""
        from edentune.data.clean import clean as run

        settings = _section(config, "clean", {"scrub": scrub, "near_duplicate_threshold": near_dup, "min_chars": min_chars,
                                              "max_chars": max_chars, "max_turn_chars": max_turn_chars,
                                              "language_mismatch": language_check})
        _guard([*files, config], [out, quarantine, report])
        _, rep = run(files, write=out, quarantine=quarantine, config=settings, report_path=report,
                     max_line_bytes=max_line_bytes)
        _show(rep, "clean")
        if rep.findings:
            console.print(f"scrub: {len(rep.findings)} finding(s) ({settings.scrub}); details in --report")

    @group.command()
    def stats(files: Files,
              tokenizer: Annotated[Optional[str], typer.Option(help="Model whose tokenizer counts tokens: 'embedded', a local folder or .gguf, or a cached hub id.")] = None,
              gguf_file: Annotated[Optional[str], typer.Option(help="GGUF file inside --tokenizer to read it from.")] = None,
              max_seq_len: Annotated[Optional[int], typer.Option(help="Count conversations longer than this.")] = None,
              json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the statistics as JSON.")] = None) -> None:
        """Sizes, token lengths, language and topic mix, duplicates."""
        from edentune.data.stats import stats as run
        from edentune.models import load_tokenizer, resolve_model_dir

        _guard(files, [json_out])  # before loading a tokenizer, which can take a while
        tok = load_tokenizer(resolve_model_dir(tokenizer, gguf_file, for_tokenizer=True), require_chat_template=False) if tokenizer else None
        st = run(files, tokenizer=tok, max_seq_len=max_seq_len, json_path=json_out)
        table = Table(title="dataset", show_header=False)
        table.add_row("conversations", str(st.conversations))
        table.add_row("invalid lines (skipped)", str(st.invalid_lines))
        table.add_row("turns", str(st.turns))
        table.add_row("exact duplicates", str(st.exact_duplicates))
        for name, mix in (("language", st.languages), ("topic", st.topics)):
            for key, n in mix.items():
                table.add_row(f"{name}: {key}", f"{n} ({n / max(st.conversations, 1):.0%})")
        if st.over_max_seq_len is not None:
            table.add_row(f"over {st.max_seq_len} tokens", str(st.over_max_seq_len))
        console.print(table)
        if st.tokens:
            tokens = Table(title="tokens" + (" (with chat template)" if st.chat_template else ""))
            for col in ("role", "count", "p50", "p95", "max"):
                tokens.add_column(col, justify="left" if col == "role" else "right")
            for role, s in st.tokens.items():
                tokens.add_row(role, str(s.count), f"{s.p50:.0f}", f"{s.p95:.0f}", str(s.max))
            console.print(tokens)
            peak = max(c for _, _, c in st.histogram) or 1
            for lo, hi, c in st.histogram:
                console.print(f"{lo:>7}-{hi:<7} {'#' * round(40 * c / peak)} {c}", highlight=False)
        for flag in st.topic_flags:
            console.print(f"[yellow]topic mix: {flag}[/yellow]")

    @group.command()
    def split(files: Files,
              train: Annotated[Path, typer.Option(help="Training output (JSONL).")],
              val: Annotated[Path, typer.Option(help="Validation output (JSONL).")],
              val_fraction: Annotated[float, typer.Option(help="Share of records for validation.")] = 0.05) -> None:
        """Deterministic train/validation split by content hash (stable when data is appended)."""
        from edentune.data.split import split as run

        _guard(files, [train, val])
        n_train, n_val = run(files, train, val, val_fraction)
        console.print(_printable(f"train: {n_train} -> {train}\nvalidation: {n_val} -> {val}"), markup=False)

    @group.command()
    def mix(new: Annotated[list[Path], typer.Option(help="New data (JSONL); repeat for several files.")],
            out: Annotated[Path, typer.Option("--out", "-o", help="Mixed training set (JSONL).")],
            replay: Annotated[Optional[list[Path]], typer.Option(help="Replay buffer (JSONL); repeatable.")] = None,
            config: ConfigPath = None,
            ratio: Annotated[Optional[float], typer.Option(help="Share of new data in (0, 1] (the rest is replay)." + _default(MixConfig, "new_ratio"), show_default=False)] = None,
            quota: Annotated[Optional[list[str]], typer.Option(help="category=count, repeatable; replaces all quotas: the most replay records kept per category (the buffer's composition)." + _default(MixConfig, "quotas"), show_default=False)] = None,
            seed: Annotated[Optional[int], typer.Option(help="Random seed (same seed, same mix)." + _default(MixConfig, "seed"), show_default=False)] = None,
            report: ReportPath = None) -> None:
        """Build a training set: every new record plus replay from the buffer, so that new data is --ratio of it."""
        from edentune.data.mix import mix as run

        settings = _section(config, "mix", {"new_ratio": ratio, "quotas": _quotas(quota), "seed": seed})
        _guard([*new, *(replay or []), config], [out, report])
        rep = run(new, replay or [], out, settings, report_path=report)
        table = Table(title=f"mix (ratio {rep.ratio:.0%} new, seed {rep.seed})")
        for col in ("category", "source", "wanted", "available", "drawn"):
            table.add_column(col)
        for d in rep.draws:
            table.add_row(d.category, d.source, str(d.wanted), str(d.available), str(d.drawn))
        console.print(table)
        realised = f"{rep.realised_ratio:.1%}" if rep.realised_ratio is not None else "n/a"
        console.print(_printable(f"{rep.new} new + {rep.replay} replay (of {rep.replay_wanted} wanted, {rep.replay_available} in the buffer) "
                                 f"= {rep.drawn}: realised ratio {realised} new (configured {rep.ratio:.0%}) -> {out}"), markup=False)
        for short in rep.shortfalls:
            console.print(f"[yellow]short: {short}[/yellow]")

    @group.command()
    def feedback(files: Files,
                 out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for kto.jsonl, dpo.jsonl, quarantine.jsonl and feedback_stats.json.")],
                 max_pairs: Annotated[int, typer.Option(min=0, help="Most DPO pairs taken from one prompt.")] = 4,
                 max_line_bytes: MaxLine = MAX_LINE_BYTES) -> None:
        """Turn thumbs-up/down feedback logs into KTO (unpaired) and DPO (paired) preference datasets."""
        from edentune.data.feedback import prepare_feedback as run

        from edentune.data.feedback import DPO_FILE, KTO_FILE, QUARANTINE_FILE, STATS_FILE

        _guard(files, [out_dir / name for name in (KTO_FILE, DPO_FILE, QUARANTINE_FILE, STATS_FILE)])
        res = run(files, out_dir, max_pairs_per_prompt=max_pairs, max_line_bytes=max_line_bytes)
        _show(res.report, "feedback", more=f"see {res.paths['quarantine']}")
        console.print(f"ratings: {res.desirable} up, {res.undesirable} down; DPO pairs: {res.pairs}\n"
                      f"KTO weights: desirable_weight={res.desirable_weight}, undesirable_weight={res.undesirable_weight}",
                      highlight=False)
        for warning in res.warnings:
            console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
        for name, path in res.paths.items():
            console.print(_printable(f"{name}: {path}"), markup=False, highlight=False, soft_wrap=True)

    @group.command("import-eden")
    def import_eden(
            db: Annotated[Optional[Path], typer.Argument(help="The app's data.db, or the Electron prototype's eden.db. Default: the app's path on this OS.", show_default=False)] = None,
            out: Annotated[Path, typer.Option("--out", "-o", help="Chat records, one per assistant reply (ChatML JSONL).")] = ...,
            feedback_out: Annotated[Optional[Path], typer.Option("--feedback", help="Write the thumbs up/down ratings here (JSONL for `data feedback`).")] = None,
            since: Annotated[Optional[str], typer.Option(help="Only replies after this date or date-time (ISO, local time).")] = None,
            report: ReportPath = None,
            personas: Annotated[Optional[Path], typer.Option(help="Write edentune personas (YAML) from the app's persona settings and onboarding prompt.")] = None,
            quarantine: Quarantine = None,
            screen_context: Annotated[str, typer.Option(help="[Screen Context] blocks in questions: keep (personal data scrubbed), strip, or drop the record.")] = "keep",
            scrub: Annotated[str, typer.Option(help="Secrets/personal data: redact, drop or off.")] = "redact") -> None:
        """Import Garden of Eden V3's conversations, thumbs and persona from its own database (read-only snapshot)."""
        from edentune.data.eden import import_eden as run, parse_since

        res = run(db, out, feedback=feedback_out, report_path=report, personas_path=personas, quarantine=quarantine,
                  since_ms=parse_since(since), screen_context=screen_context, scrub=scrub)
        show_eden_import(res)
        console.print(_printable(f"records: {res.counts['records_written']} -> {out}"), markup=False, highlight=False)
        for label, path in (("ratings", feedback_out), ("personas", personas), ("report", report)):
            if path is not None:
                console.print(_printable(f"{label}: {path}"), markup=False, highlight=False)
