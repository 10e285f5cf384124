"""Four months, each forgetting 5 % of general knowledge against the live model (under the 10 %
per-round limit): the round gate (`round._gate`, the one `cycle run` uses) passes months 1-3 and
refuses month 4, whose forgetting against the original base (+21.6 %) is past the cumulative limit
(20 %). The evaluation results are constructed (no training), each month's origin.json is made the
way the evaluate step makes it (round 1: its baseline is the base; later: the live round's)."""

from __future__ import annotations

import json
import math

import pytest

from edentune.cycle.forgetting import ORIGIN_FILE, write_origin
from edentune.cycle.round import _gate
from edentune.cycle.workspace import init_workspace
from edentune.evaluate.runner import CaseResult, EvalResult, case_metrics

SUITE_SHA = "ab" * 32
REPLAY = [[18.0 + i % 5, 9] for i in range(40)]  # the base's [NLL, tokens] per forgetting conversation
VALIDATION = [[14.0 + i % 3, 7] for i in range(40)]


def month_result(name: str, month: int) -> EvalResult:
    """Month 0 is the base. Each month: replay perplexity x1.05 (5 % more forgetting), validation loss lower."""
    cases = [CaseResult(id=f"c{i}", category="general", question="q", answer="a", seconds=1.0) for i in range(8)]
    replay = [[nll + n * month * math.log(1.05), n] for nll, n in REPLAY]
    val = [[nll - n * 0.05 * month, n] for nll, n in VALIDATION]
    metrics = case_metrics(cases)
    for key, terms in (("validation", val), ("replay", replay)):
        metrics[f"perplexity_{key}"] = math.exp(sum(x for x, _ in terms) / sum(n for _, n in terms))
    return EvalResult(model=name, suite="s", suite_sha256=SUITE_SHA, settings={"max_new_tokens": 12}, created="now",
                      metrics=metrics, by_category={"general": case_metrics(cases)}, by_language={}, cases=cases,
                      perplexity_terms={"validation": val, "replay": replay})


def test_cumulative_forgetting_refuses_the_fourth_month(tmp_path):
    ws = init_workspace(tmp_path / "ws", model="embedded")
    assert ws.config.gate.max_cumulative_forgetting == 0.2 and ws.config.run.evaluation.max_forgetting == 0.1
    verdicts, previous_origin = [], None
    for month in (1, 2, 3, 4):
        out = tmp_path / f"eval-{month}"
        out.mkdir()
        month_result("live", month - 1).save(out / "baseline.json")
        month_result("candidate", month).save(out / "candidate.json")
        origin = write_origin(out, baseline_file=out / "baseline.json", baseline_is_base=month == 1,
                              reused=previous_origin, score_base=lambda: month_result("base", 0))
        previous_origin = origin
        cfg = ws.round_config(f"2026-0{month}", "default")
        _, verdict = _gate(ws, cfg, out, out / "no-metrics.jsonl")
        assert json.loads((out / "gate.json").read_text(encoding="utf-8")) == json.loads(json.dumps(verdict))
        verdicts.append(verdict)

    for month, v in enumerate(verdicts, start=1):
        assert v["forgetting"] == pytest.approx(0.05)  # against the live model: under 10 % every month
        assert v["forgetting_base"] == pytest.approx(1.05 ** month - 1)
        assert v["verdicts"]["forgetting"] == "same"
    assert [v["ship"] for v in verdicts] == [True, True, True, False]
    (reason,) = verdicts[3]["reasons"]
    assert reason.startswith("forgetting against the original base is +21.6% (limit 20%") and "interval" in reason
    assert verdicts[3]["cumulative_forgetting"]["verdict"] == "worse"
    # Same base file all along: made once (month 1's baseline), reused after.
    assert (tmp_path / "eval-4" / ORIGIN_FILE).read_bytes() == (tmp_path / "eval-1" / "baseline.json").read_bytes()
