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

        _, rep = run(files, write=out, quarantine=quarantine, max_line_bytes=max_line_bytes, report_path=report)
        _show(rep, "validate")

    @group.command()
    def convert(files: Files, out: Out = None, quarantine: Quarantine = None, report: ReportPath = None,
                fmt: Annotated[str, typer.Option("--from", help="alpaca, sharegpt, openai or auto (per record).")] = "auto",
                system: Annotated[Optional[str], typer.Option(help="System prompt for conversations without one.")] = None,
                max_line_bytes: MaxLine = MAX_LINE_BYTES) -> None:
        """Convert alpaca / ShareGPT / OpenAI records to ChatML."""
        from edentune.data.convert import convert as run

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
        from edentune.io import check_outputs
        from edentune.models import load_tokenizer, resolve_model_dir

        check_outputs(files, [json_out])  # before loading a tokenizer, which can take a while
        tok = load_tokenizer(resolve_model_dir(tokenizer, gguf_file), require_chat_template=False) if tokenizer else None
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

        n_train, n_val = run(files, train, val, val_fraction)
        console.print(_printable(f"train: {n_train} -> {train}\nvalidation: {n_val} -> {val}"), markup=False)

    @group.command()
    def mix(new: Annotated[list[Path], typer.Option(help="New data (JSONL); repeat for several files.")],
            out: Annotated[Path, typer.Option("--out", "-o", help="Mixed training set (JSONL).")],
            replay: Annotated[Optional[list[Path]], typer.Option(help="Replay buffer (JSONL); repeatable.")] = None,
            config: ConfigPath = None,
            ratio: Annotated[Optional[float], typer.Option(help="Share of new data in (0, 1] (the rest is replay)." + _default(MixConfig, "new_ratio"), show_default=False)] = None,
            quota: Annotated[Optional[list[str]], typer.Option(help="category=count, repeatable; replaces all quotas." + _default(MixConfig, "quotas"), show_default=False)] = None,
            seed: Annotated[Optional[int], typer.Option(help="Random seed (same seed, same mix)." + _default(MixConfig, "seed"), show_default=False)] = None,
            report: ReportPath = None) -> None:
        """Build a training set from new data and a replay buffer at a ratio, with per-category quotas."""
        from edentune.data.mix import mix as run

        settings = _section(config, "mix", {"new_ratio": ratio, "quotas": _quotas(quota), "seed": seed})
        rep = run(new, replay or [], out, settings, report_path=report)
        table = Table(title=f"mix (ratio {rep.ratio:.0%} new, seed {rep.seed})")
        for col in ("category", "source", "wanted", "available", "drawn"):
            table.add_column(col)
        for d in rep.draws:
            table.add_row(d.category, d.source, str(d.wanted), str(d.available), str(d.drawn))
        console.print(table)
        console.print(_printable(f"drew {rep.drawn} of {rep.wanted} -> {out}"), markup=False)
        for short in rep.shortfalls:
            console.print(f"[yellow]short: {short}[/yellow]")

    @group.command()
    def feedback(files: Files,
                 out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for kto.jsonl, dpo.jsonl, quarantine.jsonl and feedback_stats.json.")],
                 max_pairs: Annotated[int, typer.Option(min=0, help="Most DPO pairs taken from one prompt.")] = 4,
                 max_line_bytes: MaxLine = MAX_LINE_BYTES) -> None:
        """Turn thumbs-up/down feedback logs into KTO (unpaired) and DPO (paired) preference datasets."""
        from edentune.data.feedback import prepare_feedback as run

        res = run(files, out_dir, max_pairs_per_prompt=max_pairs, max_line_bytes=max_line_bytes)
        _show(res.report, "feedback", more=f"see {res.paths['quarantine']}")
        console.print(f"ratings: {res.desirable} up, {res.undesirable} down; DPO pairs: {res.pairs}\n"
                      f"KTO weights: desirable_weight={res.desirable_weight}, undesirable_weight={res.undesirable_weight}",
                      highlight=False)
        for warning in res.warnings:
            console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
        for name, path in res.paths.items():
            console.print(_printable(f"{name}: {path}"), markup=False, highlight=False, soft_wrap=True)
