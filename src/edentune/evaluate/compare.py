"""Base vs fine-tuned: per-metric verdicts and the deploy gate.

Verdict rules (thresholds from the `evaluation` config section). With `gate_test: paired` (the
default) the rates, validation perplexity and forgetting are decided by paired tests over the same
cases (`significance.paired_verdicts`: a change beyond noise at `significance`, "same" meaning
cannot tell); with `gate_test: tolerance`, by the older fixed margins:

- rates (0..1): `better` / `worse` when the candidate gains / loses more than `tolerance`
  (absolute), else `same`;
- validation perplexity: the same on the relative change (lower is better);
- forgetting = candidate replay perplexity / base replay perplexity - 1: `worse` above
  `max_forgetting`, `better` below -`tolerance`, else `same` (the replay perplexity itself is shown
  for context and does not gate);
- response time and throughput: relative change beyond 25 % (machine noise is large); reported
  but not gating, since base and candidate are often timed on different machines or loads;
- a metric measured on neither side is `n/a` and does not gate; one measured on one side only, or
  not a finite number (NaN, inf), is `invalid`, and an invalid gating metric never ships.

`ship` is true only when the two results are comparable (see `comparability`: same suite content,
same case ids, same evaluation settings, both recorded by an `evaluate` that hashes its suite), no
gating metric is `worse` or `invalid`, and at least one gating metric was measured.

`compare` writes nothing; `report.write_reports` renders and writes a `Comparison`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edentune.config import RunConfig
from edentune.errors import EdentuneError

from .runner import EvalResult, scoring_differences

TIMING_TOLERANCE = 0.25
KOREAN_CONSISTENCY_TARGET = 0.95
PREDATES_HASHING = "results predate suite hashing; re-run eval"
CURVE_KEYS = {"loss": "loss", "train_loss": "loss", "eval_loss": "eval_loss",
              "learning_rate": "learning_rate", "lr": "learning_rate", "grad_norm": "grad_norm"}


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
    verdict: str  # better | worse | same (cannot tell) | n/a | invalid
    gating: bool
    kind: str
    # The paired test behind the verdict (evaluation.gate_test: paired; see significance.py): case
    # counts or the loss difference with its interval, the p-value, and the case ids that flipped.
    detail: str | None = None
    p_value: float | None = None
    interval: list[float] | None = None
    flipped: dict[str, list[str]] = {}  # "lost" (base passed, candidate failed) / "gained"


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
    # The served files the candidate was scored on (gguf backend: base_gguf, adapter_gguf sha256)
    # and each side's backend: `deploy --gate` refuses files whose sha256 differs.
    candidate_artifacts: dict[str, str] = {}
    backends: dict[str, str | None] = {}
    curves: dict[str, list[list[float]]] = {}  # series name -> [[step, value], …]
    # What was compared, for `deploy --gate` to re-check: the suite's content hash (None unless both
    # results name the same one), the results files and their sha256 (None when not read from or
    # saved to a file), and the evaluation settings both were scored with.
    suite_sha256: str | None = None
    base_results_sha256: str | None = None
    candidate_results_sha256: str | None = None
    base_results_path: str | None = None
    candidate_results_path: str | None = None
    settings: dict[str, Any] = {}

    def row(self, key: str) -> MetricRow:
        return next(r for r in self.metrics if r.key == key)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def verdict(spec: MetricSpec, base: float | None, cand: float | None, tolerance: float, max_forgetting: float) -> str:
    if base is None and cand is None:
        return "n/a"
    if not (_finite(base) and _finite(cand)):  # one side only, NaN or inf: nothing to conclude, never a pass
        return "invalid"
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
    """Relative replay-perplexity increase; None when neither side measured it, NaN when it cannot be
    computed (one side only, non-finite or non-positive perplexity) so that it never passes."""
    b, c = base.metrics.get("perplexity_replay"), cand.metrics.get("perplexity_replay")
    if b is None and c is None:
        return None
    return c / b - 1 if _finite(b) and _finite(c) and b > 0 else math.nan


def _rows(specs, base_vals: dict, cand_vals: dict, tolerance: float, max_forgetting: float) -> list[MetricRow]:
    return [MetricRow(key=s.key, label=s.label, base=base_vals.get(s.key), candidate=cand_vals.get(s.key),
                      verdict=verdict(s, base_vals.get(s.key), cand_vals.get(s.key), tolerance, max_forgetting),
                      gating=s.gating, kind=s.kind) for s in specs]


def _failing(result: EvalResult) -> list[FailingCase]:
    return [FailingCase(id=c.id, category=c.category, failures=c.failures, answer=c.answer) for c in result.cases if c.failures]


def comparability(base: EvalResult, cand: EvalResult, allow_different_backends: bool = False) -> list[str]:
    """Why two results cannot be compared (empty when they can): different suite content, different
    or duplicated case ids, a results file whose metrics count other cases than it holds,
    different evaluation settings (generation length, system prompt, persona rules, perplexity sets),
    or another backend / base GGUF (`runner.scoring_differences`)."""
    problems = scoring_differences(base, cand, allow_different_backends)
    if base.suite_sha256 and cand.suite_sha256 and base.suite_sha256 != cand.suite_sha256:
        problems.append(f"different test suites: base {base.suite} (sha256 {base.suite_sha256[:12]}), "
                        f"fine-tuned {cand.suite} (sha256 {cand.suite_sha256[:12]})")
    ids = {"base": [c.id for c in base.cases], "fine-tuned": [c.id for c in cand.cases]}
    for side, result in (("base", base), ("fine-tuned", cand)):
        if len(set(ids[side])) != len(ids[side]):
            problems.append(f"the {side} results list a case id twice")
        n = result.metrics.get("n")
        if n is not None and n != len(result.cases):
            problems.append(f"the {side} results count {n:g} cases in their metrics but hold {len(result.cases)}")
    if set(ids["base"]) != set(ids["fine-tuned"]):
        only_b, only_c = sorted(set(ids["base"]) - set(ids["fine-tuned"])), sorted(set(ids["fine-tuned"]) - set(ids["base"]))
        problems.append(f"different cases: base answered {len(ids['base'])}, fine-tuned {len(ids['fine-tuned'])}"
                        + (f"; only in base: {_few(only_b)}" if only_b else "") + (f"; only in fine-tuned: {_few(only_c)}" if only_c else ""))
    if base.suite_sha256 and cand.suite_sha256:  # older files have neither hash nor settings: reported once, below
        differing = sorted(k for k in set(base.settings) | set(cand.settings) if base.settings.get(k) != cand.settings.get(k))
        if differing:
            problems.append(f"evaluated with different settings: {', '.join(differing)}")
    return problems


def _few(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _gate_reasons(rows: list[MetricRow]) -> list[str]:
    reasons = []
    replay = next((r for r in rows if r.key == "perplexity_replay"), None)
    for r in rows:
        if not r.gating or r.verdict not in ("worse", "invalid"):
            continue
        if r.verdict == "worse":
            reasons.append(f"{r.label} is worse ({r.detail or f'{_fmt(r.base)} → {_fmt(r.candidate)}'})")
        elif r.key == "forgetting" and replay is not None:
            reasons.append(f"{r.label} cannot be computed: {_invalid(replay)}")
        else:
            reasons.append(f"{r.label}: {_invalid(r)}")
    return reasons


def _invalid(r: MetricRow) -> str:
    if r.base is None or r.candidate is None:
        return f"measured for the {'base' if r.candidate is None else 'fine-tuned'} model only"
    return f"not a finite number (base {_fmt(r.base)}, fine-tuned {_fmt(r.candidate)})"


def compare(base: EvalResult, cand: EvalResult, cfg: RunConfig, metrics_jsonl: str | Path | None = None, *,
            allow_different_backends: bool = False) -> Comparison:
    """Verdicts per metric, category and language, failing cases and the ship decision. Pure: reads
    `metrics_jsonl` (training curves) if given, writes nothing; see `report.write_reports`."""
    tol, max_f = cfg.evaluation.tolerance, cfg.evaluation.max_forgetting
    forgetting = _forgetting(base, cand)
    base_vals = {**base.metrics, "forgetting": None if forgetting is None else 0.0}
    cand_vals = {**cand.metrics, "forgetting": forgetting}
    rows = _rows(METRICS, base_vals, cand_vals, tol, max_f)
    cat_specs = [s for s in METRICS if s.key in CATEGORY_METRICS]
    by_category = {cat: _rows(cat_specs, base.by_category.get(cat, {}), cand.by_category.get(cat, {}), tol, max_f)
                   for cat in sorted(set(base.by_category) | set(cand.by_category))}
    if cfg.evaluation.gate_test == "paired":
        from .significance import paired_verdicts

        paired_verdicts(rows, base, cand, cfg.evaluation)
        for cat, cat_rows in by_category.items():
            paired_verdicts(cat_rows, base, cand, cfg.evaluation, category=cat)

    mixing = [SPEC_BY_KEY["language_mixing"]]
    by_language = {lang: _rows(mixing, base.by_language.get(lang, {}), cand.by_language.get(lang, {}), tol, max_f)
                   for lang in sorted(set(base.by_language) | set(cand.by_language))}

    reasons = comparability(base, cand, allow_different_backends)
    if base.suite_sha256 is None or cand.suite_sha256 is None:
        reasons.insert(0, PREDATES_HASHING)
    if not (math.isfinite(tol) and math.isfinite(max_f)):
        reasons.append(f"evaluation.tolerance ({tol}) and evaluation.max_forgetting ({max_f}) must be finite")
    reasons += _gate_reasons(rows)
    if not any(r.gating and r.verdict != "n/a" for r in rows):
        reasons.append("no quality metric could be compared")
    ko = cand.by_language.get("ko", {}).get("language_consistency")
    ko = ko if _finite(ko) else None
    same_suite = base.suite_sha256 if base.suite_sha256 == cand.suite_sha256 else None
    return Comparison(
        base_model=base.model, candidate_model=cand.model, metrics=rows, by_category=by_category, by_language=by_language,
        failing={"base": _failing(base), "candidate": _failing(cand)},
        korean_consistency={"value": ko, "target": KOREAN_CONSISTENCY_TARGET, "met": None if ko is None else ko > KOREAN_CONSISTENCY_TARGET},
        ship=not reasons, reasons=reasons, tolerance=tol, max_forgetting=max_f, candidate_adapter_sha256=cand.adapter_sha256,
        candidate_artifacts=cand.artifacts, backends={"base": base.backend, "candidate": cand.backend},
        curves=read_training_curves(metrics_jsonl) if metrics_jsonl else {},
        suite_sha256=same_suite, settings=base.settings if base.settings == cand.settings else {},
        base_results_sha256=base.results_sha256, candidate_results_sha256=cand.results_sha256,
        base_results_path=base.results_path, candidate_results_path=cand.results_path,
    )


def read_training_curves(path: str | Path) -> dict[str, list[list[float]]]:
    """Series from a run's metrics.jsonl: tolerant of blank or broken lines, missing keys, NaN and
    either `step` or `global_step` (the line number when neither is there)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise EdentuneError(f"{path}: cannot read the training metrics ({err.strerror or err})",
                            hint="give a run's metrics.jsonl (in training.output_dir), or leave --metrics-jsonl out") from None
    curves: dict[str, list[list[float]]] = {}
    for n, line in enumerate(text.splitlines()):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(rec, dict) or rec.get("event") in ("summary", "end", "final_eval"):
            continue  # run totals and the best checkpoint's re-evaluation are not points on the curve
        step = rec.get("step", rec.get("global_step", n))
        for key, name in CURVE_KEYS.items():
            point = _point(step, rec.get(key))
            if point:
                curves.setdefault(name, []).append(point)
    return curves


def _point(step, value) -> list[float] | None:
    if not (isinstance(step, (int, float)) and isinstance(value, (int, float))):
        return None
    try:
        point = [float(step), float(value)]
    except OverflowError:  # a 400-digit integer
        return None
    return point if all(math.isfinite(v) for v in point) else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"
