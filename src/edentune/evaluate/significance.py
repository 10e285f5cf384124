"""Paired comparisons of two models on the same cases: is a difference a change or noise?

A test suite of 30 cases moves a rate by 3 points per case, so two retrains of the same month on
the same data differ by a case or two on almost every metric. Comparing rates against a fixed
tolerance calls such a candidate worse half of the time. Here each gating metric is compared case
by case over the cases both models answered:

- pass/fail metrics (persona adherence, keyword hits, code, behaviour, language, cases passed):
  the exact McNemar test, i.e. a two-sided binomial test (scipy.stats.binomtest) on the cases that
  flipped, with a paired bootstrap interval on the difference of the rates;
- per-token losses (validation perplexity, forgetting on the replay set): a paired bootstrap over
  conversations of the difference in mean negative log-likelihood per assistant token (the log of
  the perplexity ratio), so the interval is on the same scale the gate reads.

Each comparison says better / worse / cannot tell at the configured significance level
(`evaluation.significance`, two-sided, shared by the metrics tested: Bonferroni, see
`paired_verdicts`). The statistics come from numpy and scipy; only the bookkeeping (which cases
flipped, the ratio-of-sums resampling) is written here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same two results always give the same interval and verdict


@dataclass
class PairedRate:
    """One pass/fail metric over the cases both models were scored on."""

    n: int  # paired cases
    base_passed: int
    candidate_passed: int
    lost: list[str] = field(default_factory=list)  # case ids: base passed, candidate failed
    gained: list[str] = field(default_factory=list)  # case ids: base failed, candidate passed
    p_value: float = 1.0
    interval: tuple[float, float] = (0.0, 0.0)  # candidate - base rate, (1 - significance) bootstrap interval

    def counts(self) -> str:
        return f"{self.base_passed}/{self.n} → {self.candidate_passed}/{self.n}"


@dataclass
class PairedLoss:
    """Difference in per-token loss (candidate - base, nats) over the same conversations."""

    n: int  # paired conversations
    tokens: int
    delta: float  # log(candidate perplexity / base perplexity)
    interval: tuple[float, float]


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: under no change, each flipped case is equally likely to have
    flipped either way (binomial, p = 1/2). No flipped case: p = 1."""
    n = lost + gained
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(gained, n, 0.5, alternative="two-sided").pvalue)


def _interval(samples, significance: float) -> tuple[float, float]:
    import numpy as np

    lo, hi = np.quantile(samples, [significance / 2, 1 - significance / 2])
    return float(lo), float(hi)


def paired_rate(base: dict[str, bool], candidate: dict[str, bool], significance: float) -> PairedRate | None:
    """`base` / `candidate`: case id -> passed, for the cases the metric applies to on each side.
    None when no case applies on both sides."""
    import numpy as np

    ids = [i for i in base if i in candidate]
    if not ids:
        return None
    b = np.array([base[i] for i in ids], dtype=float)
    c = np.array([candidate[i] for i in ids], dtype=float)
    lost = [i for i in ids if base[i] and not candidate[i]]
    gained = [i for i in ids if candidate[i] and not base[i]]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(ids), size=(BOOTSTRAP_RESAMPLES, len(ids)))
    diffs = (c - b)[idx].mean(axis=1)
    return PairedRate(n=len(ids), base_passed=int(b.sum()), candidate_passed=int(c.sum()), lost=lost, gained=gained,
                      p_value=mcnemar_exact(len(lost), len(gained)), interval=_interval(diffs, significance))


def paired_loss(base: list[list[float]], candidate: list[list[float]], significance: float) -> PairedLoss | None:
    """`base` / `candidate`: [nll_sum, tokens] per conversation, the same conversations in the same
    order (as `perplexity_terms` returns them). The statistic is a ratio of sums (total NLL / total
    tokens), resampled by conversation, so long conversations weigh as much as their tokens do.
    None when the two lists cannot be paired."""
    import numpy as np

    if not base or len(base) != len(candidate):
        return None
    b, c = np.array(base, dtype=float), np.array(candidate, dtype=float)
    if not (np.isfinite(b).all() and np.isfinite(c).all()) or b[:, 1].sum() <= 0 or c[:, 1].sum() <= 0:
        return None
    delta = c[:, 0].sum() / c[:, 1].sum() - b[:, 0].sum() / b[:, 1].sum()
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(b), size=(BOOTSTRAP_RESAMPLES, len(b)))
    sb, sc = b[idx].sum(axis=1), c[idx].sum(axis=1)  # (resamples, 2): nll, tokens
    diffs = sc[:, 0] / sc[:, 1] - sb[:, 0] / sb[:, 1]
    return PairedLoss(n=len(b), tokens=int(c[:, 1].sum()), delta=float(delta), interval=_interval(diffs, significance))


def rate_verdict(r: PairedRate, higher_is_better: bool, significance: float) -> str:
    """better / worse when the flips lean one way beyond chance (McNemar p < significance), else same
    (cannot tell)."""
    if r.p_value >= significance or len(r.lost) == len(r.gained):
        return "same"
    improved = len(r.gained) > len(r.lost)
    return "better" if improved == higher_is_better else "worse"


def loss_verdict(loss: PairedLoss) -> str:
    """Lower loss is better; a change counts only when the whole interval is on one side of zero."""
    lo, hi = loss.interval
    return "worse" if lo > 0 else "better" if hi < 0 else "same"


def forgetting_verdict(loss: PairedLoss, limit: float, tolerance: float) -> str:
    """Worse when the replay perplexity rose by more than `limit` (relative) and the rise is beyond
    noise (the interval's low end above zero); better when it fell by more than `tolerance`, beyond
    noise."""
    increase = math.expm1(loss.delta)
    lo, hi = loss.interval
    if increase > limit and lo > 0:
        return "worse"
    return "better" if increase < -tolerance and hi < 0 else "same"


def describe_rate(r: PairedRate, few: Callable[[list[str]], str], level: float) -> str:
    """'4/5 → 3/5, p=0.62 (level 0.025); lost: a, b; gained: c' (case counts and the cases that flipped)."""
    text = f"{r.counts()}, p={r.p_value:.2g} (level {level:.2g})"
    if r.lost:
        text += f"; lost: {few(r.lost)}"
    if r.gained:
        text += f"; gained: {few(r.gained)}"
    return text


def describe_loss(loss: PairedLoss, significance: float) -> str:
    lo, hi = loss.interval
    return (f"{loss.delta:+.4f} nats/token, {100 * (1 - significance):g}% interval [{lo:+.4f}, {hi:+.4f}] "
            f"over {loss.n} conversations ({loss.tokens} tokens)")


# -- applied to a comparison's rows --------------------------------------------------------------
# Rate row -> the pass flag it counts (runner.PASS_FLAGS) and whether a pass is good for the row.
# Language mixing is the share of answers NOT in the expected language: its passes are consistency.
RATE_FLAGS = {"language_mixing": "language_consistency", "persona_adherence": "persona_adherence",
              "code_pass_rate": "code_pass_rate", "keyword_hit_rate": "keyword_hit_rate",
              "behavior_pass_rate": "behavior_pass_rate", "case_pass_rate": "case_pass_rate"}
FEW_IDS = 6


def _few(ids: list[str]) -> str:
    return ", ".join(ids[:FEW_IDS]) + (f" and {len(ids) - FEW_IDS} more" if len(ids) > FEW_IDS else "")


def _flags(result, key: str, category: str | None) -> dict[str, bool]:
    from .runner import PASS_FLAGS

    flag = PASS_FLAGS[key]
    return {c.id: bool(v) for c in result.cases if (category is None or c.category == category) and (v := flag(c)) is not None}


def _testable(row, base, cand, category: str | None) -> bool:
    if row.verdict in ("n/a", "invalid"):
        return False
    if row.key in RATE_FLAGS:
        return True
    name = {"perplexity_validation": "validation", "forgetting": "replay"}.get(row.key)
    return category is None and name is not None and bool(base.perplexity_terms.get(name)) and bool(cand.perplexity_terms.get(name))


def paired_verdicts(rows: list, base, cand, evaluation, category: str | None = None) -> None:
    """Replace the verdicts of `rows` (compare.MetricRow, measured on both sides) by paired tests of
    `base` / `cand` (runner.EvalResult): rates by exact McNemar, validation perplexity and forgetting
    by the paired loss interval (when both results carry per-conversation terms; older files keep
    the tolerance verdict). `category`: the rows are one suite category's.

    The gate refuses when ANY tested metric is worse, so each of the m tested metrics is tested at
    significance / m (Bonferroni): the chance that a no-change candidate is refused for noise stays
    at or below the configured level however many metrics the suite measures."""
    tested = [r for r in rows if _testable(r, base, cand, category)]
    alpha = evaluation.significance / max(1, len(tested))
    for row in tested:
        if row.key in RATE_FLAGS:
            flag = RATE_FLAGS[row.key]
            r = paired_rate(_flags(base, flag, category), _flags(cand, flag, category), alpha)
            if r is None:
                continue
            row.verdict = rate_verdict(r, True, alpha)
            label = "in the expected language " if row.key == "language_mixing" else ""
            row.detail, row.p_value = label + describe_rate(r, _few, alpha), r.p_value
            row.interval = list(r.interval) if flag == row.key else [-r.interval[1], -r.interval[0]]
            row.flipped = {"lost": r.lost, "gained": r.gained}
        else:
            name = "validation" if row.key == "perplexity_validation" else "replay"
            loss = paired_loss(base.perplexity_terms[name], cand.perplexity_terms[name], alpha)
            if loss is None:
                continue
            row.verdict = (loss_verdict(loss) if row.key == "perplexity_validation"
                           else forgetting_verdict(loss, evaluation.max_forgetting, evaluation.tolerance))
            row.interval = [math.expm1(loss.interval[0]), math.expm1(loss.interval[1])]  # relative perplexity change
            shown = (f"{row.base:.3f} → {row.candidate:.3f}: " if row.key == "perplexity_validation"
                     else f"+{100 * row.candidate:.1f}% (limit {100 * evaluation.max_forgetting:g}%): " if row.candidate >= 0
                     else f"{100 * row.candidate:.1f}%: ")
            row.detail = shown + describe_loss(loss, alpha)
