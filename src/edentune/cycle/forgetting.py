"""Forgetting against the ORIGINAL base, besides the per-round forgetting against the live model.

Each round's gate compares the candidate with the live model, so a round that forgets 5 % of
general knowledge passes a 10 % limit, and so does the next one, and the next: after four months
the model has drifted 22 % from the base without any round being refused. So every round is
also measured against the base model it all started from, on the same fixed forgetting set, and
refused when that cumulative increase passes `gate.max_cumulative_forgetting` beyond noise (the
paired per-token interval of `evaluate.significance`).

The base's scores live in each round's `eval/origin.json` (an `evaluate` result of the base
model): round 1's baseline is the base itself; later rounds reuse the live round's origin when it
was measured the same way, and score the base again otherwise.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

ORIGIN_FILE = "origin.json"


@dataclass
class CumulativeForgetting:
    value: float | None  # candidate replay perplexity / base replay perplexity - 1
    limit: float
    verdict: str  # better | worse | same | invalid | n/a
    detail: str
    reasons: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def origin_source(ws, reg, live_round: str | None, unit: str, key: str) -> Path | None:
    """An earlier round's scores of the base measured with eval key `key` (None: score it again)."""
    from ..registry import SHARED

    if live_round is None:
        return None
    for live_unit in (unit, SHARED):
        rec = reg.step(live_round, live_unit, "evaluate")
        if rec is not None and rec.detail.get("key") == key:
            path = ws.eval_dir(live_round, live_unit) / ORIGIN_FILE
            if path.is_file():
                return path
    return None


def write_origin(out: Path, *, baseline_file: Path, baseline_is_base: bool, reused: Path | None, score_base) -> Path:
    """Put the base's scores in `out/origin.json`: the baseline when it is the base, else `reused`,
    else `score_base()` (an EvalResult) saved there."""
    target = out / ORIGIN_FILE
    if baseline_is_base:
        shutil.copyfile(baseline_file, target)
    elif reused is not None:
        shutil.copyfile(reused, target)
    else:
        score_base().save(target)
    return target


def cumulative_forgetting(origin, candidate, limit: float, evaluation) -> CumulativeForgetting:
    """The candidate's replay perplexity against the base's (`runner.EvalResult`s)."""
    from ..evaluate.significance import describe_loss, forgetting_verdict, paired_loss

    b, c = origin.metrics.get("perplexity_replay"), candidate.metrics.get("perplexity_replay")
    if b is None and c is None:
        return CumulativeForgetting(None, limit, "n/a", "no forgetting set", [])
    if not (b and c and math.isfinite(b) and math.isfinite(c) and b > 0):
        reason = f"forgetting against the base cannot be computed (base {b}, candidate {c})"
        return CumulativeForgetting(None, limit, "invalid", reason, [reason])
    value = c / b - 1
    loss = paired_loss(origin.perplexity_terms.get("replay", []), candidate.perplexity_terms.get("replay", []),
                       evaluation.significance) if evaluation.gate_test == "paired" else None
    if loss is not None:
        verdict, detail = forgetting_verdict(loss, limit, evaluation.tolerance), describe_loss(loss, evaluation.significance)
    else:  # older results without per-conversation terms, or gate_test: tolerance
        verdict, detail = ("worse" if value > limit else "same"), "point estimate"
    reasons = [f"forgetting against the original base is {100 * value:+.1f}% (limit {100 * limit:g}%: {detail})"] if verdict == "worse" else []
    return CumulativeForgetting(value, limit, verdict, detail, reasons)
