"""Render a `Comparison`: Markdown, a self-contained HTML page (plots as base64 PNG), a JSON
summary with the verdicts and the ship decision, and a Rich table for the terminal."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from edentune.io import write_json_atomic, write_text_atomic

from .compare import Comparison, MetricRow

CURVE_KEYS = {"loss": "loss", "train_loss": "loss", "eval_loss": "eval_loss",
              "learning_rate": "learning_rate", "lr": "learning_rate", "grad_norm": "grad_norm"}
VERDICT_MARK = {"better": "▲ better", "worse": "▼ worse", "same": "= same", "n/a": "n/a"}


def read_training_curves(path: str | Path) -> dict[str, list[list[float]]]:
    """Series from a run's metrics.jsonl: tolerant of blank or broken lines, missing keys, NaN and
    either `step` or `global_step` (the line number when neither is there)."""
    curves: dict[str, list[list[float]]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or rec.get("event") in ("summary", "end", "final_eval"):
            continue  # run totals and the best checkpoint's re-evaluation are not points on the curve
        step = rec.get("step", rec.get("global_step", n))
        for key, name in CURVE_KEYS.items():
            value = rec.get(key)
            if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
                curves.setdefault(name, []).append([float(step), float(value)])
    return curves


def fmt(row_kind: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    if row_kind in ("rate", "forgetting"):
        return f"{100 * v:.1f}%"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


# -- Markdown ---------------------------------------------------------------------------------
def _md_rows(rows: list[MetricRow]) -> list[str]:
    return [f"| {r.label}{'' if r.gating else ' *'} | {fmt(r.kind, r.base)} | {fmt(r.kind, r.candidate)} | {VERDICT_MARK[r.verdict]} |"
            for r in rows]


def render_markdown(c: Comparison) -> str:
    out = [
        "# Base vs Fine-tuned", "",
        f"- Base: `{c.base_model}`", f"- Fine-tuned: `{c.candidate_model}`",
        f"- **Ship: {'yes' if c.ship else 'no'}**" + ("" if c.ship else " — " + "; ".join(c.reasons)),
        f"- Tolerance {c.tolerance:g} (rates, relative perplexity); max forgetting {100 * c.max_forgetting:g}%", "",
        "| Metric | Base | Fine-tuned | Verdict |", "|---|---:|---:|---|", *_md_rows(c.metrics), "",
        "\\* informational, not part of the deploy gate.", "",
    ]
    ko = c.korean_consistency
    if ko.get("value") is not None:
        out += [f"Korean language consistency: {100 * ko['value']:.1f}% (target > {100 * ko['target']:g}%: "
                f"{'met' if ko['met'] else 'not met'})", ""]
    out += ["## Language mixing by expected language", "", "| Language | Base | Fine-tuned | Verdict |", "|---|---:|---:|---|"]
    out += [f"| {lang} | {fmt(r.kind, r.base)} | {fmt(r.kind, r.candidate)} | {VERDICT_MARK[r.verdict]} |"
            for lang, (r,) in c.by_language.items()]
    out += ["", "## By category", ""]
    for cat, rows in c.by_category.items():
        out += [f"### {cat}", "", "| Metric | Base | Fine-tuned | Verdict |", "|---|---:|---:|---|", *_md_rows(rows), ""]
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
    ax.barh([y + 0.2 for y in ys], [scale * (r.base or 0) for r in rows], 0.4, label="base", color="#9aa5b1")
    ax.barh([y - 0.2 for y in ys], [scale * (r.candidate or 0) for r in rows], 0.4, label="fine-tuned", color="#2f6fde")
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
CSS = """body{font-family:system-ui,-apple-system,'Noto Sans KR',sans-serif;margin:2rem auto;max-width:1100px;color:#1f2933}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem}td,th{border:1px solid #d9e2ec;padding:4px 10px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}.better{color:#1f7a3a;font-weight:600}.worse{color:#b42318;font-weight:600}
.ship{font-size:1.3rem;padding:0.6rem 1rem;border-radius:6px;display:inline-block}.yes{background:#e3f9e5}.no{background:#ffe3e3}
img{max-width:100%;display:block;margin:0.5rem 0 1.5rem}details{margin:0.3rem 0}pre{white-space:pre-wrap;background:#f5f7fa;padding:0.5rem}"""


def _html_table(rows: list[MetricRow]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r.label)}{'' if r.gating else ' *'}</td><td class=num>{fmt(r.kind, r.base)}</td>"
        f"<td class=num>{fmt(r.kind, r.candidate)}</td><td class={r.verdict.replace('/', '')}>{VERDICT_MARK[r.verdict]}</td></tr>"
        for r in rows)
    return f"<table><tr><th>Metric</th><th>Base</th><th>Fine-tuned</th><th>Verdict</th></tr>{body}</table>"


def render_html(c: Comparison) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>edentune: Base vs Fine-tuned</title>",
        f"<style>{CSS}</style></head><body><h1>Base vs Fine-tuned</h1>",
        f"<p>Base: <code>{e(c.base_model)}</code><br>Fine-tuned: <code>{e(c.candidate_model)}</code></p>",
        f"<p class='ship {'yes' if c.ship else 'no'}'>Ship: <b>{'yes' if c.ship else 'no'}</b></p>",
        "".join(f"<p>{e(r)}</p>" for r in c.reasons),
        _html_table(c.metrics), "<p>* informational, not part of the deploy gate.</p>",
    ]
    parts += [f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{png}'>" for title, png in plots(c).items()]
    parts.append("<h2>Language mixing by expected language</h2>")
    parts.append(_html_table([r.model_copy(update={"label": lang}) for lang, (r,) in c.by_language.items()]))
    parts.append("<h2>By category</h2>")
    parts += [f"<h3>{e(cat)}</h3>{_html_table(rows)}" for cat, rows in c.by_category.items()]
    for side, title in (("candidate", "Fine-tuned"), ("base", "Base")):
        parts.append(f"<h2>Failing cases: {title} ({len(c.failing[side])})</h2>")
        parts += [f"<details><summary><b>{e(f.id)}</b> ({e(f.category)}): {e('; '.join(f.failures))}</summary>"
                  f"<pre>{e(f.answer)}</pre></details>" for f in c.failing[side]]
    parts.append("</body></html>")
    return "\n".join(parts)


def summary(c: Comparison) -> dict:
    """Machine-readable verdict for a deploy gate."""
    return {
        "ship": c.ship, "reasons": c.reasons, "base": c.base_model, "candidate": c.candidate_model,
        "candidate_adapter_sha256": c.candidate_adapter_sha256,
        "tolerance": c.tolerance, "max_forgetting": c.max_forgetting, "korean_consistency": c.korean_consistency,
        "metrics": {r.key: {"base": r.base, "candidate": r.candidate, "verdict": r.verdict, "gating": r.gating} for r in c.metrics},
        "language_mixing_by_language": {lang: {"base": r.base, "candidate": r.candidate, "verdict": r.verdict}
                                        for lang, (r,) in c.by_language.items()},
        "by_category": {cat: {r.key: {"base": r.base, "candidate": r.candidate, "verdict": r.verdict} for r in rows}
                        for cat, rows in c.by_category.items()},
        "failing": {side: [f.id for f in cases] for side, cases in c.failing.items()},
    }


def write_reports(c: Comparison, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {"json": out / "comparison.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_json_atomic(paths["json"], summary(c))
    write_text_atomic(paths["markdown"], render_markdown(c))
    write_text_atomic(paths["html"], render_html(c))
    return paths


# -- terminal ---------------------------------------------------------------------------------
def rich_table(c: Comparison):
    """The comparison as a Rich table (print it with a rich Console)."""
    from rich.table import Table

    style = {"better": "green", "worse": "bold red", "same": "", "n/a": "dim"}
    table = Table(title=f"Base vs Fine-tuned — ship: {'yes' if c.ship else 'NO'}")
    for col, justify in (("Metric", "left"), ("Base", "right"), ("Fine-tuned", "right"), ("Verdict", "left")):
        table.add_column(col, justify=justify)
    for r in c.metrics:
        table.add_row(r.label + ("" if r.gating else " *"), fmt(r.kind, r.base), fmt(r.kind, r.candidate),
                      f"[{style[r.verdict]}]{VERDICT_MARK[r.verdict]}[/]" if style[r.verdict] else VERDICT_MARK[r.verdict])
    return table
