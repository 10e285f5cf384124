"""Build a training set from new data plus a replay buffer of earlier data.

Each category's quota is split between the sources by `ratio` (share of new data). Rounding is
done by largest remainder over all categories, so the total drawn from new data is
round(total * ratio) and every category is within one record of its exact share. A category
comes from the record's `category` key (e.g. "persona") or else from topics.classify.

When a source has too few records for its share, everything it has is drawn and the shortfall is
reported; the other source does not make up the difference, because that would silently break
the ratio. On the first cycle, with no replay buffer yet, use ratio=1.0.
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
    ratio: float
    seed: int
    wanted: int
    drawn: int
    draws: list[Draw]
    shortfalls: list[str]  # one explanation per source/category that could not be filled


def allocate(quotas: dict[str, int], ratio: float) -> dict[str, int]:
    """How many records of each category come from new data (largest-remainder rounding)."""
    exact = {c: q * ratio for c, q in quotas.items()}
    new = {c: math.floor(x) for c, x in exact.items()}
    extra = math.floor(sum(quotas.values()) * ratio + 0.5) - sum(new.values())
    for c in sorted(exact, key=lambda c: (new[c] - exact[c], c))[:extra]:
        new[c] += 1
    return new


def mix_records(new: list[dict], replay: list[dict], config: MixConfig | None = None) -> tuple[list[dict], MixReport]:
    """Draw the mix reproducibly (same inputs and config give the same output, in the same order)
    with the ratio, quotas and seed of `config` (default: MixConfig())."""
    cfg = config or MixConfig()
    ratio, quotas = cfg.new_ratio, cfg.quotas
    rng = random.Random(cfg.seed)
    pools = {"new": new, "replay": replay}
    by_cat = {s: {} for s in pools}
    for s, recs in pools.items():
        for r in recs:
            by_cat[s].setdefault(category(r), []).append(r)
    new_share = allocate(quotas, ratio)
    out, draws, shortfalls = [], [], []
    for cat, quota in quotas.items():
        for s, wanted in (("new", new_share[cat]), ("replay", quota - new_share[cat])):
            pool = by_cat[s].get(cat, [])
            picked = rng.sample(pool, min(wanted, len(pool)))
            out += picked
            draws.append(Draw(category=cat, source=s, wanted=wanted, available=len(pool), drawn=len(picked)))
            if len(picked) < wanted:
                shortfalls.append(f"{cat} from {s}: wanted {wanted}, only {len(pool)} available "
                                  f"({wanted - len(picked)} short); add {s} {cat} data or lower the quota")
    rng.shuffle(out)
    report = MixReport(ratio=ratio, seed=cfg.seed, wanted=sum(quotas.values()), drawn=len(out),
                       draws=draws, shortfalls=shortfalls)
    return out, report


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
