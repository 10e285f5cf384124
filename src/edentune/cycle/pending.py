"""Which rounds are accepted but not deployed (`cycle run --no-deploy`), and which round the next
one builds on. Read by the round runner, `cycle deploy` (deploy_later.py) and `cycle status`."""

from __future__ import annotations

from ..registry import SHARED, Registry


DEPLOY_EVENTS = ("deploy", "rollback")  # a round with one of these went to Ollama (also in registries older than deploy steps)


def not_deployed(reg: Registry, round_id: str, unit: str) -> bool:
    run = reg.run(round_id, unit)
    return (run is not None and run.status == "accepted" and reg.step(round_id, unit, "deploy") is None
            and not any(e.kind in DEPLOY_EVENTS for e in reg.events(round_id)))


def _unit_for(reg: Registry, round_id: str, persona: str) -> str | None:
    for unit in (persona, SHARED):
        if reg.run(round_id, unit) is not None:
            return unit
    return None


def standing_round(reg: Registry, persona: str) -> str | None:
    """The round the next one builds on for `persona`: the newest round accepted but not deployed
    that is newer than the live round, else the live round (None: the base)."""
    live = reg.live(persona)
    seqs = {r.id: r.seq for r in reg.rounds()}
    live_seq = seqs.get(live.round_id, 0) if live else 0
    pending = [r.id for r in reg.rounds() if r.seq > live_seq
               and (unit := _unit_for(reg, r.id, persona)) is not None and not_deployed(reg, r.id, unit)]
    if pending:
        return pending[-1]
    return live.round_id if live else None


def pending_rounds(reg: Registry) -> list[str]:
    """Rounds with a unit accepted but not deployed, oldest first."""
    return [r.id for r in reg.rounds() if any(not_deployed(reg, r.id, run.persona) for run in reg.runs(r.id))]
