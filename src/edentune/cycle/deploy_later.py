"""A round without Ollama at hand: `cycle run --no-deploy` stops after the gate and the export, and
`cycle deploy WS [--round R]` deploys such a round later (on this machine or another one that has
the workspace), with the gate re-checked.

A unit (persona or shared adapter) is *accepted, not deployed* when its run is accepted (gate
passed, export done) and no deploy step is recorded for it. The next round builds on it as it
would on a live round (`standing_round`): it continues its adapter, must beat its validation loss,
and mixes in its records from the replay buffer, so a month trained without Ollama is not lost
for the months after it. `cycle deploy` then runs the round's own deploy and live steps
(`round.deploy_unit`), so the registry of a round deployed later is that of a round deployed at
once: the same steps, the same deploy records, the same live row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..errors import EdentuneError
from ..registry import SHARED, Registry
from .pending import not_deployed, pending_rounds
from .workspace import Workspace, load_workspace


@dataclass
class DeployedUnit:
    round_id: str
    unit: str
    models: list[str]
    host: str


def deploy_round(ws_dir: str | Path, round_id: str | None = None, *, host: str | None = None, client=None,
                 console: Console | None = None) -> list[DeployedUnit]:
    """Deploy a round that `cycle run --no-deploy` accepted (default: the newest such round).
    Checked before Ollama is touched, for every unit: the run was accepted and not deployed, it is
    not older than the live round, its export and comparison are on disk and the comparison still
    says ship for the exported adapter (the deploy gate, re-checked), and Ollama answers with the
    base. Then each unit's deploy and live steps run as in a round."""
    from ..export.deploy import check_base
    from ..export.ollama import ollama_host
    from .live import _check, _frozen_config
    from .round import _Steps, deploy_unit

    console = console or Console(stderr=True)
    ws = load_workspace(ws_dir)
    with ws.open_registry() as reg:
        round_id = round_id or _default_round(ws, reg)
        units = _units_to_deploy(ws, reg, round_id)
        plans = []
        for unit in units:
            personas = ws.persona_names if unit == SHARED else [unit]
            for p in personas:
                _check(ws, reg, round_id, p)  # accepted, export and comparison on disk, gate re-checked
                _not_older_than_live(ws, reg, round_id, p)
            cfg = _frozen_config(ws, round_id, unit)
            unit_host = ollama_host(cfg, host or ws.config.ollama.host)
            try:
                check_base(cfg, host=unit_host, client=client)  # Ollama answers and has the base: checked here, not at `run`
            except EdentuneError as err:
                raise EdentuneError(f"{err.args[0]}; nothing was deployed", hint=err.hint) from None
            plans.append((unit, personas, cfg, unit_host))
        done = []
        for unit, personas, cfg, unit_host in plans:
            steps = _Steps(ws, reg, round_id, console)
            exp = reg.step(round_id, unit, "export")
            export_dir = ws.export_dir(round_id, unit)
            models = deploy_unit(ws, steps, unit, cfg, personas, export_dir, exp, unit_host, client)
            reg.set_run(round_id, unit, status="accepted", export_dir=str(export_dir))
            done.append(DeployedUnit(round_id, unit, models, unit_host))
    return done


def _default_round(ws: Workspace, reg: Registry) -> str:
    pending = pending_rounds(reg)
    if not pending:
        raise EdentuneError(f"no round in {ws.dir} is waiting to be deployed",
                            hint="`edentune cycle run DIR --new FILE --no-deploy` makes one; `edentune cycle status DIR` shows the rounds")
    return pending[-1]


def _units_to_deploy(ws: Workspace, reg: Registry, round_id: str) -> list[str]:
    rnd = reg.round(round_id)
    if rnd is None:
        raise EdentuneError(f"no round {round_id!r} in {ws.dir}", hint="`edentune cycle status DIR` lists the rounds")
    runs = reg.runs(round_id)
    units = [run.persona for run in runs if not_deployed(reg, round_id, run.persona)]
    if units:
        return units
    if rnd.status == "running":
        raise EdentuneError(f"round {round_id} is not finished", hint=f"finish it first: edentune cycle run {ws.dir} --new ... --no-deploy")
    if any(run.status == "accepted" for run in runs):
        raise EdentuneError(f"round {round_id} is deployed already",
                            hint=f"to make it live again: edentune cycle rollback {ws.dir} --to {round_id}")
    reasons = "; ".join(f"{run.persona}: {run.status}" + (f" ({'; '.join(map(str, run.reasons))})" if run.reasons else "")
                        for run in runs) or rnd.status
    raise EdentuneError(f"round {round_id} has nothing to deploy: {reasons}",
                        hint="only a round the gate accepted can be deployed; `edentune cycle status DIR` shows why")


def _not_older_than_live(ws: Workspace, reg: Registry, round_id: str, persona: str) -> None:
    live = reg.live(persona)
    if live is None:
        return
    seqs = {r.id: r.seq for r in reg.rounds()}
    if seqs[round_id] < seqs[live.round_id]:
        raise EdentuneError(f"round {round_id} is older than {persona}'s live round {live.round_id}",
                            hint=f"to go back to it: edentune cycle rollback {ws.dir} --to {round_id}")
