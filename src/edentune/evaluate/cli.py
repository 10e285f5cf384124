"""`edentune eval` and `edentune compare`: thin wrappers over the evaluate API."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)

# No square brackets in help texts: Rich reads them as markup (`[/v1]` crashed `--help`).
MODEL_HELP = "`base`, a PEFT adapter dir, a model dir / .gguf, or an OpenAI-compatible server: http://host:port/v1#model"


def _config(path: Path | None):
    from edentune.config import RunConfig, load_config

    return load_config(path) if path else RunConfig()


def _check_eval_outputs(spec: str, cfg, config: Path | None, suite_name: str | None, validation: list[Path],
                        replay: list[Path], outputs: list[Path], extra_inputs: tuple = ()) -> None:
    """Before any model loads: no output may be an input of the evaluation (the config, suite,
    perplexity sets, a file of the model or adapter scored) or lie in a folder edentune manages."""
    from edentune.errors import EdentuneError
    from edentune.io import check_outputs

    from .suite import resolve_suite_path

    inputs: list = [config, *validation, *replay, *cfg.data.train_files, *cfg.data.validation_files,
                    *cfg.data.replay_files, *extra_inputs]
    try:
        inputs.append(resolve_suite_path(suite_name or cfg.evaluation.suite))
    except EdentuneError:
        pass  # reported by load_suite, with its hint
    model = Path(spec.partition("#")[0]).expanduser() if "://" not in spec else None
    if model is not None and model.is_dir():
        inputs += [p for p in model.iterdir() if p.is_file()]
    elif model is not None and model.is_file():
        inputs.append(model)
    check_outputs(inputs, outputs, user_paths=True)


def _run_eval(spec: str, cfg, suite_name: str | None, validation: list[Path], replay: list[Path], batch_size: int,
              backend_kind: str | None = None):
    from rich.progress import Progress

    from .backends import backend_from_spec
    from .runner import evaluate, perplexity_sets
    from .suite import load_suite

    suite = load_suite(suite_name or cfg.evaluation.suite)  # validated before any model is loaded
    backend = backend_from_spec(spec, cfg, batch_size=batch_size, backend=backend_kind)
    if getattr(backend, "choice", None) is not None:
        console.print(backend.choice.reason, markup=False, highlight=False)
    val, rep = perplexity_sets(cfg, [str(p) for p in validation], [str(p) for p in replay])
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"evaluating {spec}", total=len(suite.cases))
            return evaluate(cfg, backend, suite, validation=val, replay=rep,
                            progress=lambda done, total: progress.update(task, completed=done))
    finally:
        if hasattr(backend, "close"):  # llama.cpp freed now, not by a destructor at interpreter exit (which errors)
            backend.close()


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        model: str = typer.Option(..., "--model", "-m", help="the model to score (required): " + MODEL_HELP),
        config: Path = typer.Option(None, "--config", "-c", help="run config YAML (persona, thresholds, data); defaults if omitted"),
        suite: str = typer.Option(None, help="`default` or a suite .yaml/.jsonl (default: evaluation.suite)"),
        output: Path = typer.Option(Path("eval-results.json"), "--output", "-o", help="results JSON (input of `compare`)"),
        validation: list[Path] = typer.Option([], help="validation conversations (default: the run's validation split)"),
        replay: list[Path] = typer.Option([], help="general-knowledge replay conversations (default: data.replay_files or the bundled sample)"),
        batch_size: int = typer.Option(8, min=1, help="local models: answers generated together"),
        backend: str = typer.Option(None, help="auto, gguf (llama.cpp on the served GGUF files), transformers or http "
                                               "(default: evaluation.backend)"),
    ) -> None:
        """Answer a test suite with MODEL and check language, keywords, code, behaviour, persona, perplexity, speed."""
        from .runner import EvalResult

        cfg = _config(config)
        _check_eval_outputs(model, cfg, config, suite, validation, replay, [output])
        result: EvalResult = _run_eval(model, cfg, suite, validation, replay, batch_size, backend)
        result.save(output)
        m = result.metrics
        for key, value in m.items():
            if value is not None and key != "n":
                console.print(f"  {key:24} {value:.3f}")
        if any(c.code_status == "not_run" for c in result.cases):
            from .sandbox import why_no_sandbox

            why = next(c.code_error for c in result.cases if c.code_status == "not_run")
            why += f": {why_no_sandbox()}" if "(no sandbox" in why else ""
            console.print(f"  {'code_pass_rate':24} n/a: {why} (docs/security.md, evaluation.run_code)", markup=False, highlight=False)
        failed = sum(not c.passed for c in result.cases)
        scored = f" (backend {result.backend})" if result.backend else ""
        console.print(f"wrote {output}: {len(result.cases) - failed}/{len(result.cases)} cases passed{scored}", markup=False, highlight=False)

    @app.command("compare")
    def compare_command(
        base: str = typer.Option(..., help="results JSON from `edentune eval`, or a model spec: " + MODEL_HELP),
        candidate: str = typer.Option(..., help="results JSON or model spec of the fine-tuned model"),
        config: Path = typer.Option(None, "--config", "-c", help="run config YAML (tolerance, max_forgetting, persona)"),
        suite: str = typer.Option(None, help="suite for model specs (default: evaluation.suite)"),
        metrics_jsonl: Path = typer.Option(None, help="a run's metrics.jsonl: adds training curves"),
        out_dir: Path = typer.Option(Path("eval-report"), help="where report.md, report.html and comparison.json go"),
        gate: bool = typer.Option(False, help="exit with status 1 unless the verdict is ship"),
        allow_different_backends: bool = typer.Option(False, "--allow-different-backends", rich_help_panel="Scoring", help="compare results scored on different backends or base "
                                                                  "GGUF files (both must record theirs)"),
    ) -> None:
        """Base vs fine-tuned report (Markdown, HTML, JSON verdict) and the deploy gate."""
        from rich.markup import escape

        from edentune.errors import EdentuneError

        from .compare import comparability, compare
        from .report import rich_table, write_reports
        from .runner import EvalResult

        cfg = _config(config)
        same = base == candidate or (Path(base).is_file() and Path(candidate).is_file() and Path(base).samefile(candidate))
        if same:
            raise EdentuneError(f"--base {base} and --candidate {candidate} are the same results: a comparison with itself says nothing",
                                hint="compare the base model's results with the fine-tuned model's")
        reports = [out_dir / "report.md", out_dir / "report.html", out_dir / "comparison.json"]
        evaluated = [out_dir / f"{name}-results.json" for name, spec in (("base", base), ("candidate", candidate))
                     if not spec.endswith(".json")]
        for spec in (base, candidate):
            _check_eval_outputs(spec, cfg, config, suite, [], [], [*reports, *evaluated], extra_inputs=(metrics_jsonl,))

        def result(spec: str, name: str) -> EvalResult:
            if spec.endswith(".json"):
                return EvalResult.load(spec)
            evaluated = _run_eval(spec, cfg, suite, [], [], 8)
            evaluated.save(out_dir / f"{name}-results.json")
            return evaluated

        base_result, cand_result = result(base, "base"), result(candidate, "candidate")
        if base_result.results_sha256 is not None and base_result.results_sha256 == cand_result.results_sha256:
            raise EdentuneError(f"--base {base} and --candidate {candidate} are the same results (identical files)",
                                hint="compare the base model's results with the fine-tuned model's")
        problems = comparability(base_result, cand_result, allow_different_backends)
        if problems:  # a user mistake, not a verdict: no report that could be taken for one
            raise EdentuneError(f"cannot compare {base} with {candidate}: " + "; ".join(problems),
                                hint="evaluate both with the same suite, config and backend: `edentune eval -m MODEL -c CONFIG --suite SUITE`")
        comparison = compare(base_result, cand_result, cfg, metrics_jsonl, allow_different_backends=allow_different_backends)
        write_reports(comparison, out_dir, base=base_result, candidate=cand_result)
        Console().print(rich_table(comparison))
        for reason in comparison.reasons:
            console.print(f"[red]not shipping:[/] {escape(reason)}", highlight=False)
        console.print(f"wrote {out_dir}/report.md, report.html, comparison.json", markup=False, highlight=False)
        if gate and not comparison.ship:
            raise typer.Exit(1)
