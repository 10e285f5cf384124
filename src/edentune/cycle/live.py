"""`cycle rollback`: make any earlier accepted round live again in Ollama.

Unlike `edentune deploy --rollback` (which only knows `<model>:previous`), this re-deploys the
chosen round's own export with its frozen config, so every accepted month stays one command away.
Everything is checked before Ollama is touched: the round was accepted, its export is still on
disk, and the round's comparison.json still says ship for the very adapter in that export (the
deploy gate, re-checked: only a model that once passed can come back). The registry records the
new live round and a "rollback" event only after the deploy succeeded, one transaction per persona.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, load_config
from ..errors import EdentuneError
from ..export.api import REPORT_NAME, load_export
from ..export.gate import check_gate
from ..export.ollama import full_name, ollama_host
from ..registry import SHARED, Registry, RunRow
from .lock import holds_workspace_lock
from .workspace import Workspace, load_workspace


@dataclass
class _Target:
    persona: str
    round_id: str
    run: RunRow
    from_round: str | None


def _run_for(reg: Registry, round_id: str, persona: str) -> RunRow | None:
    return reg.run(round_id, persona) or reg.run(round_id, SHARED)


def _check(ws: Workspace, reg: Registry, round_id: str, persona: str) -> RunRow:
    """Everything that can be checked without Ollama; raises with the reason."""
    if reg.round(round_id) is None:
        raise EdentuneError(f"no round {round_id!r} in {ws.dir}", hint="`edentune cycle status DIR` lists the rounds")
    run = _run_for(reg, round_id, persona)
    if run is None:
        raise EdentuneError(f"round {round_id} has no run for persona {persona!r}", hint="pick another round with --to")
    if run.status != "accepted":
        why = f" ({'; '.join(map(str, run.reasons))})" if run.reasons else ""
        raise EdentuneError(f"round {round_id} was {run.status} for {persona}{why}: only an accepted round can be made live",
                            hint="`edentune cycle status DIR` shows which rounds were accepted")
    if not run.export_dir or not (Path(run.export_dir) / REPORT_NAME).is_file():
        raise EdentuneError(f"the export of round {round_id} ({run.export_dir or 'none recorded'}) is gone",
                            hint="an accepted round can only be made live again while its export folder exists")
    comparison = _comparison(ws, round_id, run.persona)
    if not comparison.is_file():
        raise EdentuneError(f"the comparison of round {round_id} ({comparison}) is gone: its deploy gate cannot be re-checked",
                            hint="an accepted round can only be made live again while its eval folder exists")
    report = load_export(run.export_dir)
    check_gate(comparison, report, _frozen_config(ws, round_id, run.persona))  # its files are re-hashed by the deploy itself
    model = ws.ollama_model(persona)
    if report.get("models") and full_name(model) not in {full_name(m) for m in report["models"]}:
        raise EdentuneError(f"the export of round {round_id} has no Ollama model {model} for persona {persona} "
                            f"(it has {', '.join(report['models'])})",
                            hint="the persona's ollama_model changed since that round; put the old name back in cycle.yaml to roll back")
    return run


def _comparison(ws: Workspace, round_id: str, unit: str) -> Path:
    return ws.eval_dir(round_id, unit) / "comparison.json"


def _default_target(ws: Workspace, reg: Registry, persona: str) -> str:
    live = reg.live(persona)
    if live is None:
        raise EdentuneError(f"persona {persona!r} has no live round to roll back from", hint="use --to ROUND to choose one")
    seqs = {r.id: r.seq for r in reg.rounds()}
    earlier = [r.id for r in reg.rounds() if r.seq < seqs[live.round_id]
               and (run := _run_for(reg, r.id, persona)) is not None and run.status == "accepted"]
    if not earlier:
        raise EdentuneError(f"no accepted round before {live.round_id} for persona {persona!r}", hint="use --to ROUND to choose one")
    return earlier[-1]


def _frozen_config(ws: Workspace, round_id: str, unit: str) -> RunConfig:
    """The RunConfig the round used (frozen in its folder); rebuilt from the workspace if that file is gone."""
    path = ws.frozen_config_path(round_id, unit)
    return load_config(path) if path.is_file() else ws.round_config(round_id, unit)


@holds_workspace_lock("cycle rollback")  # never beside a running round (cycle/lock.py)
def rollback(ws_dir: str | Path, to_round: str | None = None, persona: str | None = None, *,
             host: str | None = None, client=None) -> list[dict]:
    """Make `to_round` (default: the accepted round before the live one) live again for `persona`
    (default: every persona that has a live round, or every persona of `to_round`). Returns the
    deploy records, each with the persona and the round."""
    ws = load_workspace(ws_dir)
    personas = [ws.persona(persona).name] if persona else ws.persona_names
    with ws.open_registry() as reg:
        if to_round is None and not persona:
            personas = [p for p in personas if reg.live(p) is not None]
            if not personas:
                raise EdentuneError("nothing is live yet: there is no round to roll back from", hint="use --to ROUND to choose one")
        elif not persona:  # --to without --persona: the personas that took part in that round
            personas = [p for p in personas if _run_for(reg, to_round, p) is not None] or personas
        targets = []
        for p in personas:
            round_id = to_round or _default_target(ws, reg, p)
            live = reg.live(p)
            targets.append(_Target(p, round_id, _check(ws, reg, round_id, p), live.round_id if live else None))

        records, deployed = [], {}
        for t in targets:
            unit = t.run.persona  # the persona itself, or "shared" (one export holds every persona's model)
            key = (t.round_id, unit)
            if key not in deployed:
                from .round import deploy_export  # the round runner's deploy path: one way to deploy in the cycle

                cfg = _frozen_config(ws, t.round_id, unit)
                deployed[key] = deploy_export(cfg, Path(t.run.export_dir), host=ollama_host(cfg, host or ws.config.ollama.host),
                                              client=client, gate=_comparison(ws, t.round_id, unit))
            model = ws.ollama_model(t.persona)
            # Exports older than the model map hold one model, whatever its name.
            rec = next((r for r in deployed[key] if r.get("model") == full_name(model)), deployed[key][0])
            detail = {"from_round": t.from_round, "export_dir": t.run.export_dir, "deploy": rec}
            reg.set_live(t.persona, t.round_id, model, event="rollback", detail=detail)
            records.append(rec | {"persona": t.persona, "round_id": t.round_id, "from_round": t.from_round})
    return records


# -- ollama.replace: the app's tag ------------------------------------------------------------------

def _deploy_records(detail: dict) -> list[dict]:
    """The deploy records an event holds: a round's deploy (`records`) or a rollback (`deploy`)."""
    recs = detail.get("records") or ([detail["deploy"]] if isinstance(detail.get("deploy"), dict) else [])
    return [r for r in recs if isinstance(r, dict)]


def replacement_status(ws_dir: str | Path, *, client=None) -> list[dict]:
    """Is each tag the cycle replaced (ollama.replace) still what it deployed there? One entry per
    replaced tag, from the latest deploy/rollback event: `state` unchanged | original | changed |
    missing | unknown (see export.replace.replacement_drift), with the persona. Asks Ollama only
    when the registry holds such a deploy (5 s timeout; Ollama down is `unknown`, not an error)."""
    from ..export.replace import replacement_drift
    from ..registry import REGISTRY_NAME

    # The registry only, like the rest of `cycle status`: it works while cycle.yaml is broken.
    with Registry(Path(ws_dir).expanduser() / REGISTRY_NAME, readonly=True) as reg:
        latest: dict[str, list[dict]] = {}
        for ev in reg.events():
            if ev.kind in ("deploy", "rollback") and ev.persona and (recs := _deploy_records(ev.detail)):
                latest[ev.persona] = recs
    return [d | {"persona": p} for p, recs in latest.items() for d in replacement_drift(recs, client=client)]


def restore_original(ws_dir: str | Path, *, host: str | None = None, client=None) -> dict:
    """`cycle rollback --original`: the model the first replace kept (TAG-edentune-original) back
    under ollama.replace's tag, recorded as a rollback event (the app then talks to the stock model)."""
    from ..export import replace

    ws = load_workspace(ws_dir)
    tag = ws.config.ollama.replace
    if not tag:
        raise EdentuneError(f"{ws.config_path}: ollama.replace is not set, so no original was kept",
                            hint="`edentune cycle rollback DIR --to ROUND` makes an earlier round live")
    with ws.open_registry() as reg:  # opened for writing before Ollama is touched
        cfg = ws.config.run
        rec = replace.restore_original(cfg, tag, host=ollama_host(cfg, host or ws.config.ollama.host), client=client)
        rec["replace"] = {"tag": full_name(tag), "backup": rec["restored_from"], "digest": rec["digest"]}
        persona = ws.persona_names[0]
        reg.record_event("rollback", persona=persona, model=full_name(tag), detail={"records": [rec], "restored": "original"})
    return rec | {"persona": persona}
