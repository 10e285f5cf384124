"""The human steps of a round: the data review and the blind comparison (`edentune review WS` is
their web page; this module is what the round and the page share).

Data review. Every conversation of the round after cleaning is shown with its flags; the user
approves, rejects or edits it. Decisions live in the registry (`review_decisions`), keyed by a
content hash of the cleaned conversation (`conv_id`), so they survive restarts and rerun steps.
An edit is stored beside the original (clean.jsonl is never rewritten). The round's select step
applies them (`review_filter`): rejected conversations do not train, edited ones train as edited.
`cycle.yaml: review`: off (ignored), optional (applied; undecided ones train), required (the round
waits after cleaning until every cleaned conversation is decided).

Blind comparison. `gate.human_prompts` real user prompts of the month are held out from training
(`blind_sample`, fixed per round) and answered by the live and the candidate model after the
evaluate step (`answer_blind`). The page shows each pair in a random order under opaque random
ids; which side is which stays in the registry. The picks give the candidate's win rate with a
Wilson interval (`human_verdict`); with `gate.human_min_win_rate` the gate waits for the picks and
ships only at or above it. Every pair picked A or B becomes a DPO pair (chosen / rejected, with its
provenance) that the next round's preference step trains on (`previous_round_feedback`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..data.clean import dedup_key
from ..data.validate import load_valid
from ..io import write_json_atomic, write_jsonl_atomic
from ..registry import SHARED, BlindPair, Registry
from .workspace import Workspace

WILSON_Z = 1.96  # 95% interval


class HumanWait(Exception):
    """The round waits for the user (review or blind picks); the next `cycle run` continues it.
    Not an EdentuneError: nothing failed."""


def conv_id(record: dict) -> str:
    """Stable id of a cleaned conversation: a hash of its messages (exact duplicates are already gone)."""
    text = json.dumps(record.get("messages"), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _quarantine_id(row: dict) -> str:
    return "q" + hashlib.sha256(f"{row.get('source')}\0{row.get('raw')}".encode()).hexdigest()[:19]


@dataclass
class ReviewItem:
    conv_id: str
    messages: list[dict]
    status: str  # clean | quarantined
    flags: list[str] = field(default_factory=list)
    reason: str | None = None  # quarantined: why
    source: str | None = None
    rating: str | None = None
    decision: str = "pending"  # pending | approved | rejected (quarantined: never trains)
    edited: list[dict] | None = None

    @property
    def text(self) -> str:
        return "\n".join(str(m.get("content") or "") for m in (self.edited or self.messages))


def review_round(reg: Registry) -> str | None:
    """The round being prepared: the unfinished one, else the latest."""
    rounds = reg.rounds()
    running = [r for r in rounds if r.status == "running"]
    return (running or rounds or [None])[-1].id if (running or rounds) else None


def _rating(record: dict) -> str | None:
    for key in ("rating", "feedback", "thumbs", "label"):
        if key in record and record[key] is not None:
            return str(record[key])
    return None


def _quarantined(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _raw_messages(raw) -> list[dict]:
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
        msgs = data.get("messages") if isinstance(data, dict) else None
        if isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs):
            return [{"role": str(m.get("role", "?")), "content": str(m.get("content", ""))} for m in msgs]
    except (ValueError, TypeError, AttributeError):
        pass
    return [{"role": "raw", "content": str(raw)}]


def review_items(ws: Workspace, reg: Registry, round_id: str) -> list[ReviewItem]:
    """Every conversation the round ingested: the cleaned ones (with decisions) and the quarantined
    ones (with their reason), so the counts add up to what came in."""
    data = ws.shared_data_dir(round_id)
    clean_file = data / "clean.jsonl"
    decisions = reg.reviews(round_id)
    fixed = {dedup_key(r) for r in load_valid([p for p in (ws.validation_path, ws.forgetting_path) if p.is_file()])}
    blind = {b["conv_id"] for b in blind_sample(ws, round_id)}
    items = []
    for rec in load_valid([clean_file]) if clean_file.is_file() else []:
        cid = conv_id(rec)
        flags = []
        if any("[REDACTED_" in str(m.get("content") or "") for m in rec["messages"]):
            flags.append("secrets/PII redacted")
        if dedup_key(rec) in fixed:
            flags.append("held out: fixed validation set")
        if cid in blind:
            flags.append("held out: blind comparison")
        rating = _rating(rec)
        if rating is not None:
            flags.append(f"rated {rating}")
        d = decisions.get(cid)
        items.append(ReviewItem(cid, rec["messages"], "clean", flags, source=rec.get("source"), rating=rating,
                                decision=d.decision if d else "pending", edited=d.edited if d else None))
    for name in ("ingest_quarantine.jsonl", "clean_quarantine.jsonl"):
        for row in _quarantined(data / name):
            reason = str(row.get("reason") or "quarantined")
            short = re.sub(r"^message \d+: ", "", reason)  # the flag names the kind; the full reason is shown too
            items.append(ReviewItem(_quarantine_id(row), _raw_messages(row.get("raw")), "quarantined", [f"quarantined: {short}"],
                                    reason=reason, source=row.get("source"), decision="quarantined"))
    return items


def review_counts(items: list[ReviewItem]) -> dict[str, int]:
    clean = [i for i in items if i.status == "clean"]
    counts = {"total": len(items), "clean": len(clean), "quarantined": len(items) - len(clean),
              "approved": sum(i.decision == "approved" for i in clean), "rejected": sum(i.decision == "rejected" for i in clean),
              "pending": sum(i.decision == "pending" for i in clean), "edited": sum(i.edited is not None for i in clean)}
    assert counts["approved"] + counts["rejected"] + counts["pending"] == counts["clean"], counts
    return counts


def review_wait(ws: Workspace, reg: Registry, round_id: str) -> str | None:
    """With `review: required`: the message to stop on while conversations are undecided, else None."""
    if ws.config.review != "required":
        return None
    counts = review_counts(review_items(ws, reg, round_id))
    if counts["pending"] == 0:
        return None
    return (f"waiting for review: edentune review {ws.dir} ({counts['pending']} of {counts['clean']} conversations "
            f"undecided); then run `edentune cycle run` again to continue round {round_id}")


def _decisions_digest(reg: Registry, round_id: str) -> str:
    rows = [(r.conv_id, r.decision, r.edited) for r in reg.reviews(round_id).values()]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def select_inputs(ws: Workspace, reg: Registry, round_id: str) -> dict:
    """What the select step's result depends on besides its data: the decisions (when they apply)
    and the blind prompts. Empty when neither applies, so rounds without review keep their hashes."""
    out = {}
    if ws.config.review != "off" and reg.reviews(round_id):
        out["review"] = _decisions_digest(reg, round_id)
    if ws.config.gate.human_prompts:
        out["blind"] = [b["conv_id"] for b in blind_sample(ws, round_id)]
    return out


def review_filter(ws: Workspace, reg: Registry, round_id: str):
    """A function applying the review to the select step's records: rejected ones and the blind
    prompts are removed, edited ones replaced by the edit (marked `review_edited`)."""
    decisions = reg.reviews(round_id) if ws.config.review != "off" else {}
    blind = {b["conv_id"] for b in blind_sample(ws, round_id)} if ws.config.gate.human_prompts else set()

    def apply(records: list[dict]) -> list[dict]:
        out = []
        for rec in records:
            cid = conv_id(rec)
            d = decisions.get(cid)
            if cid in blind or (d is not None and d.decision == "rejected"):
                continue
            if d is not None and d.edited is not None:
                rec = {**rec, "messages": d.edited, "review_edited": cid}
            out.append(rec)
        return out

    return apply


# -- the blind comparison ---------------------------------------------------------------------
def _prompt(messages: list[dict]) -> list[dict] | None:
    """The conversation up to its first answer, without the app's system prompt (the models get
    their persona's)."""
    turns = [m for m in messages if m.get("role") != "system"]
    first = next((i for i, m in enumerate(turns) if m.get("role") == "assistant"), None)
    if not first:
        return None
    return [{"role": m["role"], "content": m.get("content") or ""} for m in turns[:first]]


def blind_sample(ws: Workspace, round_id: str) -> list[dict]:
    """`gate.human_prompts` prompts of the round's usable records (not the fixed sets), the same
    every time for a round: [{conv_id, prompt}]."""
    n = ws.config.gate.human_prompts
    usable = ws.shared_data_dir(round_id) / "usable.jsonl"
    if not n or not usable.is_file():
        return []
    candidates = [(conv_id(r), p) for r in load_valid([usable]) if (p := _prompt(r["messages"]))]
    rng = random.Random(f"edentune-blind-{round_id}")
    picked = sorted(rng.sample(range(len(candidates)), min(n, len(candidates))))
    return [{"conv_id": candidates[i][0], "prompt": candidates[i][1]} for i in picked]


def answer_blind(ws: Workspace, reg: Registry, cfg, round_id: str, unit: str, live_adapter: Path | None,
                 adapter: Path) -> tuple[list[Path], dict]:
    """The blind step: both models answer the held-out prompts; new random pair ids and sides."""
    from ..evaluate.backends import backend_from_spec

    sample = blind_sample(ws, round_id)
    system = cfg.model.system_prompt or ""
    conversations = [[{"role": "system", "content": system}, *s["prompt"]] for s in sample]
    answers = {}
    for side, spec in (("live", str(live_adapter) if live_adapter else "base"), ("candidate", str(adapter))):
        backend = backend_from_spec(spec, cfg)
        answers[side] = [g.text for g in backend.generate(conversations, cfg.evaluation.max_new_tokens)]
        del backend
    pairs = [{"pair_id": secrets.token_urlsafe(12), "seq": i, "prompt": s["prompt"],
              "first_side": secrets.choice(("live", "candidate")), "live_answer": answers["live"][i],
              "candidate_answer": answers["candidate"][i],
              "detail": {"conv_id": s["conv_id"], "live": str(live_adapter) if live_adapter else "base", "candidate": str(adapter)}}
             for i, s in enumerate(sample)]
    reg.add_blind_pairs(round_id, unit, pairs)
    out = ws.eval_dir(round_id, unit) / "blind_answers.json"
    write_json_atomic(out, [{"seq": p["seq"], "prompt": p["prompt"], "live": p["live_answer"], "candidate": p["candidate_answer"]}
                            for p in pairs])
    return [out], {"pairs": len(pairs)}


def wilson(successes: float, n: int, z: float = WILSON_Z) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (ties count half, so `successes` may be fractional)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(pairs: list[BlindPair]) -> dict:
    """The candidate's win rate over the picked pairs: wins count 1, ties and "both bad" half."""
    winners = [p.winner for p in pairs if p.winner is not None]
    counts = {k: winners.count(k) for k in ("candidate", "live", "tie", "both_bad")}
    n = len(winners)
    score = counts["candidate"] + 0.5 * (counts["tie"] + counts["both_bad"])
    ci = wilson(score, n)
    return {"pairs": len(pairs), "picked": n, **counts, "win_rate": score / n if n else None,
            "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None}


def human_verdict(ws: Workspace, reg: Registry, round_id: str, unit: str) -> dict | None:
    """None without `gate.human_min_win_rate`; raises HumanWait until enough pairs are picked."""
    g = ws.config.gate
    if g.human_min_win_rate is None:
        return None
    pairs = reg.blind_pairs(round_id, unit)
    rate = win_rate(pairs)
    needed = min(g.human_min_picks or len(pairs), len(pairs))
    if rate["picked"] < needed or not pairs:
        raise HumanWait(f"waiting for the blind comparison: edentune review {ws.dir} ({rate['picked']} of {needed} pairs picked "
                        f"for {unit}); then run `edentune cycle run` again to continue round {round_id}")
    ship = rate["win_rate"] is not None and rate["win_rate"] >= g.human_min_win_rate
    reasons = [] if ship else [f"the blind comparison's win rate {rate['win_rate']:.0%} (95% CI {rate['ci_low']:.0%}–"
                               f"{rate['ci_high']:.0%}, {rate['picked']} picks) is below gate.human_min_win_rate {g.human_min_win_rate:.0%}"]
    return {**rate, "min_win_rate": g.human_min_win_rate, "ship": ship, "reasons": reasons}


def dpo_pairs(pairs: list[BlindPair]) -> list[dict]:
    """Pairs picked A or B as DPO rows (TRL's conversational format) with their provenance."""
    out = []
    for p in pairs:
        if p.winner not in ("live", "candidate") or p.live_answer.strip() == p.candidate_answer.strip():
            continue  # a tie, both bad, or two identical answers: nothing to prefer
        win, lose = (p.candidate_answer, p.live_answer) if p.winner == "candidate" else (p.live_answer, p.candidate_answer)
        out.append({"prompt": p.prompt, "chosen": [{"role": "assistant", "content": win}],
                    "rejected": [{"role": "assistant", "content": lose}],
                    "provenance": {"source": "edentune review (blind comparison)", "round": p.round_id, "unit": p.unit,
                                   "pair": p.pair_id, "chosen_model": p.winner, "picked": p.picked, **p.detail}})
    return out


def previous_round_feedback(ws: Workspace, reg: Registry, round_id: str) -> list[Path]:
    """The previous round's blind picks for this round's preference step: its DPO pairs (human_dpo.jsonl,
    with provenance) and the same as thumbs up/down ratings (the feedback step's input). [] without picks."""
    current = reg.round(round_id)
    earlier = [r for r in reg.rounds() if current is not None and r.seq < current.seq]
    if not earlier:
        return []
    rows = dpo_pairs(reg.blind_pairs(earlier[-1].id))
    if not rows:
        return []
    out = ws.round_dir(round_id, SHARED) / "human"
    write_jsonl_atomic(out / "human_dpo.jsonl", rows)
    ratings = [{"messages": [*r["prompt"], *r[side]], "rating": "up" if side == "chosen" else "down", "provenance": r["provenance"]}
               for r in rows for side in ("chosen", "rejected")]
    path = out / "human_ratings.jsonl"
    write_jsonl_atomic(path, ratings)
    return [path]
