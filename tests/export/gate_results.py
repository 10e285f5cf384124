"""Real `edentune eval` results files and a real `compare` of them, without any model: what the
deploy gate re-derives its verdict from (tests of deploy --gate and cycle rollback)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from edentune.config import RunConfig
from edentune.evaluate.compare import compare
from edentune.evaluate.report import write_reports
from edentune.evaluate.runner import CaseResult, EvalResult

SUITE_SHA = hashlib.sha256(b"the gate's suite").hexdigest()
SETTINGS = {"max_new_tokens": 16, "temperature": 0.0, "system_prompt": "You are Eden.", "validation": None, "replay": None}


def results(name: str, adapter_sha256: str | None, *, persona: float = 1.0, ppl_val: float = 10.0,
            artifacts: dict | None = None) -> EvalResult:
    metrics = {"language_mixing": 0.0, "persona_adherence": persona, "keyword_hit_rate": 0.8, "case_pass_rate": 0.6,
               "perplexity_validation": ppl_val, "perplexity_replay": 8.0, "n": CASES}
    return EvalResult(model=name, suite="default", suite_sha256=SUITE_SHA, settings=SETTINGS, adapter_sha256=adapter_sha256,
                      created="now", metrics=metrics, by_category={}, by_language={}, cases=cases(persona),
                      artifacts=artifacts or {})


CASES = 24  # enough for the paired gate to call a halved persona adherence worse (12 lost: exact p = 0.0005)


def cases(persona: float) -> list[CaseResult]:
    """The per-case results behind the metrics: `persona` of them keep the persona."""
    kept = round(persona * CASES)
    return [CaseResult(id=f"case-{i}", category="general", question="q", answer="Paris.", seconds=1.0,
                       persona_ok=i < kept, failures=[] if i < kept else ["persona"]) for i in range(CASES)]


def scored_comparison(out_dir: Path, adapter_sha256: str, *, better: bool = True, cfg: RunConfig | None = None,
                      base_adapter: str | None = None, scored: dict | None = None) -> Path:
    """baseline.json, candidate.json (scoring `adapter_sha256`) and the comparison.json of `compare`
    on them in `out_dir`; the candidate is better (ship) or worse (persona adherence halves)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = results("base", base_adapter)
    cand = results("tuned", adapter_sha256, ppl_val=9.0, persona=1.0 if better else 0.5, artifacts=scored)
    base.save(out_dir / "baseline.json")
    cand.save(out_dir / "candidate.json")
    comparison = compare(base, cand, cfg or RunConfig())
    assert comparison.ship == better, comparison.reasons
    return write_reports(comparison, out_dir, base=base, candidate=cand)["json"]
