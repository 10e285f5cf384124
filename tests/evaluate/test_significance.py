"""The paired gate: a case or two of difference is 'cannot tell', a real drop is 'worse', and the
reasons give case counts and the cases that flipped."""

import hashlib
import math

import pytest

from edentune.config import RunConfig
from edentune.evaluate.compare import compare
from edentune.evaluate.report import summary
from edentune.evaluate.runner import CaseResult, EvalResult, case_metrics
from edentune.evaluate.significance import (forgetting_verdict, loss_verdict, mcnemar_exact, paired_loss, paired_rate,
                                            rate_verdict)

SUITE_SHA = hashlib.sha256(b"suite").hexdigest()


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial p (p=1/2) computed independently: twice the smaller tail, capped at 1."""
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("lost, gained", [(1, 0), (2, 1), (5, 0), (7, 0), (9, 3), (0, 0)])
def test_mcnemar_is_the_exact_binomial_test_on_flipped_cases(lost, gained):
    expected = 1.0 if lost + gained == 0 else binomial_two_sided(gained, lost + gained)
    assert mcnemar_exact(lost, gained) == pytest.approx(expected)


def result(name: str, persona: list[bool], *, val=None, replay=None) -> EvalResult:
    """An EvalResult whose metrics are computed from its cases (one case per persona flag)."""
    cases = [CaseResult(id=f"case-{i}", category="persona" if i % 2 else "general", question="q", answer="a", seconds=1.0,
                        persona_ok=ok, failures=[] if ok else ["persona: claims another identity"])
             for i, ok in enumerate(persona)]
    metrics = case_metrics(cases)
    terms = {}
    for key, t in (("validation", val), ("replay", replay)):
        if t is not None:
            terms[key] = t
            metrics[f"perplexity_{key}"] = math.exp(sum(x for x, _ in t) / sum(n for _, n in t))
    return EvalResult(model=name, suite="s", suite_sha256=SUITE_SHA, settings={}, created="now", metrics=metrics,
                      by_category={c: case_metrics([x for x in cases if x.category == c]) for c in ("persona", "general")},
                      by_language={}, cases=cases, perplexity_terms=terms)


def test_one_case_of_difference_cannot_tell_and_ships():
    # The round 2: one persona case lost on a small suite; the tolerance gate refused it.
    base, cand = result("live", [True] * 5), result("cand", [True] * 4 + [False])
    c = compare(base, cand, RunConfig())
    row = c.row("persona_adherence")
    assert row.verdict == "same" and row.detail.startswith("5/5 → 4/5, p=1") and row.flipped == {"lost": ["case-4"], "gained": []}
    assert c.ship, c.reasons
    old = compare(base, cand, RunConfig().updated({"evaluation.gate_test": "tolerance"}))
    assert old.row("persona_adherence").verdict == "worse" and not old.ship


def test_a_real_drop_is_worse_with_counts_and_flipped_cases():
    base = result("live", [True] * 12)
    cand = result("cand", [True] * 3 + [False] * 9)
    c = compare(base, cand, RunConfig())
    assert c.row("persona_adherence").verdict == "worse" and not c.ship
    (reason,) = [r for r in c.reasons if r.startswith("Persona adherence")]
    assert "12/12 → 3/12" in reason and "p=0.0039 (level 0.025)" in reason
    assert "lost: case-3, case-4, case-5, case-6, case-7, case-8 and 3 more" in reason
    js = summary(c)["metrics"]["persona_adherence"]
    assert js["verdict"] == "worse" and js["flipped"]["lost"][:2] == ["case-3", "case-4"] and js["p_value"] < 0.05
    assert js["interval"][1] < 0  # the whole bootstrap interval of the rate change is below zero


def test_significance_is_configurable_and_shared_by_the_metrics():
    base, cand = result("live", [True] * 6), result("cand", [True] + [False] * 5)  # 5 lost: p = 0.0625
    assert compare(base, cand, RunConfig()).row("persona_adherence").verdict == "same"
    # Two metrics are tested (persona adherence, cases passed): each at significance / 2.
    assert compare(base, cand, RunConfig().updated({"evaluation.significance": 0.1})).row("persona_adherence").verdict == "same"
    loose = compare(base, cand, RunConfig().updated({"evaluation.significance": 0.2}))
    assert loose.row("persona_adherence").verdict == "worse" and "(level 0.1)" in loose.row("persona_adherence").detail


def test_rate_verdict_ignores_balanced_flips():
    r = paired_rate({f"c{i}": i < 10 for i in range(20)}, {f"c{i}": 10 <= i for i in range(20)}, 0.05)
    assert (len(r.lost), len(r.gained), r.p_value) == (10, 10, 1.0) and rate_verdict(r, True, 0.05) == "same"


def test_loss_interval_separates_a_shift_from_noise():
    base = [[10.0 * (1 + i % 3), 10] for i in range(30)]
    shifted = [[nll + 1.5, n] for nll, n in base]  # +0.15 nats on every conversation
    noisy = [[nll + (0.8 if i % 2 else -0.8), n] for i, (nll, n) in enumerate(base)]  # ± on alternate ones
    up = paired_loss(base, shifted, 0.05)
    assert up.delta == pytest.approx(0.15) and up.interval[0] > 0 and loss_verdict(up) == "worse"
    assert loss_verdict(paired_loss(shifted, base, 0.05)) == "better"
    assert loss_verdict(paired_loss(base, noisy, 0.05)) == "same"
    assert paired_loss(base, shifted[:-1], 0.05) is None  # not the same conversations


def test_forgetting_needs_both_the_limit_and_a_real_rise():
    base = [[20.0, 10] for _ in range(20)]
    rise = paired_loss(base, [[20.0 + 10 * math.log(1.15), 10] for _ in range(20)], 0.05)  # +15 % everywhere
    assert forgetting_verdict(rise, limit=0.10, tolerance=0.02) == "worse"
    assert forgetting_verdict(rise, limit=0.20, tolerance=0.02) == "same"
    # +15 % on average, but from 2 conversations of 20: not beyond noise.
    lumpy = paired_loss(base, [[20.0 + (15 * 10 * math.log(1.15) if i < 2 else 0.0), 10] for i in range(20)], 0.05)
    assert math.expm1(lumpy.delta) > 0.10 and forgetting_verdict(lumpy, limit=0.10, tolerance=0.02) == "same"


def test_validation_perplexity_and_forgetting_rows_use_the_paired_interval():
    val = [[12.0 + i % 4, 8] for i in range(25)]
    rep = [[15.0 + i % 5, 9] for i in range(25)]
    base = result("live", [True] * 4, val=val, replay=rep)
    worse = result("cand", [True] * 4, val=[[x + 0.8, n] for x, n in val], replay=[[x + 2.0, n] for x, n in rep])
    c = compare(base, worse, RunConfig())
    assert c.row("perplexity_validation").verdict == "worse" and "nats/token" in c.row("perplexity_validation").detail
    assert c.row("forgetting").verdict == "worse" and c.row("forgetting").candidate > 0.10
    assert any(r.startswith("Forgetting") and "limit 10%" in r for r in c.reasons)
