"""Build a training set from the month's new data plus replay drawn from a buffer of earlier data.

The rule (the README's "Every month"): every new record is trained, and replay is added so that it makes up
`1 - new_ratio` of the training set: `round(new × (1 - new_ratio) / new_ratio)` records (70/30: 3
replay for every 7 new; 2,000 new records get 857 replay). Replay is drawn from the buffer
stratified by the buffer's own categories (each category contributes in proportion to what the
buffer holds of it, largest-remainder rounding), so the buffer's composition carries into the mix.

`quotas` shape the BUFFER, not the training set: at most that many records per category are kept
in it (the cycle's buffer, `cycle.replay`, is built that way; here the replay files are capped the
same way before drawing, categories without a quota left out). A category comes from the record's
`category` key (e.g. "persona") or else from topics.classify.

When the buffer holds fewer records than the ratio asks for, all of it is drawn and the realised
ratio (new / trained) is reported above the configured one; new data is never dropped to restore
the ratio. A month so small that the ratio asks for no replay record says so. On the first cycle,
with no replay buffer yet, everything is new (realised ratio 1.0).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from pydantic import BaseModel

from edentune.config import MixConfig
from edentune.data.records import PathLike
from edentune.data.topics import category
from edentune.data.validate import load_valid
from edentune.io import atomic_outputs, check_outputs


class Draw(BaseModel):
    category: str
    source: str  # "new" or "replay"
    wanted: int
    available: int
    drawn: int


class MixReport(BaseModel):
    ratio: float  # configured share of new data
    realised_ratio: float | None = None  # new / drawn (None for an empty mix)
    seed: int
    new: int = 0  # new records, all trained
    replay_wanted: int = 0  # what the ratio asks for
    replay_available: int = 0  # in the buffer, after its quotas
    replay: int = 0  # drawn
    wanted: int  # new + replay_wanted
    drawn: int  # new + replay
    draws: list[Draw]
    shortfalls: list[str]  # why the realised ratio is not the configured one


def allocate(weights: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` over categories in proportion to `weights` (largest-remainder rounding: the parts
    add up to `total` and each is within one of its exact share)."""
    whole = sum(weights.values())
    if whole <= 0 or total <= 0:
        return {c: 0 for c in weights}
    exact = {c: w * total / whole for c, w in weights.items()}
    out = {c: math.floor(x) for c, x in exact.items()}
    for c in sorted(exact, key=lambda c: (out[c] - exact[c], c))[: total - sum(out.values())]:
        out[c] += 1
    return out


def replay_wanted(new: int, ratio: float) -> int:
    """Replay records that make a mix with `new` new records `ratio` new: round(new (1 - r) / r)."""
    return math.floor(new * (1 - ratio) / ratio + 0.5)


def _by_category(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(category(r), []).append(r)
    return out


def cap_buffer(replay: list[dict], quotas: dict[str, int], rng: random.Random) -> dict[str, list[dict]]:
    """The buffer's composition: at most `quotas[c]` records of each category c (a seeded sample),
    categories without a quota left out."""
    pools = _by_category(replay)
    return {c: (pools.get(c, []) if len(pools.get(c, [])) <= q else rng.sample(pools[c], q)) for c, q in quotas.items()}


def mix_records(new: list[dict], replay: list[dict], config: MixConfig | None = None) -> tuple[list[dict], MixReport]:
    """Every record of `new` plus replay from `replay` (the buffer) at the ratio of `config` (default
    MixConfig()); reproducible: the same inputs and config give the same output in the same order."""
    cfg = config or MixConfig()
    rng = random.Random(cfg.seed)
    buffer = cap_buffer(replay, cfg.quotas, rng)
    available = {c: len(p) for c, p in buffer.items()}
    wanted = replay_wanted(len(new), cfg.new_ratio)
    take = allocate(available, min(wanted, sum(available.values())))
    out, draws, shortfalls = list(new), [], []
    for cat, n_new in sorted(_count(new).items()):
        draws.append(Draw(category=cat, source="new", wanted=n_new, available=n_new, drawn=n_new))
    for cat, pool in buffer.items():
        picked = rng.sample(pool, take[cat])
        out += picked
        draws.append(Draw(category=cat, source="replay", wanted=take[cat], available=len(pool), drawn=len(picked)))
    drawn_replay = len(out) - len(new)
    if replay and wanted > drawn_replay:
        shortfalls.append(f"the replay buffer holds {drawn_replay} record(s) of the {wanted} a {cfg.new_ratio:.0%} new mix "
                          f"of {len(new)} new needs: trained {len(new) / len(out):.0%} new; the buffer grows with every accepted month")
    elif replay and new and wanted == 0:
        shortfalls.append(f"{len(new)} new record(s) is too small a month for a {cfg.new_ratio:.0%} new mix: no replay drawn")
    rng.shuffle(out)
    report = MixReport(ratio=cfg.new_ratio, realised_ratio=round(len(new) / len(out), 4) if out else None, seed=cfg.seed,
                       new=len(new), replay_wanted=wanted, replay_available=sum(available.values()), replay=drawn_replay,
                       wanted=len(new) + wanted, drawn=len(out), draws=draws, shortfalls=shortfalls)
    return out, report


def _count(records: list[dict]) -> dict[str, int]:
    return {c: len(p) for c, p in _by_category(records).items()}


def mix(new_paths: Iterable[PathLike], replay_paths: Iterable[PathLike], out: PathLike,
        config: MixConfig | None = None, *, report_path: PathLike | None = None) -> MixReport:
    """Mix JSONL files into `out` and the report as JSON into `report_path` (both or neither,
    never over an input); see mix_records."""
    new_paths, replay_paths = list(new_paths), list(replay_paths)
    inputs = new_paths + replay_paths
    check_outputs(inputs, [out, report_path])
    records, report = mix_records(load_valid(new_paths), load_valid(replay_paths), config)
    with atomic_outputs(inputs=inputs, outputs=[out, report_path]) as txn:
        txn.write_jsonl(out, records)
        if report_path is not None:
            txn.write_json(report_path, report.model_dump())
    return report
