"""Base vs fine-tuned: per-metric verdicts and the deploy gate.

Verdict rules (thresholds from the `evaluation` config section):

- rates (0..1): `better` / `worse` when the candidate gains / loses more than `tolerance`
  (absolute), else `same`;
- validation perplexity: the same on the relative change (lower is better);
- forgetting = candidate replay perplexity / base replay perplexity - 1: `worse` above
  `max_forgetting`, `better` below -`tolerance`, else `same` (the replay perplexity itself is shown
  for context and does not gate);
- response time and throughput: relative change beyond 25 % (machine noise is large); reported
  but not gating, since base and candidate are often timed on different machines or loads;
- a metric missing on either side is `n/a` and does not gate.

`ship` is true only when no gating metric is `worse` and at least one gating metric was measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from edentune.config import RunConfig

from .runner import EvalResult

TIMING_TOLERANCE = 0.25
KOREAN_CONSISTENCY_TARGET = 0.95


@dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    higher_is_better: bool
    kind: str  # rate | perplexity | forgetting | timing
    gating: bool = True


METRICS = (
    MetricSpec("language_mixing", "Language mixing", False, "rate"),
    MetricSpec("persona_adherence", "Persona adherence", True, "rate"),
    MetricSpec("code_pass_rate", "Code pass rate", True, "rate"),
    MetricSpec("keyword_hit_rate", "Keyword hits", True, "rate"),
    MetricSpec("behavior_pass_rate", "Behaviour checks", True, "rate"),
    MetricSpec("case_pass_rate", "Cases passed", True, "rate"),
    MetricSpec("perplexity_validation", "Perplexity (validation)", False, "perplexity"),
    # Shown for context; forgetting (below) is its gated form, with its own threshold.
    MetricSpec("perplexity_replay", "Perplexity (replay set)", False, "perplexity", gating=False),
    MetricSpec("forgetting", "Forgetting (replay perplexity increase)", False, "forgetting"),
    MetricSpec("latency_median_s", "Response time median (s)", False, "timing", gating=False),
    MetricSpec("latency_p95_s", "Response time p95 (s)", False, "timing", gating=False),
    MetricSpec("tokens_per_second", "Tokens per second", True, "timing", gating=False),
)
SPEC_BY_KEY = {s.key: s for s in METRICS}
CATEGORY_METRICS = ("case_pass_rate", "language_mixing", "persona_adherence", "keyword_hit_rate", "code_pass_rate")


class MetricRow(BaseModel):
    key: str
    label: str
    base: float | None
    candidate: float | None
    verdict: str  # better | worse | same | n/a
    gating: bool
    kind: str


class FailingCase(BaseModel):
    id: str
    category: str
    failures: list[str]
    answer: str


class Comparison(BaseModel):
    base_model: str
    candidate_model: str
    metrics: list[MetricRow]
    by_category: dict[str, list[MetricRow]]
    by_language: dict[str, list[MetricRow]]  # language mixing per expected language
    failing: dict[str, list[FailingCase]]  # "base" / "candidate"
    korean_consistency: dict[str, float | bool | None]
    ship: bool
    reasons: list[str]
    tolerance: float
    max_forgetting: float
    candidate_adapter_sha256: str | None = None  # what `deploy --gate` checks the export against
    curves: dict[str, list[list[float]]] = {}  # series name -> [[step, value], …]

    def row(self, key: str) -> MetricRow:
        return next(r for r in self.metrics if r.key == key)


def verdict(spec: MetricSpec, base: float | None, cand: float | None, tolerance: float, max_forgetting: float) -> str:
    if base is None or cand is None:
        return "n/a"
    if spec.kind == "forgetting":  # cand is the increase itself; base is 0 by definition
        return "worse" if cand > max_forgetting else "better" if cand < -tolerance else "same"
    if spec.kind == "rate":
        change = cand - base
        limit = tolerance
    else:
        change = (cand - base) / base if base else 0.0
        limit = TIMING_TOLERANCE if spec.kind == "timing" else tolerance
    gain = change if spec.higher_is_better else -change
    return "better" if gain > limit else "worse" if gain < -limit else "same"


def _forgetting(base: EvalResult, cand: EvalResult) -> float | None:
    b, c = base.metrics.get("perplexity_replay"), cand.metrics.get("perplexity_replay")
    return c / b - 1 if b and c else None


def _rows(specs, base_vals: dict, cand_vals: dict, tolerance: float, max_forgetting: float) -> list[MetricRow]:
    return [MetricRow(key=s.key, label=s.label, base=base_vals.get(s.key), candidate=cand_vals.get(s.key),
                      verdict=verdict(s, base_vals.get(s.key), cand_vals.get(s.key), tolerance, max_forgetting),
                      gating=s.gating, kind=s.kind) for s in specs]


def _failing(result: EvalResult) -> list[FailingCase]:
    return [FailingCase(id=c.id, category=c.category, failures=c.failures, answer=c.answer) for c in result.cases if c.failures]


def compare(base: EvalResult, cand: EvalResult, cfg: RunConfig, metrics_jsonl: str | Path | None = None,
            out_dir: str | Path | None = None) -> Comparison:
    """Verdicts per metric and category, failing cases, the ship decision. With `out_dir`, also
    writes comparison.json, report.md and report.html there (see `report.write_reports`)."""
    from .report import read_training_curves, write_reports

    tol, max_f = cfg.evaluation.tolerance, cfg.evaluation.max_forgetting
    base_vals = {**base.metrics, "forgetting": 0.0 if _forgetting(base, cand) is not None else None}
    cand_vals = {**cand.metrics, "forgetting": _forgetting(base, cand)}
    rows = _rows(METRICS, base_vals, cand_vals, tol, max_f)
    cat_specs = [s for s in METRICS if s.key in CATEGORY_METRICS]
    by_category = {cat: _rows(cat_specs, base.by_category.get(cat, {}), cand.by_category.get(cat, {}), tol, max_f)
                   for cat in sorted(set(base.by_category) | set(cand.by_category))}

    mixing = [SPEC_BY_KEY["language_mixing"]]
    by_language = {lang: _rows(mixing, base.by_language.get(lang, {}), cand.by_language.get(lang, {}), tol, max_f)
                   for lang in sorted(set(base.by_language) | set(cand.by_language))}

    gating = [r for r in rows if r.gating and r.verdict != "n/a"]
    reasons = [f"{r.label} is worse ({_fmt(r.base)} → {_fmt(r.candidate)})" for r in gating if r.verdict == "worse"]
    if not gating:
        reasons.append("no quality metric could be compared")
    ko = cand.by_language.get("ko", {}).get("language_consistency")
    comparison = Comparison(
        base_model=base.model, candidate_model=cand.model, metrics=rows, by_category=by_category, by_language=by_language,
        failing={"base": _failing(base), "candidate": _failing(cand)},
        korean_consistency={"value": ko, "target": KOREAN_CONSISTENCY_TARGET, "met": None if ko is None else ko > KOREAN_CONSISTENCY_TARGET},
        ship=not reasons, reasons=reasons, tolerance=tol, max_forgetting=max_f, candidate_adapter_sha256=cand.adapter_sha256,
        curves=read_training_curves(metrics_jsonl) if metrics_jsonl else {},
    )
    if out_dir is not None:
        write_reports(comparison, out_dir)
    return comparison


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"
