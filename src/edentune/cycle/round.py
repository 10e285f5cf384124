"""One month of the cycle: `run_round(ws_dir, new_files)`, resumable step by step.

    shared:       ingest -> clean -> fixed (validation / forgetting sets) -> replay (buffer of accepted rounds)
                  [-> feedback, with --feedback]
    per persona:  select -> mix -> sft -> [preference] -> evaluate -> gate -> export -> deploy -> live
    (shared adapter mode: one unit named "shared" trains one adapter and deploys one model per persona)

Every step records in the registry the sha256 of its inputs (files and the frozen config it
used) and of its outputs, after the outputs are in place (each written atomically). A rerun
skips a step whose inputs are unchanged and whose outputs still have the recorded hashes, and
redoes it (and everything after it) otherwise; training resumes from its last checkpoint. So a
round killed at any moment continues where it stopped, and a finished step is never redone.

The gate ships a candidate only if its validation loss (log of its perplexity on the fixed
validation set, measured by the evaluate stage) beats the live round's on the same set AND
`compare` says ship (no metric worse beyond noise: paired tests over the same cases; forgetting
within `evaluation.max_forgetting`) AND its forgetting against the original base stays within
`gate.max_cumulative_forgetting` (cycle/forgetting.py). A refused round is recorded with its
reasons; nothing is exported or deployed, so the live model is untouched.

Stage calls that other parts of edentune are reshaping go through one small wrapper each
(`_evaluate`, `_compare`, `_write_reports`, `_export`, `deploy_export`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ..config import RunConfig, render_config_yaml
from ..errors import DataError, EdentuneError
from ..io import file_sha256, write_json_atomic, write_jsonl_atomic, write_text_atomic
from ..registry import SHARED, Registry, StepRecord, now
from . import human
from .lock import holds_workspace_lock
from .pending import standing_round
from .workspace import Workspace, check_round_id, load_workspace

INPUTS_MARKER = ".edentune-inputs"  # in a training run folder: which inputs its checkpoints belong to


@dataclass
class UnitResult:
    """One adapter's outcome: a persona (per_persona mode) or the shared adapter."""

    unit: str
    status: str  # accepted | refused | skipped
    ship: bool = False
    reasons: list[str] = field(default_factory=list)
    val_loss: float | None = None  # candidate, log(perplexity) on the fixed validation set
    live_val_loss: float | None = None  # what it had to beat (live round, or the base in round 1)
    adapter_sha256: str | None = None
    export_dir: Path | None = None
    models: list[str] = field(default_factory=list)  # Ollama models made live


@dataclass
class RoundResult:
    round_id: str
    seq: int
    status: str  # accepted (at least one unit deployed) | refused | waiting (for the user: review, blind picks)
    units: list[UnitResult]
    seconds: float
    step_seconds: dict[str, float] = field(default_factory=dict)  # "unit/step" -> seconds spent in this call


# -- stage wrappers (one place to switch when the stage APIs change) -----------------------------
def _evaluate(cfg: RunConfig, adapter: Path | None, suite, validation: list, forgetting: list):
    from ..evaluate.backends import backend_from_spec
    from ..evaluate.runner import evaluate

    backend = backend_from_spec(str(adapter) if adapter else "base", cfg)
    return evaluate(cfg, backend, suite, validation=validation, replay=forgetting)


def _compare(baseline, candidate, cfg: RunConfig, metrics_jsonl: Path | None):
    from ..evaluate.compare import compare

    return compare(baseline, candidate, cfg, metrics_jsonl=metrics_jsonl if metrics_jsonl and metrics_jsonl.exists() else None)


def _write_reports(comparison, out_dir: Path, baseline, candidate) -> dict[str, Path]:
    from ..evaluate.report import write_reports

    return write_reports(comparison, out_dir, base=baseline, candidate=candidate)


def _export(cfg: RunConfig, adapter: Path, out_dir: Path):
    from ..export.api import export_adapter

    return export_adapter(cfg, adapter, out_dir, verify=cfg.export.verify)


def deploy_export(cfg: RunConfig, export_dir: Path, *, host: str, client=None, gate: Path | None = None) -> list[dict]:
    """Create the export's models in Ollama (with `gate`, re-checked against the exported adapter);
    returns the deploy records, which the caller stores in the registry."""
    from ..export.deploy import deploy

    return deploy(cfg, export_dir, host=host, gate=gate, client=client)


def _log_round(ws: Workspace, reg: Registry, round_id: str) -> None:
    from .tracking import log_round

    log_round(ws, reg, round_id)


def _ollama_preflight(cfg: RunConfig, host: str, client) -> None:
    """Before a round starts: Ollama answers and has the base, so hours of training do not end in
    a deploy that cannot happen."""
    from ..export.deploy import check_base

    try:
        check_base(cfg, host=host, client=client)
    except EdentuneError as err:
        raise EdentuneError(f"{err.args[0]}; nothing was started", hint=err.hint) from None


# -- hashing and step bookkeeping ----------------------------------------------------------------
def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _sha(obj) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()


def _file_hash(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


class _Steps:
    """Runs a step unless the registry shows it done with the same inputs and intact outputs."""

    def __init__(self, ws: Workspace, reg: Registry, round_id: str, console: Console):
        self.ws, self.reg, self.round_id, self.console = ws, reg, round_id, console
        self.seconds: dict[str, float] = {}

    def _rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.ws.dir))

    def done(self, unit: str, step: str, inputs_sha: str) -> StepRecord | None:
        rec = self.reg.step(self.round_id, unit, step)
        if rec is None or rec.inputs_sha256 != inputs_sha:
            return None
        for rel, sha in rec.outputs.items():
            if _file_hash(self.ws.dir / rel) != sha:
                return None
        return rec

    def run(self, unit: str, step: str, inputs: dict, fn: Callable[[], tuple[list[Path], dict]]) -> StepRecord:
        """`inputs`: everything the step's result depends on (file hashes, config); `fn` returns the
        output files (already in place) and a JSON detail."""
        inputs_sha = _sha({"step": step, **inputs})
        rec = self.done(unit, step, inputs_sha)
        if rec is not None:
            self.console.print(f"[dim]{unit} {step}: done earlier, kept[/]")
            return rec
        # Changed inputs or damaged outputs: this step and everything recorded after it are stale.
        self.reg.forget_steps(self.round_id, unit, step)
        self.console.rule(f"{self.round_id} · {unit} · {step}")
        started, t0 = now(), time.perf_counter()
        outputs, detail = fn()
        seconds = round(time.perf_counter() - t0, 2)
        self.seconds[f"{unit}/{step}"] = seconds
        self.reg.record_step(self.round_id, unit, step, inputs_sha256=inputs_sha,
                             outputs={self._rel(p): file_sha256(p) for p in outputs},
                             detail={**detail, "seconds": seconds}, started=started)
        return self.reg.step(self.round_id, unit, step)


# -- the round -----------------------------------------------------------------------------------
@holds_workspace_lock("cycle run")  # one round per workspace at a time (cycle/lock.py)
def run_round(ws_dir: str | Path, new_files: list[str | Path], *, feedback: list[str | Path] | str | Path | None = None,
              round_id: str | None = None, console: Console | None = None, client=None, host: str | None = None,
              deploy: bool = True) -> RoundResult:
    """Run (or continue) one round on `new_files` (any supported chat format) and, optionally,
    thumbs up/down `feedback` files. Without `round_id`, a round left unfinished (crash, Ctrl-C)
    is continued; otherwise a new one is named after the month. `host`: the Ollama URL for this
    round (`--host`), over the workspace's. `deploy=False` stops after the gate and the export
    (no Ollama needed): the round is accepted, not deployed, and `edentune cycle deploy`
    (deploy_later.py) deploys it later."""
    from ..export.ollama import ollama_host

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    ws = load_workspace(ws_dir)  # a config with errors stops here, before anything is written
    new_files = [Path(f).expanduser().resolve() for f in new_files]
    feedback_files = [Path(f).expanduser().resolve() for f in ([feedback] if isinstance(feedback, (str, Path)) else feedback or [])]
    _check_inputs(new_files, feedback_files, ws.config.run.preference.method)
    template = ws.round_config("preflight", ws.training_units()[0])
    host = ollama_host(template, host)
    if deploy:
        _ollama_preflight(template, host, client)

    with ws.open_registry() as reg:
        round_id = _pick_round(reg, round_id, console, new_files)
        seq = reg.begin_round(round_id, ws.config.model_dump(mode="json"))
        steps = _Steps(ws, reg, round_id, console)
        console.print(f"round [bold]{round_id}[/] (#{seq}) in {escape(str(ws.dir))}")
        feedback_files = [*feedback_files, *human.previous_round_feedback(ws, reg, round_id)]  # last round's blind picks
        usable, replay = _shared_steps(ws, steps, new_files)
        waiting = [w] if (w := human.review_wait(ws, reg, round_id)) else []
        kto = _feedback_step(ws, steps, feedback_files) if feedback_files and not waiting else None
        units = []
        for unit in [] if waiting else ws.training_units():
            try:
                units.append(_unit_steps(ws, steps, unit, usable, replay, kto, host, client, deploy))
            except human.HumanWait as wait:
                waiting.append(str(wait))
            except (EdentuneError, OSError) as err:
                error = _user_error(err, unit, steps)
                reg.set_run(round_id, unit, status="failed", reasons=[str(error).splitlines()[0]])
                reg.record_event("error", round_id=round_id, persona=unit, detail={"error": str(error)})
                raise error from None
        if waiting:  # the round stays unfinished: the next `cycle run` continues it
            for line in waiting:
                console.print(line, markup=False, highlight=False)
            return RoundResult(round_id, seq, "waiting", units, round(time.perf_counter() - t0, 1), steps.seconds)
        accepted = any(u.status == "accepted" for u in units)
        reg.finish_round(round_id, "accepted" if accepted else "refused")
        _log_round(ws, reg, round_id)
        if accepted:
            _refresh_buffer(ws, reg)  # next round mixes with this one's data (each round also refreshes it first)
    result = RoundResult(round_id, seq, "accepted" if accepted else "refused", units, round(time.perf_counter() - t0, 1), steps.seconds)
    for u in units:
        console.print(f"{u.unit}: [bold]{u.status}[/]" + escape((f" — {'; '.join(u.reasons)}" if u.reasons else "")
                                                              + (f" → {', '.join(u.models)}" if u.models else "")))
    return result


def _check_inputs(new_files: list[Path], feedback_files: list[Path], method: str) -> None:
    """Refuse before the round starts: missing files, new files without one usable conversation,
    or feedback the preference step (`method`) could not learn from: every input is checked
    before the first expensive step."""
    from ..data.convert import convert
    from ..data.feedback import feedback_problem

    if not new_files:
        raise DataError("no new data given", hint="pass this month's conversations with --new FILE.jsonl")
    for f in [*new_files, *feedback_files]:
        if not f.is_file():
            raise DataError(f"{f}: no such file", hint="check the path; nothing was started")
    records, report = convert(new_files)
    if not records:
        reasons = ", ".join(f"{r} ({n})" for r, n in list(report.reasons.items())[:3])
        raise DataError(f"{', '.join(map(str, new_files))}: no usable conversation in {report.lines} line(s)"
                        + (f": {reasons}" if reasons else ""),
                        hint="pass ChatML, alpaca, sharegpt or OpenAI chat JSONL (`edentune data validate FILE` shows each problem); nothing was started")
    if feedback_files and (problem := feedback_problem(feedback_files, method)):
        raise DataError(problem, hint="pass thumbs up/down JSONL (`edentune data feedback FILE -o DIR` shows each line's problem); "
                                      "nothing was started")


def _pick_round(reg: Registry, round_id: str | None, console: Console, new_files: list[Path]) -> str:
    """The round to run. Without `round_id`: a new one named after the month, unless rounds are
    left `running` (a run that failed, was killed, or ran beside another): one of those is
    continued only when it is unambiguous (exactly one, ingested from these very files); anything
    else is refused with what is unfinished and what to do, never filed over with a new month."""
    running = [r for r in reg.rounds() if r.status == "running"]
    if round_id is not None:
        others = [r.id for r in running if r.id != round_id]
        if others:
            console.print(f"note: round(s) {', '.join(others)} are still unfinished", markup=False)
        return check_round_id(round_id)
    if not running:
        return reg.next_round_id()
    ingest_sha = _sha({"step": "ingest", "files": {str(f): file_sha256(f) for f in new_files}})
    ingested = {r.id: reg.step(r.id, SHARED, "ingest") for r in running}
    if len(running) == 1 and ((rec := ingested[running[0].id]) is None or rec.inputs_sha256 == ingest_sha):
        console.print(f"continuing the unfinished round {running[0].id} (started {running[0].created})", markup=False)
        return running[0].id

    def describe(r) -> str:
        rec, failed = ingested[r.id], [run.persona for run in reg.runs(r.id) if run.status == "failed"]
        files = ", ".join(rec.detail.get("files") or []) if rec is not None else "nothing ingested yet"
        return f"{r.id} (started {r.created}, new data: {files}{'; failed: ' + ', '.join(failed) if failed else ''})"

    ids = [r.id for r in running]
    raise EdentuneError(
        f"unfinished round{'s' if len(running) > 1 else ''} {'; '.join(describe(r) for r in running)}: "
        + ("more than one round is unfinished" if len(running) > 1 else "this run's --new files are not the ones it ingested")
        + ", so edentune does not guess which to continue or start a new round over it",
        hint=f"continue one with `edentune cycle run DIR --round {ids[-1]} --new ...` (other --new files redo its data and training), "
             "or start another round beside it with --round NEW_ID; nothing was changed")


def _user_error(err: Exception, unit: str, steps: _Steps) -> EdentuneError:
    if isinstance(err, EdentuneError):
        return err
    if getattr(err, "errno", None) == errno.ENOSPC:
        return EdentuneError(f"{unit}: the disk is full ({getattr(err, 'filename', None) or steps.ws.dir})",
                             hint="free some space and run `edentune cycle run` again: it continues at the step that failed; "
                                  "the live model was not changed")
    return EdentuneError(f"{unit}: {err.strerror or err} ({getattr(err, 'filename', '') or ''})",
                         hint="fix the cause and run `edentune cycle run` again: it continues at the step that failed")


# -- shared steps --------------------------------------------------------------------------------
def _shared_steps(ws: Workspace, steps: _Steps, new_files: list[Path]) -> tuple[Path, Path]:
    """Returns the round's usable new records and its replay snapshot."""
    from ..data.clean import clean, dedup_key
    from ..data.convert import convert
    from ..data.validate import load_valid

    data = ws.shared_data_dir(steps.round_id)
    ingested, clean_file, usable = data / "ingested.jsonl", data / "clean.jsonl", data / "usable.jsonl"
    cc = ws.config.run.data.clean

    def ingest():
        records, report = convert(new_files, write=ingested, quarantine=data / "ingest_quarantine.jsonl")
        return [ingested, data / "ingest_quarantine.jsonl"], {"lines": report.lines, "kept": len(records),
                                                               "quarantined": report.quarantined, "files": [str(f) for f in new_files]}

    steps.run(SHARED, "ingest", {"files": {str(f): file_sha256(f) for f in new_files}}, ingest)

    def clean_step():
        records, report = clean([ingested], write=clean_file, quarantine=data / "clean_quarantine.jsonl", config=cc)
        if not records:
            raise DataError(f"nothing is left after cleaning ({report.summary()})", hint=f"see {data / 'clean_quarantine.jsonl'}")
        return [clean_file, data / "clean_quarantine.jsonl"], {"kept": len(records), "quarantined": report.quarantined,
                                                               "reasons": report.reasons}

    steps.run(SHARED, "clean", {"ingested": file_sha256(ingested), "clean": cc.model_dump()}, clean_step)

    # The fixed sets are made once (first round) and never rewritten: every round is measured on
    # the same data. Their records never train and never enter the replay buffer.
    sources = {"validation": {str(f): file_sha256(f) for f in ws.validation_sources()},
               "forgetting": {str(f): file_sha256(f) for f in ws.forgetting_sources()}}

    def fixed():
        from .validation import size_validation

        records = load_valid([clean_file])
        made = {}
        # The validation set: frozen, given as files, or split off the first round; below its
        # minimum size (after the length filter) it grows from this month's data (cycle/validation.py).
        first = not ws.validation_path.exists()
        current = (load_valid(ws.validation_sources()) if ws.validation_sources() else []) if first else load_valid([ws.validation_path])
        split = ws.config.validation.fraction if first and not ws.validation_sources() else 0.0
        val, records, size = size_validation(ws.round_config(steps.round_id, ws.training_units()[0]), ws.config.validation,
                                             current, records, split)
        if not val:
            raise DataError(f"the fixed validation set would be empty ({len(records)} clean records, fraction "
                            f"{ws.config.validation.fraction}, {size.dropped_for_length} longer than max_seq_len)",
                            hint="raise validation.fraction or give validation.files in cycle.yaml")
        if first or val != current:
            write_jsonl_atomic(ws.validation_path, val)
            made["validation"] = len(val)
        if size.warning():
            steps.console.print(f"[yellow]validation[/]: {escape(size.warning())}")
        if not ws.forgetting_path.exists():
            made["forgetting"] = write_jsonl_atomic(ws.forgetting_path, load_valid(ws.forgetting_sources()))
        held_out = {dedup_key(r) for r in load_valid([ws.validation_path, ws.forgetting_path])}
        kept = [r for r in records if dedup_key(r) not in held_out]
        write_jsonl_atomic(usable, kept)
        return [usable, ws.validation_path, ws.forgetting_path], {"usable": len(kept), "dropped_as_fixed": len(records) - len(kept),
                                                                  "created": made, "validation": size.to_json()}

    # (The frozen files are outputs, not inputs: their recorded hashes catch any later change.)
    steps.run(SHARED, "fixed", {"clean": file_sha256(clean_file), "sources": sources,
                                "fraction": ws.config.validation.fraction, "policy": ws.config.validation.model_dump(),
                                "model": ws.config.run.model.model_dump()}, fixed)
    # The replay buffer as this round mixes it: data of the accepted rounds before this one, kept as
    # a snapshot in the round (the workspace buffer moves on when this round is accepted).
    seq = steps.reg.round(steps.round_id).seq
    seqs = {r.id: r.seq for r in steps.reg.rounds()}
    earlier = sorted((r.round_id, r.persona) for r in steps.reg.runs() if r.status == "accepted" and seqs[r.round_id] < seq)
    replay = data / "replay.jsonl"
    steps.run(SHARED, "replay", {"accepted": earlier, "replay": ws.config.replay.model_dump(),
                                 "fixed": [_file_hash(ws.validation_path), _file_hash(ws.forgetting_path)]},
              lambda: _snapshot_buffer(ws, steps.reg, replay))
    return usable, replay


def _snapshot_buffer(ws: Workspace, reg: Registry, out: Path) -> tuple[list[Path], dict]:
    from ..data.validate import load_valid

    report = _refresh_buffer(ws, reg)
    records = load_valid([ws.buffer_path]) if ws.buffer_path.exists() else []
    write_jsonl_atomic(out, records)
    return [out], {"records": len(records), "buffer": _jsonable(report)}


def _refresh_buffer(ws: Workspace, reg: Registry):
    from .replay import update_buffer

    return update_buffer(ws, reg)


def _jsonable(obj):
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return json.loads(_canonical(asdict(obj)))
    return json.loads(_canonical(obj))


def _feedback_step(ws: Workspace, steps: _Steps, feedback_files: list[Path]) -> Path:
    from ..data.feedback import prepare_feedback

    out = ws.round_dir(steps.round_id, SHARED) / "feedback"

    def prepare():
        result = prepare_feedback(feedback_files, out)
        for w in result.warnings:
            steps.console.print(f"[yellow]feedback[/]: {escape(w)}")
        return list(result.paths.values()), {"desirable": result.desirable, "undesirable": result.undesirable,
                                             "pairs": result.pairs, "warnings": result.warnings}

    steps.run(SHARED, "feedback", {"files": {str(f): file_sha256(f) for f in feedback_files}}, prepare)
    return out


# -- per unit (persona, or the shared adapter) ---------------------------------------------------
def _unit_steps(ws: Workspace, steps: _Steps, unit: str, usable: Path, replay: Path, feedback_dir: Path | None,
                host: str, client, deploy: bool = True) -> UnitResult:
    reg, round_id = steps.reg, steps.round_id
    cfg = ws.round_config(round_id, unit)
    frozen = ws.frozen_config_path(round_id, unit)
    text = render_config_yaml(cfg)
    if not frozen.exists() or frozen.read_text(encoding="utf-8") != text:
        write_text_atomic(frozen, text)
    cfg_sha = file_sha256(frozen)
    personas = ws.persona_names if unit == SHARED else [unit]
    # What this round builds on is fixed when it starts: a rerun after this round went live (or
    # after a rollback) must not change the inputs of finished steps.
    run = reg.run(round_id, unit)
    if run is not None and "live_at_start" in run.metrics:
        live_round = run.metrics["live_at_start"]
    else:
        live_round = standing_round(reg, personas[0])  # the live round, or a newer one accepted but not deployed
    reg.set_run(round_id, unit, status="running", metrics={"live_at_start": live_round})
    live_adapter = _round_adapter(ws, reg, live_round, personas)

    # select: this unit's new records (a record-field filter, or its own files)
    new_file = ws.new_data_path(round_id, unit)
    sel = steps.run(unit, "select", {"usable": file_sha256(usable), "persona": _persona_selection(ws, unit),
                                     **human.select_inputs(ws, reg, round_id)},
                    lambda: _select(ws, unit, usable, new_file, human.review_filter(ws, reg, round_id)))
    if sel.detail["records"] == 0:
        reasons = [f"no new records for {unit} this round ({sel.detail['rule']})"]
        reg.set_run(round_id, unit, status="skipped", reasons=reasons)
        return UnitResult(unit, "skipped", reasons=reasons)

    # mix: new data with the replay buffer (everything new while the buffer is empty)
    train_file = ws.train_data_path(round_id, unit)
    mixed = steps.run(unit, "mix", {"new": file_sha256(new_file), "buffer": file_sha256(replay),
                                    "replay": ws.config.replay.model_dump()},
                      lambda: _mix(ws, unit, new_file, replay, train_file, steps.console))

    # sft: continue the live adapter (or retrain from the base), resuming this run's checkpoints
    init_adapter = live_adapter if ws.config.continue_from == "live" else None
    sft_inputs = {"train": file_sha256(train_file), "validation": file_sha256(ws.validation_path), "config": cfg_sha,
                  "init_adapter": _adapter_identity(init_adapter)}
    sft = steps.run(unit, "sft", sft_inputs, lambda: _sft(ws, cfg, _sha({"step": "sft", **sft_inputs}), init_adapter, steps.console))
    adapter = ws.dir / sft.detail["adapter"]

    if feedback_dir is not None:
        pref_inputs = {"kto": file_sha256(feedback_dir / "kto.jsonl"), "dpo": file_sha256(feedback_dir / "dpo.jsonl"),
                       "sft": file_sha256(adapter / "adapter_model.safetensors"), "config": cfg_sha}
        pref = steps.run(unit, "preference", pref_inputs,
                         lambda: _preference(ws, cfg, feedback_dir, adapter, _sha({"step": "preference", **pref_inputs}), steps.console))
        adapter = ws.dir / pref.detail["adapter"]
    adapter_sha = file_sha256(adapter / "adapter_model.safetensors")
    reg.set_run(round_id, unit, adapter_sha256=adapter_sha,
                metrics={"train_records": mixed.detail["records"], "new_records": sel.detail["records"],
                         "replay_records": sum(n for src, n in mixed.detail["sources"].items() if src != "new"),
                         "realised_new_ratio": mixed.detail.get("realised_ratio"), **_trained_counts(sft.detail),
                         "started_from": f"round {live_round}" if init_adapter is not None else "base"})

    # evaluate: candidate and the live model (reused from the live round when measured the same way)
    eval_key = _eval_key(ws, cfg)
    ev = steps.run(unit, "evaluate", {"adapter": adapter_sha, "key": eval_key, "live": live_round,
                                      "live_adapter": _adapter_identity(live_adapter)},
                   lambda: _evaluate_step(ws, reg, cfg, round_id, unit, live_round, live_adapter, adapter, eval_key))

    # blind: the held-out user prompts answered by both models (edentune review's comparison page)
    human_inputs = {}
    if ws.config.gate.human_prompts:
        blind = steps.run(unit, "blind", {"adapter": adapter_sha, "live_adapter": _adapter_identity(live_adapter),
                                          "prompts": human.blind_sample(ws, round_id), "config": cfg_sha},
                          lambda: human.answer_blind(ws, reg, cfg, round_id, unit, live_adapter, adapter))
        hv = human.human_verdict(ws, reg, round_id, unit)  # raises HumanWait until enough pairs are picked
        human_inputs = {"blind": blind.outputs, "human": hv}

    # gate
    metrics_jsonl = ws.dir / sft.detail["run_dir"] / "metrics.jsonl"
    gate = steps.run(unit, "gate", {"evaluate": ev.outputs, "gate": ws.config.gate.model_dump(), "config": cfg_sha, **human_inputs},
                     lambda: _gate(ws, cfg, ws.eval_dir(round_id, unit), metrics_jsonl, human_inputs.get("human")))
    verdict = gate.detail
    if verdict["val_loss"] is not None and verdict["live_val_loss"] is not None:
        steps.console.print(f"{unit}: validation loss {verdict['val_loss']:.4f} (live {verdict['live_val_loss']:.4f}) on the fixed "
                            f"validation set: the figure the gate, the registry and `cycle status` use", markup=False)
    metrics = {"val_loss": verdict["val_loss"], "live_val_loss": verdict["live_val_loss"],
               "korean_consistency": verdict["korean_consistency"], **verdict["metrics"],
               "forgetting_base": verdict.get("forgetting_base")}
    result = UnitResult(unit, "refused", ship=verdict["ship"], reasons=verdict["reasons"], val_loss=verdict["val_loss"],
                        live_val_loss=verdict["live_val_loss"], adapter_sha256=adapter_sha)
    if not verdict["ship"]:
        reg.set_run(round_id, unit, status="refused", metrics=metrics, verdict=verdict, reasons=verdict["reasons"])
        return result
    reg.set_run(round_id, unit, metrics=metrics, verdict=verdict, reasons=[])

    # export (+ llama.cpp parity) -> deploy (gate re-checked against the exported adapter) -> live
    export_dir = ws.export_dir(round_id, unit)
    exp = steps.run(unit, "export", {"adapter": adapter_sha, "config": cfg_sha, "gate": gate.outputs},
                    lambda: _export_step(cfg, adapter, export_dir))
    if not deploy:
        reg.set_run(round_id, unit, status="accepted", export_dir=str(export_dir))
        result.status, result.export_dir = "accepted", export_dir
        return result
    result.models = deploy_unit(ws, steps, unit, cfg, personas, export_dir, exp, host, client)
    reg.set_run(round_id, unit, status="accepted", export_dir=str(export_dir))  # also when `live` was recorded earlier
    result.status, result.export_dir = "accepted", export_dir
    return result


def deploy_unit(ws: Workspace, steps: _Steps, unit: str, cfg: RunConfig, personas: list[str], export_dir: Path,
                exp: StepRecord, host: str, client) -> list[str]:
    """The deploy step (gate re-checked against the exported adapter) and the live step of a unit
    whose export is done; `cycle deploy` runs the same for a round that was not deployed."""
    reg, round_id = steps.reg, steps.round_id
    comparison = ws.eval_dir(round_id, unit) / "comparison.json"
    dep = steps.run(unit, "deploy", {"export": exp.outputs, "host": host},
                    lambda: _deploy_step(cfg, export_dir, comparison, host, client))
    models = {p: ws.ollama_model(p) for p in personas}

    def mark_live():
        for p, model in models.items():
            live = reg.live(p)
            if live is None or live.round_id != round_id:
                reg.set_live(p, round_id, model, event="deploy", detail={"records": dep.detail["records"], "unit": unit})
        reg.set_run(round_id, unit, status="accepted", export_dir=str(export_dir))
        return [], {"models": models}

    steps.run(unit, "live", {"deploy": dep.inputs_sha256}, mark_live)
    return list(models.values())


def _persona_selection(ws: Workspace, unit: str) -> dict:
    if unit == SHARED:
        return {"rule": "all"}
    p = ws.persona(unit)
    files = ws.persona_files(unit)
    return {"select": p.select.model_dump() if p.select else None,
            "files": {str(f): _file_hash(f) for f in files} if files is not None else None}


def _select(ws: Workspace, unit: str, usable: Path, out: Path, review=None) -> tuple[list[Path], dict]:
    from ..data.clean import clean, dedup_key
    from ..data.validate import load_valid

    records = load_valid([usable])
    rule = "all new records"
    if unit != SHARED:
        p = ws.persona(unit)
        files = ws.persona_files(unit)
        if files is not None:
            for f in files:
                if not f.is_file():
                    raise DataError(f"persona {unit}: {f}: no such file", hint="fix personas[].files in cycle.yaml")
            cc = ws.config.run.data.clean
            own, _ = clean(files, config=cc)
            held_out = {dedup_key(r) for r in load_valid([ws.validation_path, ws.forgetting_path])}
            records, rule = [r for r in own if dedup_key(r) not in held_out], f"own files {', '.join(map(str, files))}"
        if p.select is not None:
            records = [r for r in records if str(r.get(p.select.field)) == p.select.equals]
            rule = f"{p.select.field} == {p.select.equals!r}"
    if review is not None:  # the user's review decisions and the blind comparison's held-out prompts
        records = review(records)
    write_jsonl_atomic(out, records)
    return [out], {"records": len(records), "rule": rule}


def _mix(ws: Workspace, unit: str, new_file: Path, replay: Path, out: Path, console: Console) -> tuple[list[Path], dict]:
    from ..data.mix import mix_records
    from ..data.validate import load_valid

    mixc = ws.config.replay
    buffer = load_valid([replay])
    # Each persona replays its own history (the shared adapter replays everything).
    if unit != SHARED:
        buffer = [r for r in buffer if (r.get("replay_source") or {}).get("persona") == unit]
    ratio = mixc.new_ratio if buffer else 1.0
    records, report = mix_records(load_valid([new_file]), buffer, mixc.model_copy(update={"new_ratio": ratio}))
    write_jsonl_atomic(out, records)
    console.print(f"{unit} mix: {report.new} new + {report.replay} replay = {report.drawn}, "
                  f"realised {report.realised_ratio:.1%} new (configured {ratio:.0%})", markup=False)
    for short in report.shortfalls:
        console.print(f"{unit} mix: {short}", style="yellow", markup=False)
    sources = {}
    for r in records:
        src = r.get("replay_source")
        key = f"{src['round']}/{src['persona']}" if src else "new"
        sources[key] = sources.get(key, 0) + 1
    return [out], {"records": len(records), "ratio": ratio, "realised_ratio": report.realised_ratio, "new": report.new,
                   "replay": report.replay, "replay_wanted": report.replay_wanted, "sources": sources, "shortfalls": report.shortfalls}


def _final_adapter(ws: Workspace, reg: Registry, round_id: str, unit: str) -> Path | None:
    for step in ("preference", "sft"):
        rec = reg.step(round_id, unit, step)
        if rec is not None:
            return ws.dir / rec.detail["adapter"]
    return None


def _round_adapter(ws: Workspace, reg: Registry, round_id: str | None, personas: list[str]) -> Path | None:
    """The adapter a round deployed for `personas` (trained by the persona's unit or the shared one)."""
    if round_id is None:
        return None
    for unit in (personas[0], SHARED) if len(personas) == 1 else (SHARED,):
        adapter = _final_adapter(ws, reg, round_id, unit)
        if adapter is not None:
            if not (adapter / "adapter_model.safetensors").exists():
                raise EdentuneError(f"the live round {round_id}'s adapter is missing ({adapter})",
                                    hint="restore the workspace folder, or set continue_from: base in cycle.yaml")
            return adapter
    return None


def _adapter_identity(adapter: Path | None) -> str | None:
    return file_sha256(adapter / "adapter_model.safetensors") if adapter else None


def _fresh_run_dir(run_dir: Path, inputs_sha: str) -> bool:
    """Keep a run folder only if its checkpoints were made from these inputs; True when kept.
    The folder is the round's own (rounds/<round>/<unit>/...), so clearing it deletes nothing of the user's."""
    marker = run_dir / INPUTS_MARKER
    if run_dir.exists() and (not marker.exists() or marker.read_text(encoding="utf-8") != inputs_sha):
        shutil.rmtree(run_dir)
    kept = run_dir.exists()
    if not kept:
        run_dir.mkdir(parents=True)
        write_text_atomic(marker, inputs_sha)
    return kept


def _sft(ws: Workspace, cfg: RunConfig, inputs_sha: str, init_adapter: Path | None, console: Console) -> tuple[list[Path], dict]:
    from ..train import train

    run_dir = Path(cfg.training.output_dir)
    adapter = run_dir / "adapter"
    kept = _fresh_run_dir(run_dir, inputs_sha)
    if kept and (run_dir / "result.json").exists() and (adapter / "adapter_model.safetensors").exists():
        metrics = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))  # finished; only the record was missing
    else:
        metrics = train(cfg, resume=True, console=console, init_adapter=init_adapter).metrics
    rel = lambda p: str(p.resolve().relative_to(ws.dir))  # noqa: E731
    return ([adapter / "adapter_model.safetensors", adapter / "adapter_config.json"],
            {"adapter": rel(adapter), "run_dir": rel(run_dir), "init_adapter": str(init_adapter) if init_adapter else None,
             "global_step": metrics.get("global_step"), "best_eval_loss": metrics.get("best_eval_loss"),
             "final_eval_loss": metrics.get("final_eval_loss"), "resumed_checkpoints": kept, "data": metrics.get("data")})


def _trained_counts(sft_detail: dict) -> dict:
    """What training kept of the mix: conversations dropped for length and trained (`cycle status`)."""
    train = (sft_detail.get("data") or {}).get("train") or {}
    val = (sft_detail.get("data") or {}).get("validation") or {}
    return {"dropped_for_length": train.get("dropped_overlong"), "trained_records": train.get("kept"),
            "trained_tokens": train.get("trained_tokens"), "validation_records": val.get("kept"),
            "validation_tokens": val.get("trained_tokens")}


def _preference(ws: Workspace, cfg: RunConfig, feedback_dir: Path, sft_adapter: Path, inputs_sha: str,
                console: Console) -> tuple[list[Path], dict]:
    from ..train.preference import train_preferences

    method = cfg.preference.method
    run_dir = Path(f"{cfg.training.output_dir}-{method}")
    cfg = cfg.updated({"preference.output_dir": str(run_dir)})
    kept = _fresh_run_dir(run_dir, inputs_sha)
    adapter = run_dir / "adapter"
    if kept and (run_dir / "result.json").exists() and (adapter / "adapter_model.safetensors").exists():
        metrics = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    else:
        if adapter.exists():  # a run killed between saving and result.json: train again
            shutil.rmtree(adapter)
        metrics = train_preferences(cfg, feedback_dir / f"{method}.jsonl", adapter=sft_adapter, console=console).metrics
    return ([adapter / "adapter_model.safetensors", adapter / "adapter_config.json"],
            {"adapter": str(adapter.resolve().relative_to(ws.dir)), "method": method,
             "global_step": metrics.get("global_step"), "train_loss": metrics.get("train_loss")})


def _eval_key(ws: Workspace, cfg: RunConfig) -> str:
    """What makes two evaluations comparable: suite content, fixed sets, and every setting that
    changes answers or checks."""
    from ..data.eden_layout import request_layout
    from ..evaluate.suite import resolve_suite_path

    return _sha({"suite": file_sha256(resolve_suite_path(cfg.evaluation.suite)),
                 "validation": file_sha256(ws.validation_path), "forgetting": file_sha256(ws.forgetting_path),
                 "evaluation": cfg.evaluation.model_dump(), "persona": cfg.persona.model_dump(),
                 "model": cfg.model.model_dump()}
                | ({"request": [cfg.export.request_format, request_layout(cfg.export).app_text]}
                   if cfg.export.request_format != "chat" else {}))  # chat: the keys of earlier rounds, unchanged


def _evaluate_step(ws: Workspace, reg: Registry, cfg: RunConfig, round_id: str, unit: str, live_round: str | None,
                   live_adapter: Path | None, adapter: Path, key: str) -> tuple[list[Path], dict]:
    from ..evaluate.runner import EvalResult, perplexity_sets
    from ..evaluate.suite import load_suite

    out = ws.eval_dir(round_id, unit)
    suite = load_suite(cfg.evaluation.suite)
    validation, forgetting = perplexity_sets(cfg, [str(ws.validation_path)], [str(ws.forgetting_path)])
    baseline_file, candidate_file = out / "baseline.json", out / "candidate.json"
    reused = None
    if live_round is not None:
        for live_unit in (unit, SHARED):
            rec = reg.step(live_round, live_unit, "evaluate")
            if rec is not None and rec.detail.get("key") == key:
                reused = ws.eval_dir(live_round, live_unit) / "candidate.json"
                break
    if reused is not None and reused.exists():
        baseline = EvalResult.load(reused)
    else:
        reused = None
        baseline = _evaluate(cfg, live_adapter, suite, validation, forgetting)
    baseline.save(baseline_file)
    candidate = _evaluate(cfg, adapter, suite, validation, forgetting)
    candidate.save(candidate_file)
    from .forgetting import origin_source, write_origin  # the original base's scores, for cumulative forgetting

    origin = write_origin(out, baseline_file=baseline_file, baseline_is_base=live_round is None,
                          reused=origin_source(ws, reg, live_round, unit, key),
                          score_base=lambda: _evaluate(cfg, None, suite, validation, forgetting))
    return [baseline_file, candidate_file, origin], {
        "key": key, "baseline": f"live round {live_round}" if live_round else "base model",
        "baseline_reused_from": str(reused.relative_to(ws.dir)) if reused else None,
        "candidate": _summary(candidate.metrics), "live": _summary(baseline.metrics)}


def _summary(metrics: dict) -> dict:
    keys = ("perplexity_validation", "perplexity_replay", "language_consistency", "persona_adherence",
            "keyword_hit_rate", "code_pass_rate", "case_pass_rate")
    return {k: metrics.get(k) for k in keys}


def _val_loss(metrics: dict) -> float | None:
    ppl = metrics.get("perplexity_validation")
    return math.log(ppl) if ppl and math.isfinite(ppl) and ppl > 0 else None


def _gate(ws: Workspace, cfg: RunConfig, out: Path, metrics_jsonl: Path, human_verdict: dict | None = None) -> tuple[list[Path], dict]:
    from ..evaluate.runner import EvalResult

    baseline, candidate = EvalResult.load(out / "baseline.json"), EvalResult.load(out / "candidate.json")
    comparison = _compare(baseline, candidate, cfg, metrics_jsonl)
    reports = _write_reports(comparison, out, baseline, candidate)
    live_loss, cand_loss = _val_loss(baseline.metrics), _val_loss(candidate.metrics)
    g = ws.config.gate
    reasons = []
    if g.require_val_loss_improvement:
        if live_loss is None or cand_loss is None:
            reasons.append("validation loss could not be measured on the fixed validation set")
        elif not cand_loss < live_loss - g.min_val_loss_delta:
            test = comparison.row("perplexity_validation").detail
            reasons.append(f"validation loss did not improve over the live model's ({live_loss:.4f} → {cand_loss:.4f}"
                           + (f", needs at least {g.min_val_loss_delta:g} lower" if g.min_val_loss_delta else "")
                           + (f"; {test.split(': ', 1)[-1]}" if test else "") + ")")
    reasons += list(comparison.reasons) + (human_verdict["reasons"] if human_verdict else [])
    from .forgetting import ORIGIN_FILE, cumulative_forgetting

    origin = out / ORIGIN_FILE
    cumulative = cumulative_forgetting(EvalResult.load(origin), candidate, g.max_cumulative_forgetting, cfg.evaluation) if origin.is_file() else None
    reasons += cumulative.reasons if cumulative else []
    verdict = {"ship": not reasons and comparison.ship, "reasons": reasons, "val_loss": cand_loss, "live_val_loss": live_loss,
               "val_loss_test": comparison.row("perplexity_validation").detail,
               "forgetting_base": cumulative.value if cumulative else None,
               "cumulative_forgetting": cumulative.to_json() if cumulative else None,
               "compare_ship": comparison.ship, "forgetting": comparison.row("forgetting").candidate,
               "korean_consistency": comparison.korean_consistency.get("value"),
               "metrics": {r.key: r.candidate for r in comparison.metrics if r.gating or r.key == "perplexity_replay"},
               "verdicts": {r.key: r.verdict for r in comparison.metrics if r.gating and r.verdict != "n/a"},
               **({"human": human_verdict} if human_verdict else {})}
    gate_file = out / "gate.json"
    write_json_atomic(gate_file, verdict)
    return [gate_file, *(p for p in reports.values() if Path(p).is_file())], verdict


def _export_step(cfg: RunConfig, adapter: Path, export_dir: Path) -> tuple[list[Path], dict]:
    for stale in export_dir.parent.glob(f".{export_dir.name}.*.tmp"):  # an export killed half-way (our own folder)
        shutil.rmtree(stale, ignore_errors=True)
    result = _export(cfg, adapter, export_dir)
    files = [result.gguf, result.report_path, *result.modelfiles.values()]
    return files, {"models": list(result.modelfiles), "route": result.report.get("route"),
                   "adapter_sha256": result.report.get("adapter_sha256")}


def _deploy_step(cfg: RunConfig, export_dir: Path, comparison: Path, host: str, client) -> tuple[list[Path], dict]:
    records = deploy_export(cfg, export_dir, host=host, gate=comparison, client=client)
    return [], {"records": records, "host": host}
