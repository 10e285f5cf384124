"""Evaluation: test suites, rule checks, sandboxed code runs, perplexity, base-vs-fine-tuned reports.

Quickstart:

    from edentune.evaluate import backend_from_spec, compare, evaluate, load_suite, rich_table, write_reports
    suite = load_suite(cfg.evaluation.suite)
    base = evaluate(cfg, backend_from_spec("base", cfg), suite)
    cand = evaluate(cfg, backend_from_spec("runs/eden/adapter", cfg), suite)
    comparison = compare(base, cand, cfg, metrics_jsonl="runs/eden/metrics.jsonl")  # writes nothing
    write_reports(comparison, "runs/eden/eval", base=base, candidate=cand)  # comparison.json, report.md, report.html
    rich.print(rich_table(comparison)); comparison.ship
"""

from .backends import Backend, Generation, HttpBackend, LocalBackend, backend_from_spec
from .compare import Comparison, comparability, compare
from .report import render_html, render_markdown, rich_table, summary, write_reports
from .runner import CaseResult, EvalResult, evaluate, perplexity_sets
from .sandbox import Limits, RunResult, run_python
from .suite import Case, Suite, load_suite

__all__ = [
    "Backend", "Case", "CaseResult", "Comparison", "EvalResult", "Generation", "HttpBackend", "Limits", "LocalBackend",
    "RunResult", "Suite", "backend_from_spec", "comparability", "compare", "evaluate", "load_suite", "perplexity_sets", "render_html",
    "render_markdown", "rich_table", "run_python", "summary", "write_reports",
]
