"""Render a `Comparison`: Markdown, a self-contained HTML page (plots as base64 PNG), a strict-JSON
summary with the verdicts, the ship decision and the hashes `deploy --gate` re-checks, and a Rich
table for the terminal. With the two `EvalResult`s, the pages also show every case's two answers side
by side with the checks each passed or failed, category by category."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from edentune.io import atomic_outputs

from .compare import Comparison, MetricRow
from .runner import CaseResult, EvalResult

# "same": no change beyond the tolerance, or (paired tests) none beyond noise: cannot tell.
VERDICT_MARK = {"better": "▲ better", "worse": "▼ worse", "same": "≈ cannot tell", "n/a": "n/a", "invalid": "✖ invalid"}


def verdict_cell(r: MetricRow) -> str:
    """The verdict with the paired test behind it (case counts, p-value, flipped cases), if any."""
    return VERDICT_MARK[r.verdict] + (f" ({r.detail})" if r.detail else "")


def fmt(row_kind: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    if not math.isfinite(v):
        return str(v)  # nan / inf: shown as what it is
    if row_kind in ("rate", "forgetting"):
        return f"{100 * v:.1f}%"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


# -- cases side by side -----------------------------------------------------------------------
def case_checks(r: CaseResult) -> list[tuple[str, bool | None, str]]:
    """(check, passed, detail) for every check that applied to one answer; passed is None for a
    check that could not be made (code not run without a sandbox)."""
    def failure(prefix: str) -> str:
        return "; ".join(f.removeprefix(prefix).strip() for f in r.failures if f.startswith(prefix))

    checks = []
    if r.language_ok is not None:
        checks.append(("language", r.language_ok, f"expected {r.expected_language}, got {r.detected_language}"))
    if r.keywords_ok is not None:
        checks.append(("keywords", r.keywords_ok, f"missing {', '.join(r.keywords_missing)}" if not r.keywords_ok
                       else f"found {', '.join(r.keywords_found)}"))
    if r.code_status is not None:
        checks.append(("code runs", None if r.code_status == "not_run" else r.code_status == "pass", r.code_status + (f": {r.code_error.splitlines()[0][:200]}" if r.code_error.strip() else "")))
    if r.behavior is not None:
        checks.append((r.behavior, r.behavior_ok, failure(f"{r.behavior}:")))
    checks.append(("persona", r.persona_ok, failure("persona:")))
    return checks


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else "✓" if ok else "✗"


def case_pairs(base: EvalResult, candidate: EvalResult) -> dict[str, list[tuple[CaseResult | None, CaseResult | None]]]:
    """Category -> (base answer, fine-tuned answer) per case id, in suite order."""
    cand_by_id = {r.id: r for r in candidate.cases}
    base_ids = {r.id for r in base.cases}
    pairs = [(r, cand_by_id.get(r.id)) for r in base.cases] + [(None, r) for r in candidate.cases if r.id not in base_ids]
    grouped: dict[str, list] = {}
    for pair in pairs:
        grouped.setdefault((pair[0] or pair[1]).category, []).append(pair)
    return grouped


def curve_numbers(curves: dict[str, list[list[float]]]) -> list[tuple[str, str, str, str]]:
    """(series, first, last, best) with steps, beside the training-curve plot."""
    def at(point: list[float]) -> str:
        return f"{point[1]:.4g} (step {point[0]:g})"

    best = {"learning_rate": max, "grad_norm": max}  # the peak; for losses the minimum
    return [(name, at(points[0]), at(points[-1]), at(best.get(name, min)(points, key=lambda p: p[1])))
            for name, points in curves.items() if points]


# -- Markdown ---------------------------------------------------------------------------------
def _md_rows(rows: list[MetricRow]) -> list[str]:
    return [f"| {r.label}{'' if r.gating else ' *'} | {fmt(r.kind, r.base)} | {fmt(r.kind, r.candidate)} | {_md_cell(verdict_cell(r))} |"
            for r in rows]


def _md_cell(text: str) -> str:
    # Answers are model output: escaped so that a table cell cannot end early or carry markup.
    return html.escape(text).replace("|", "\\|").replace("\n", "<br>") or "_(empty)_"


def _md_answer(r: CaseResult | None) -> str:
    if r is None:
        return "_not answered_"
    checks = "<br>".join(_md_cell(f"{_mark(ok)} {name}{': ' + detail if detail else ''}") for name, ok, detail in case_checks(r))
    return f"{_md_cell(r.answer)}<br><br>{checks}"


def render_markdown(c: Comparison, base: EvalResult | None = None, candidate: EvalResult | None = None) -> str:
    out = [
        "# Base vs Fine-tuned", "",
        f"- Base: `{c.base_model}`", f"- Fine-tuned: `{c.candidate_model}`",
        f"- **Ship: {'yes' if c.ship else 'no'}**" + ("" if c.ship else " — " + "; ".join(c.reasons)),
        f"- Tolerance {c.tolerance:g} (rates, relative perplexity); max forgetting {100 * c.max_forgetting:g}%",
        f"- Suite sha256: `{c.suite_sha256 or 'unknown'}`", "",
        "| Metric | Base | Fine-tuned | Verdict |", "|---|---:|---:|---|", *_md_rows(c.metrics), "",
        "\\* informational, not part of the deploy gate.", "",
    ]
    ko = c.korean_consistency
    if ko.get("value") is not None:
        out += [f"Korean language consistency: {100 * ko['value']:.1f}% (target > {100 * ko['target']:g}%: "
                f"{'met' if ko['met'] else 'not met'})", ""]
    numbers = curve_numbers(c.curves)
    if numbers:
        out += ["## Training curves", "", "| Series | First | Last | Best |", "|---|---:|---:|---:|"]
        out += [f"| {name} | {first} | {last} | {best} |" for name, first, last, best in numbers]
        out.append("")
    out += ["## Language mixing by expected language", "", "| Language | Base | Fine-tuned | Verdict |", "|---|---:|---:|---|"]
    out += [f"| {lang} | {fmt(r.kind, r.base)} | {fmt(r.kind, r.candidate)} | {VERDICT_MARK[r.verdict]} |"
            for lang, (r,) in c.by_language.items()]
    out += ["", "## By category", ""]
    pairs = case_pairs(base, candidate) if base is not None and candidate is not None else {}
    for cat in sorted(set(c.by_category) | set(pairs)):
        out += [f"### {cat}", "", "| Metric | Base | Fine-tuned | Verdict |", "|---|---:|---:|---|", *_md_rows(c.by_category.get(cat, [])), ""]
        if cat in pairs:
            out += ["| Case | Base | Fine-tuned |", "|---|---|---|"]
            out += [f"| **{_md_cell((b or f).id)}**<br>{_md_cell((b or f).question)} | {_md_answer(b)} | {_md_answer(f)} |" for b, f in pairs[cat]]
            out.append("")
    for side, title in (("candidate", "Fine-tuned"), ("base", "Base")):
        cases = c.failing[side]
        out += [f"## Failing cases: {title} ({len(cases)})", ""]
        out += [f"- **{f.id}** ({f.category}): {'; '.join(f.failures)}" for f in cases] or ["none"]
        out.append("")
    return "\n".join(out)


# -- plots ------------------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bars(rows: list[MetricRow], title: str, percent: bool) -> str | None:
    rows = [r for r in rows if r.base is not None or r.candidate is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100 if percent else 1
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.55 * len(rows)))
    ys = range(len(rows))
    def bar(v: float | None) -> float:
        return scale * v if v is not None and math.isfinite(v) else 0.0

    ax.barh([y + 0.2 for y in ys], [bar(r.base) for r in rows], 0.4, label="base", color="#9aa5b1")
    ax.barh([y - 0.2 for y in ys], [bar(r.candidate) for r in rows], 0.4, label="fine-tuned", color="#2f6fde")
    ax.set_yticks(list(ys), [r.label for r in rows])
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel("%" if percent else "")
    ax.legend(loc="lower right")
    return _png(fig)


def _curves_plot(curves: dict[str, list[list[float]]]) -> str | None:
    panels = [names for names in (("loss", "eval_loss"), ("learning_rate",), ("grad_norm",)) if any(n in curves for n in names)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False, layout="constrained")
    for ax, names in zip(axes[0], panels):
        for name in names:
            if name in curves:
                xs, ys = zip(*curves[name])
                ax.plot(xs, ys, marker="o" if name == "eval_loss" else None, label=name)
        ax.set_xlabel("step")
        ax.set_title(" / ".join(n for n in names if n in curves))
        ax.legend()
    return _png(fig)


def plots(c: Comparison) -> dict[str, str]:
    """Title -> base64 PNG."""
    found = {
        "Training curves": _curves_plot(c.curves),
        "Quality metrics": _bars([r for r in c.metrics if r.kind == "rate"], "Base vs fine-tuned", percent=True),
        "Perplexity": _bars([r for r in c.metrics if r.kind == "perplexity"], "Perplexity (lower is better)", percent=False),
        "Response time": _bars([r for r in c.metrics if r.kind == "timing"], "Response time and throughput", percent=False),
    }
    return {title: png for title, png in found.items() if png}


# -- HTML -------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,-apple-system,'Noto Sans KR',sans-serif;margin:2rem auto;max-width:1200px;color:#1f2933}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem}td,th{border:1px solid #d9e2ec;padding:4px 10px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}.better{color:#1f7a3a;font-weight:600}
.worse,.invalid{color:#b42318;font-weight:600}
.ship{font-size:1.3rem;padding:0.6rem 1rem;border-radius:6px;display:inline-block}.yes{background:#e3f9e5}.no{background:#ffe3e3}
img{max-width:100%;display:block;margin:0.5rem 0 1.5rem}details{margin:0.3rem 0}pre{white-space:pre-wrap;background:#f5f7fa;padding:0.5rem;margin:0}
.side{display:flex;gap:1.5rem;align-items:flex-start;flex-wrap:wrap}.side img{max-width:70%}
table.cases{table-layout:fixed;width:100%}table.cases td:first-child{width:18%}
ul.checks{list-style:none;padding:0;margin:0.4rem 0 0}.pass{color:#1f7a3a}.fail{color:#b42318}"""


def _html_table(rows: list[MetricRow]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r.label)}{'' if r.gating else ' *'}</td><td class=num>{fmt(r.kind, r.base)}</td>"
        f"<td class=num>{fmt(r.kind, r.candidate)}</td><td class={r.verdict.replace('/', '')}>{html.escape(verdict_cell(r))}</td></tr>"
        for r in rows)
    return f"<table><tr><th>Metric</th><th>Base</th><th>Fine-tuned</th><th>Verdict</th></tr>{body}</table>"


def _html_answer(r: CaseResult | None) -> str:
    e = html.escape
    if r is None:
        return "<td><i>not answered</i></td>"
    checks = "".join(f"<li class={'na' if ok is None else 'pass' if ok else 'fail'}>{_mark(ok)} {e(name)}{': ' + e(detail) if detail else ''}</li>"
                     for name, ok, detail in case_checks(r))
    return f"<td class=answer><pre>{e(r.answer)}</pre><ul class=checks>{checks}</ul></td>"


def _html_cases(pairs: list[tuple[CaseResult | None, CaseResult | None]]) -> str:
    rows = "".join(f"<tr><td><b>{html.escape((b or f).id)}</b><br>{html.escape((b or f).question)}</td>{_html_answer(b)}{_html_answer(f)}</tr>"
                   for b, f in pairs)
    return f"<table class=cases><tr><th>Case</th><th>Base</th><th>Fine-tuned</th></tr>{rows}</table>"


def render_html(c: Comparison, base: EvalResult | None = None, candidate: EvalResult | None = None) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>edentune: Base vs Fine-tuned</title>",
        f"<style>{CSS}</style></head><body><h1>Base vs Fine-tuned</h1>",
        f"<p>Base: <code>{e(c.base_model)}</code><br>Fine-tuned: <code>{e(c.candidate_model)}</code><br>"
        f"Suite sha256: <code>{e(c.suite_sha256 or 'unknown')}</code></p>",
        f"<p class='ship {'yes' if c.ship else 'no'}'>Ship: <b>{'yes' if c.ship else 'no'}</b></p>",
        "".join(f"<p>{e(r)}</p>" for r in c.reasons),
        _html_table(c.metrics), "<p>* informational, not part of the deploy gate.</p>",
    ]
    for title, png in plots(c).items():
        img = f"<img alt='{e(title)}' src='data:image/png;base64,{png}'>"
        numbers = curve_numbers(c.curves) if title == "Training curves" else []
        if numbers:  # the numbers beside the plot: what a reader quotes
            rows = "".join(f"<tr><td>{e(n)}</td><td class=num>{first}</td><td class=num>{last}</td><td class=num>{best}</td></tr>"
                           for n, first, last, best in numbers)
            img = f"<div class=side>{img}<table><tr><th>Series</th><th>First</th><th>Last</th><th>Best</th></tr>{rows}</table></div>"
        parts.append(f"<h2>{e(title)}</h2>{img}")
    parts.append("<h2>Language mixing by expected language</h2>")
    parts.append(_html_table([r.model_copy(update={"label": lang}) for lang, (r,) in c.by_language.items()]))
    parts.append("<h2>By category</h2>")
    pairs = case_pairs(base, candidate) if base is not None and candidate is not None else {}
    for cat in sorted(set(c.by_category) | set(pairs)):
        parts.append(f"<h3>{e(cat)}</h3>{_html_table(c.by_category.get(cat, []))}")
        if cat in pairs:
            parts.append(_html_cases(pairs[cat]))
    for side, title in (("candidate", "Fine-tuned"), ("base", "Base")):
        parts.append(f"<h2>Failing cases: {title} ({len(c.failing[side])})</h2>")
        parts += [f"<details><summary><b>{e(f.id)}</b> ({e(f.category)}): {e('; '.join(f.failures))}</summary>"
                  f"<pre>{e(f.answer)}</pre></details>" for f in c.failing[side]]
    parts.append("</body></html>")
    return "\n".join(parts)


def _strict(value):
    """Non-finite floats -> None, so that the summary is strict JSON (RFC 8259 has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def summary(c: Comparison) -> dict:
    """Machine-readable verdict for a deploy gate (strict JSON: a non-finite number is null)."""
    return _strict({
        "ship": c.ship, "reasons": c.reasons, "base": c.base_model, "candidate": c.candidate_model,
        "candidate_adapter_sha256": c.candidate_adapter_sha256,
        "suite_sha256": c.suite_sha256,
        "base_results_path": c.base_results_path, "base_results_sha256": c.base_results_sha256,
        "candidate_results_path": c.candidate_results_path, "candidate_results_sha256": c.candidate_results_sha256,
        "settings": c.settings, "backends": c.backends, "candidate_artifacts": c.candidate_artifacts,
        "tolerance": c.tolerance, "max_forgetting": c.max_forgetting, "korean_consistency": c.korean_consistency,
        "metrics": {r.key: {"base": r.base, "candidate": r.candidate, "verdict": r.verdict, "gating": r.gating,
                            **({"detail": r.detail, "p_value": r.p_value, "interval": r.interval, "flipped": r.flipped} if r.detail else {})}
                    for r in c.metrics},
        "language_mixing_by_language": {lang: {"base": r.base, "candidate": r.candidate, "verdict": r.verdict}
                                        for lang, (r,) in c.by_language.items()},
        "by_category": {cat: {r.key: {"base": r.base, "candidate": r.candidate, "verdict": r.verdict} for r in rows}
                        for cat, rows in c.by_category.items()},
        "failing": {side: [f.id for f in cases] for side, cases in c.failing.items()},
    })


REPORT_FILES = {"json": "comparison.json", "markdown": "report.md", "html": "report.html"}


def write_reports(c: Comparison, out_dir: str | Path, *, base: EvalResult | None = None,
                  candidate: EvalResult | None = None) -> dict[str, Path]:
    """Write comparison.json, report.md and report.html into `out_dir` (created if needed); returns
    their paths by kind. `base` / `candidate` (the results compared) add every case's two answers
    side by side. All three files appear or none does; a report path that is one of the results
    files compared is refused before anything is rendered."""
    paths = {kind: Path(out_dir) / name for kind, name in REPORT_FILES.items()}
    inputs = [c.base_results_path, c.candidate_results_path]
    with atomic_outputs(inputs=inputs, outputs=paths.values()) as txn:
        txn.write_text(paths["json"], json.dumps(summary(c), ensure_ascii=False, indent=2, allow_nan=False) + "\n")
        txn.write_text(paths["markdown"], render_markdown(c, base, candidate))
        txn.write_text(paths["html"], render_html(c, base, candidate))
    return paths


# -- terminal ---------------------------------------------------------------------------------
def rich_table(c: Comparison):
    """The comparison as a Rich table (print it with a rich Console)."""
    from rich.markup import escape
    from rich.table import Table

    style = {"better": "green", "worse": "bold red", "same": "", "n/a": "dim", "invalid": "bold red"}
    table = Table(title=f"Base vs Fine-tuned — ship: {'yes' if c.ship else 'NO'}")
    for col, justify in (("Metric", "left"), ("Base", "right"), ("Fine-tuned", "right"), ("Verdict", "left")):
        table.add_column(col, justify=justify)
    for r in c.metrics:
        table.add_row(r.label + ("" if r.gating else " *"), fmt(r.kind, r.base), fmt(r.kind, r.candidate),
                      f"[{style[r.verdict]}]{escape(verdict_cell(r))}[/]" if style[r.verdict] else escape(verdict_cell(r)))
    return table
