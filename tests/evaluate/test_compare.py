"""Verdicts, the ship gate, and the Markdown / HTML / JSON reports."""

import json

import pytest

from edentune.config import RunConfig
from edentune.evaluate.compare import METRICS, compare, verdict
from edentune.evaluate.report import read_training_curves, rich_table
from edentune.evaluate.runner import CaseResult, EvalResult

SPEC = {s.key: s for s in METRICS}


def result(name: str, *, persona=1.0, mixing=0.0, ppl_val=10.0, ppl_replay=8.0, latency=1.0, failing=()) -> EvalResult:
    metrics = {"language_mixing": mixing, "persona_adherence": persona, "code_pass_rate": 0.5, "keyword_hit_rate": 0.8,
               "behavior_pass_rate": 0.7, "case_pass_rate": 0.6, "perplexity_validation": ppl_val,
               "perplexity_replay": ppl_replay, "latency_median_s": latency, "latency_p95_s": 2 * latency,
               "tokens_per_second": 20.0}
    cases = [CaseResult(id=i, category="coding", question="q", answer="나는 ChatGPT야", seconds=1.0,
                        failures=["persona: claims another identity"]) for i in failing]
    cases.append(CaseResult(id="ok", category="general", question="q", answer="Paris.", seconds=1.0))
    by_category = {"coding": {"case_pass_rate": 0.5, "persona_adherence": persona}, "general": {"case_pass_rate": 1.0}}
    return EvalResult(model=name, suite="default", created="now", metrics=metrics, by_category=by_category,
                      by_language={"ko": {"language_consistency": 1 - mixing}}, cases=cases)


@pytest.mark.parametrize("key, base, cand, expected", [
    ("persona_adherence", 0.80, 0.90, "better"),
    ("persona_adherence", 0.80, 0.79, "same"),     # within tolerance 0.02
    ("persona_adherence", 0.80, 0.70, "worse"),
    ("language_mixing", 0.10, 0.02, "better"),     # lower is better
    ("language_mixing", 0.02, 0.10, "worse"),
    ("perplexity_validation", 10.0, 9.0, "better"),  # relative change
    ("perplexity_validation", 10.0, 10.1, "same"),
    ("forgetting", 0.0, 0.15, "worse"),            # above max_forgetting 0.10
    ("forgetting", 0.0, 0.05, "same"),
    ("latency_median_s", 1.0, 1.1, "same"),        # timing: 25 % band
    ("latency_median_s", 1.0, 2.0, "worse"),
    ("code_pass_rate", None, 0.5, "n/a"),
])
def test_verdict(key, base, cand, expected):
    assert verdict(SPEC[key], base, cand, tolerance=0.02, max_forgetting=0.10) == expected


def test_ship_when_nothing_is_worse():
    c = compare(result("base"), result("cand", persona=1.0, ppl_val=9.0, latency=3.0), RunConfig())
    assert c.ship and not c.reasons
    assert c.row("perplexity_validation").verdict == "better"
    assert c.row("latency_median_s").verdict == "worse" and not c.row("latency_median_s").gating


def test_never_ship_when_a_metric_is_worse():
    c = compare(result("base"), result("cand", persona=0.5, ppl_val=5.0), RunConfig())
    assert not c.ship and any("Persona adherence" in r for r in c.reasons)
    c = compare(result("base"), result("cand", ppl_replay=10.0), RunConfig())  # +25 % replay perplexity
    assert not c.ship and c.row("forgetting").candidate == pytest.approx(0.25)
    assert c.by_category["coding"][[r.key for r in c.by_category["coding"]].index("persona_adherence")].verdict == "same"


def test_reports(tmp_path):
    curves = tmp_path / "metrics.jsonl"
    curves.write_text("\n".join([
        json.dumps({"step": 10, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": 1.5}),
        "not json", "",
        json.dumps({"step": 20, "loss": 1.5, "eval_loss": 1.7, "learning_rate": 2e-4}),
        json.dumps({"global_step": 30, "loss": float("nan")}).replace("NaN", "NaN"),
        json.dumps([1, 2]),
        json.dumps({"event": "final_eval", "step": 20, "eval_loss": 1.65}),  # the best, re-scored: not a curve point
    ]))
    assert read_training_curves(curves) == {"loss": [[10, 2.0], [20, 1.5]], "learning_rate": [[10, 1e-4], [20, 2e-4]],
                                            "grad_norm": [[10, 1.5]], "eval_loss": [[20, 1.7]]}
    c = compare(result("base"), result("cand", persona=0.5, failing=["bad-case"]), RunConfig(), curves, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| Persona adherence | 100.0% | 50.0% | ▼ worse |" in md
    assert "### coding" in md and "**bad-case** (coding)" in md and "Ship: no" in md
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # curves, quality, perplexity, timing
    assert "bad-case" in page and "<script" not in page
    summary = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert summary["ship"] is False and summary["metrics"]["persona_adherence"]["verdict"] == "worse"
    assert summary["failing"] == {"base": [], "candidate": ["bad-case"]}
    assert rich_table(c).row_count == len(METRICS)


def test_results_round_trip(tmp_path):
    r = result("base", failing=["x"])
    r.save(tmp_path / "r.json")
    assert EvalResult.load(tmp_path / "r.json") == r
