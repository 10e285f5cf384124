"""Deploy an export to Ollama over its HTTP API (the `ollama` client): plan, apply, smoke check, rollback.

`plan_deploy` reads and checks everything and changes nothing in Ollama:
1. the export report and its files (re-hashed against the hashes the export recorded), the gate
   (its verdict re-derived from the results files comparison.json names, for this adapter; gate.py) and
   the SQLite registry a standalone deploy records in (opened, upgraded and any legacy
   deployments.json imported: a broken registry is an error before any model exists);
2. the server: a well-formed host that answers `/api/version` like Ollama within the configured
   timeout, recent enough for the JSON create API;
3. the base: present locally (creating FROM a missing base makes Ollama pull it silently, several
   GB) and not a cloud/remote model (an adapter cannot be applied to a model running elsewhere);
4. the template: the base's own TEMPLATE when it renders training's ChatML, otherwise edentune's.

`apply_deploy` changes Ollama and undoes its own changes on any failure:
5. upload the GGUF as a blob, keep the current model as `<name>:previous`, create the model
   (GGUF adapter route; when Ollama refuses the adapter, the merged model.gguf of the export if it
   holds one, else a clear error); never `quantize` with a GGUF;
6. read it back with /api/show (ADAPTER line, SYSTEM, stop tokens, num_ctx);
7. smoke check: a fixed prompt through /api/chat, greedy, compared with llama.cpp's answers on
   the exported files with and without the adapter (a silently dropped adapter or a wrong
   template gives another answer).
Both return data, never print; `deploy` and `rollback` record events in the registry when given one.
The Ollama client is `ollama.py`, the gate `gate.py`, the registry of standalone deploys
`history.py`, the replacement of an app's tag `replace.py`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import now as utc_now
from ..errors import EdentuneError
from .history import open_registry, record_history
from .ollama import MIN_OLLAMA_VERSION, OllamaRefused, OllamaServer, full_name, previous_name, remote_reason, version_tuple
from .gate import GATE_HASH_FIELDS, check_export_files, check_gate, check_uploaded  # noqa: F401 - re-exported
SMOKE_PROMPT = "Introduce yourself in one sentence, then name three colours."
SMOKE_OPTIONS = {"temperature": 0, "top_k": 1, "seed": 0, "num_predict": 24}


class DeployFailed(EdentuneError):
    """apply_deploy failed and undid its changes; `records` says what was tried and restored."""

    def __init__(self, message: str, *, records: list[dict], hint: str | None = None):
        super().__init__(message, hint=hint)
        self.records = records


@dataclass
class ModelPlan:
    name: str  # full Ollama name, e.g. "eden:latest"
    from_: str  # the Ollama base (adapter route) or the exported GGUF (merged route)
    system: str | None
    parameters: dict
    template: str | None  # sent with create; None keeps the base's own TEMPLATE
    template_source: str  # "base" (its own renders training's ChatML), "edentune-chatml" or "export"
    effective_template: str  # what Ollama will render prompts with (for the smoke check)
    previous: str | None  # where the current model is kept; None when no model has that name yet


@dataclass
class DeployPlan:
    host: str
    ollama_version: str
    export_dir: Path
    route: str  # "adapter" (GGUF LoRA on an Ollama base) or "merged" (one GGUF model)
    gguf: Path  # the file uploaded as a blob
    models: list[ModelPlan]
    adapter_sha256: str | None
    gate: dict | None  # what check_gate verified, or None without --gate
    merged_fallback: Path | None  # a merged model.gguf in the export, used if Ollama refuses the adapter
    registry: Path | None  # SQLite registry checked writable (deploy records in it)
    timeout_s: float
    create_timeout_s: float
    base_dir: str  # HF base: tokenizer, and the reference GGUF for the smoke check
    cfg: Any = field(default=None, repr=False)
    files_sha256: dict[str, str] = field(default_factory=dict)  # the export's file hashes, verified (gate.py)
    replace: dict | None = None  # deploying in place of an app's tag: what replace.plan_replace decided


def base_template_matches(template: str | None, tok, system: str | None) -> bool:
    """Does the base's Go template render exactly what training's template renders?"""
    from . import parity
    from .gotemplate import TemplateError

    if not template:
        return False
    for conv in parity.PROBE_CONVERSATIONS:
        msgs = ([{"role": "system", "content": system}] if system else []) + conv
        want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        try:
            if parity.render_ollama_prompt(template, system, conv) != want:
                return False
        except TemplateError:
            return False
    return True


def check_base(cfg, *, host: str | None = None, client=None) -> str:
    """Ollama answers at the host and has `export.ollama_base` locally (a missing base is never
    pulled silently); returns Ollama's version. Touches nothing."""
    server = OllamaServer.for_config(cfg, host, client)
    version = server.version()
    base = cfg.export.ollama_base
    if full_name(base) not in server.models():
        raise EdentuneError(f"base model {base!r} is not in Ollama at {server.host}",
                            hint=f"run `ollama pull {base}` first (edentune never lets Ollama pull it silently)")
    return version


# -- plan ----------------------------------------------------------------------------------------

def plan_deploy(cfg, export_dir: str | Path, *, host: str | None = None, gate: str | Path | None = None, client=None,
                registry: str | Path | None = None, tokenizer=None) -> DeployPlan:
    """Read and check everything a deploy needs; changes nothing in Ollama (read-only API calls).
    With `gate` (a comparison.json), nothing is planned unless it says ship for this very adapter;
    with `registry` (see registry_paths), that registry is opened for writing first."""
    from .api import base_model_dir, load_export
    from .modelfile import CHATML_TEMPLATE, parse_modelfile

    export_dir = Path(export_dir)
    report = load_export(export_dir)
    route = report.get("route")
    if route not in ("adapter", "merged"):
        raise EdentuneError(f"{export_dir}: export_report.json has no known route ({route!r})", hint="run `edentune export` again")
    # With the gate: every file as exported, and the verdict re-derived for this adapter (gate.py).
    files = check_export_files(export_dir, report) if gate is not None else {}
    gate_record = check_gate(gate, report, cfg, files) if gate is not None else None
    if registry is not None:
        with open_registry(registry) as reg:
            registry = reg.path
    gguf = export_dir / ("adapter.gguf" if route == "adapter" else "model.gguf")
    if not gguf.is_file():
        raise EdentuneError(f"{export_dir}: {gguf.name} is missing", hint="run `edentune export` again")
    modelfiles = {}
    for name, fname in (report.get("models") or {cfg.export.model_name: "Modelfile"}).items():  # older exports: one model
        try:
            modelfiles[full_name(name)] = parse_modelfile((export_dir / fname).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise EdentuneError(f"{export_dir}: cannot read {fname} ({err})", hint="run `edentune export` again") from None

    if route == "adapter":  # refused before any network call: a cloud model has no local weights to adapt
        for mf in modelfiles.values():
            if why := remote_reason(mf.from_):
                raise _remote_refusal(mf.from_, why)
    server = OllamaServer.for_config(cfg, host, client)
    version = server.version()
    parsed = version_tuple(version)
    if parsed is not None and parsed != (0, 0, 0) and parsed < MIN_OLLAMA_VERSION:
        raise EdentuneError(f"Ollama at {server.host} is version {version}; deploy needs {'.'.join(map(str, MIN_OLLAMA_VERSION))} or newer "
                            "(the JSON create API)", hint="update Ollama, or run the `ollama create` commands printed by `edentune export`")
    present = server.models()
    base_dir = base_model_dir(cfg)
    models, shown_bases, tok = [], {}, tokenizer
    for name, mf in modelfiles.items():
        if route == "adapter":
            if full_name(mf.from_) not in present:
                raise EdentuneError(f"base model {mf.from_!r} is not in Ollama at {server.host}; edentune does not let Ollama pull it silently",
                                    hint=f"run `ollama pull {mf.from_}` first (it is several GB)")
            if mf.from_ not in shown_bases:
                shown_bases[mf.from_] = server.show(mf.from_)
            shown = shown_bases[mf.from_]
            if why := remote_reason(mf.from_, shown):
                raise _remote_refusal(mf.from_, why)
            base_template = shown.get("template") or ""
            if mf.template is not None:
                template, source, effective = mf.template, "export", mf.template
            else:
                tok = tok or _load_tokenizer(base_dir)
                if base_template_matches(base_template, tok, mf.system):
                    template, source, effective = None, "base", base_template
                else:  # the base would format prompts unlike training
                    template, source, effective = CHATML_TEMPLATE, "edentune-chatml", CHATML_TEMPLATE
        else:
            template = mf.template or CHATML_TEMPLATE
            source, effective = ("export" if mf.template else "edentune-chatml"), template
        models.append(ModelPlan(name=name, from_=mf.from_, system=mf.system, parameters=mf.api_parameters(), template=template,
                                template_source=source, effective_template=effective,
                                previous=previous_name(name) if name in present else None))
    fallback = export_dir / "model.gguf"
    return DeployPlan(host=server.host, ollama_version=version, export_dir=export_dir, route=route, gguf=gguf, models=models,
                      adapter_sha256=report.get("adapter_sha256"), gate=gate_record,
                      merged_fallback=fallback if route == "adapter" and fallback.is_file() and (gate is None or fallback.name in files) else None,
                      registry=registry, timeout_s=server.timeout, create_timeout_s=server.long_timeout, base_dir=base_dir, cfg=cfg,
                      files_sha256=files)


def _remote_refusal(base: str, why: str) -> EdentuneError:
    return EdentuneError(f"not deploying: the base {base!r} is not a local model ({why}); a LoRA adapter can only be applied to local weights",
                         hint="set export.ollama_base to a local model (`ollama pull` it), or export the merged model (`edentune export --merged`)")


# -- apply ---------------------------------------------------------------------------------------

def apply_deploy(plan: DeployPlan, *, client=None, smoke: bool = True) -> list[dict]:
    """Create the planned models in Ollama, confirm each with /api/show and (with `smoke`) the
    smoke check; on any failure restore what was there before and raise DeployFailed (with the
    records of what was tried). Returns one event record per model."""
    server = OllamaServer.for_plan(plan, client)
    references = smoke_references(plan) if smoke else {}  # before Ollama is touched: a failure here changes nothing
    touched: list[ModelPlan] = []
    records: list[dict] = []
    route, gguf, digest = plan.route, plan.gguf, None
    try:
        digest = server.call("create_blob", gguf, slow=True, what=f"the upload of {gguf.name}")
        check_uploaded(digest, gguf, plan.files_sha256)
        for mp in plan.models:
            if mp.previous:
                server.call("copy", mp.name, mp.previous, what=f"keeping {mp.name} as {mp.previous}")
            touched.append(mp)
            try:
                _create(server, mp, route, gguf, digest)
            except OllamaRefused as err:
                if route != "adapter":
                    raise
                if plan.merged_fallback is None:
                    raise EdentuneError(f"Ollama {plan.ollama_version} at {plan.host} refused the GGUF adapter for {mp.name}: {err.error}",
                                        hint=f"export the merged model (`edentune export --merged -o DIR`) and deploy that; "
                                             f"or put its model.gguf into {plan.export_dir}") from None
                route, gguf = "merged", plan.merged_fallback  # the same fine-tune, baked into one GGUF
                if smoke:
                    references = smoke_references(plan, route=route, gguf=gguf)
                digest = server.call("create_blob", gguf, slow=True, what=f"the upload of {gguf.name}")
                check_uploaded(digest, gguf, plan.files_sha256)
                _create(server, mp, route, gguf, digest)
            _confirm(server, mp, adapter=route == "adapter")
            record = _record(plan, mp, route, gguf, digest)
            if smoke:
                record["smoke"] = smoke_check(server, mp, *references[mp.name])
                if record["smoke"]["status"] == "failed":
                    records.append(record)
                    raise EdentuneError(f"smoke check failed for {mp.name}: {record['smoke']['reason']}")
            else:
                record["smoke"] = {"status": "skipped"}
            records.append(record)
    except EdentuneError as err:
        undone = _undo(server, touched)
        done_names = {r["model"] for r in records}
        failed = records + [_record(plan, mp, route, gguf, digest) for mp in touched if mp.name not in done_names]
        for r in failed:
            r.update(status="rolled back", error=str(err).split("\n  hint:")[0], restored=undone.get(r["model"]))
        raise DeployFailed(f"{err.args[0]}; {_undo_summary(undone)}", records=failed, hint=err.hint) from None
    except BaseException:
        _undo(server, touched)  # Ctrl-C or a bug: still put the previous models back
        raise
    return records


def _create(server: OllamaServer, mp: ModelPlan, route: str, gguf: Path, digest: str | None) -> None:
    kwargs = dict(model=mp.name, system=mp.system, parameters=mp.parameters, stream=False)  # never `quantize` a GGUF
    if route == "adapter":
        kwargs.update(from_=mp.from_, adapters={gguf.name: digest}, template=mp.template)
    else:
        from .modelfile import CHATML_TEMPLATE

        kwargs.update(files={gguf.name: digest}, template=mp.template if mp.template_source != "base" else CHATML_TEMPLATE)
    server.call("create", slow=True, what=f"creating {mp.name}", **kwargs)


def _confirm(server: OllamaServer, mp: ModelPlan, adapter: bool) -> None:
    from .modelfile import STOP_TOKENS, parse_modelfile

    shown = parse_modelfile(server.show(mp.name).get("modelfile") or "")
    problems = []
    if adapter and not shown.adapter:
        problems.append("no ADAPTER line: the adapter was not attached")
    if shown.system != mp.system:
        problems.append(f"SYSTEM is {shown.system!r}, exported {mp.system!r}")
    stops = [str(s) for s in shown.parameters.get("stop", [])]
    if any(s not in stops for s in STOP_TOKENS):
        problems.append(f"stop tokens are {stops}, need {list(STOP_TOKENS)}")
    for key in ("num_ctx", "num_predict", "temperature"):
        got = (shown.parameters.get(key) or [None])[0]
        if got != mp.parameters.get(key):
            problems.append(f"{key} is {got}, exported {mp.parameters.get(key)}")
    if problems:
        raise EdentuneError(f"Ollama created {mp.name} but it does not match the export: " + "; ".join(problems))


def _undo(server: OllamaServer, touched: list[ModelPlan]) -> dict[str, str]:
    """Put back what each touched model was: the kept previous version, or nothing. Best effort:
    returns model -> what happened, including a failure to restore."""
    out = {}
    for mp in reversed(touched):
        try:
            if mp.previous:
                server.call("copy", mp.previous, mp.name, what=f"restoring {mp.name}")
                out[mp.name] = f"restored from {mp.previous}"
            elif mp.name in server.models():
                server.call("delete", mp.name, what=f"removing {mp.name}")
                out[mp.name] = "removed (there was no previous version)"
            else:
                out[mp.name] = "not created"
        except EdentuneError as err:
            out[mp.name] = f"could not be restored: {str(err).splitlines()[0]}"
    return out


def _undo_summary(undone: dict[str, str]) -> str:
    return "; ".join(f"{name} {what}" for name, what in undone.items()) or "Ollama was not changed"


def _record(plan: DeployPlan, mp: ModelPlan, route: str, gguf: Path, digest: str | None) -> dict:
    return {"action": "deploy", "status": "live", "model": mp.name, "time": utc_now(), "host": plan.host,
            "ollama_version": plan.ollama_version, "route": route, "from": mp.from_ if route == plan.route else f"./{gguf.name}",
            "gguf": gguf.name, "digest": digest, "previous": mp.previous, "export_dir": str(plan.export_dir),
            "adapter_sha256": plan.adapter_sha256, "template": mp.template_source, "gate": plan.gate}


# -- smoke check ---------------------------------------------------------------------------------

def smoke_references(plan: DeployPlan, *, route: str | None = None, gguf: Path | None = None) -> dict[str, tuple[str, str]]:
    """llama.cpp's greedy answers to the smoke prompt, per model: (with the fine-tune, base alone),
    on the run's base GGUF with the exported adapter (or the merged model.gguf)."""
    from .adapter_gguf import validate_adapter_against_base
    from .api import smoke_base_gguf
    from .parity import greedy_answer, llama_model, render_ollama_prompt

    route, gguf = route or plan.route, gguf or plan.gguf
    base_gguf = smoke_base_gguf(plan.cfg, plan.base_dir)
    # Half the cores: Ollama may run on the same machine, and llama.cpp's spinning threads slow
    # down many times over when they outnumber the free cores.
    kw = dict(n_ctx=1024, n_threads=max(1, (os.cpu_count() or 2) // 2))
    if route == "adapter":
        validate_adapter_against_base(gguf, base_gguf)  # a mismatched adapter segfaults llama-cpp-python
        tuned = llama_model(base_gguf, lora=gguf, **kw)
    else:
        tuned = llama_model(gguf, **kw)
    base = llama_model(base_gguf, **kw)
    out = {}
    for mp in plan.models:
        prompt = render_ollama_prompt(mp.effective_template, mp.system, [{"role": "user", "content": SMOKE_PROMPT}])
        stops = [str(s) for s in (mp.parameters.get("stop") or [])]
        out[mp.name] = tuple(greedy_answer(llm, prompt, SMOKE_OPTIONS["num_predict"], stops) for llm in (tuned, base))
    return out


def smoke_check(server: OllamaServer, mp: ModelPlan, with_adapter: str, without_adapter: str) -> dict:
    """Ask the created model the smoke prompt (greedy) and judge its answer against llama.cpp's."""
    response = server.call("chat", model=mp.name, messages=[{"role": "user", "content": SMOKE_PROMPT}], options=dict(SMOKE_OPTIONS),
                           stream=False, slow=True, what=f"the smoke-check chat with {mp.name}")
    answer = (response.message.content or "") if response.message else ""
    status, reason = judge_smoke(answer, with_adapter, without_adapter)
    return {"status": status, "reason": reason, "prompt": SMOKE_PROMPT, "answer": answer,
            "expected": with_adapter, "without_adapter": without_adapter}


def judge_smoke(answer: str, with_adapter: str, without_adapter: str) -> tuple[str, str]:
    """passed / failed / inconclusive, with the reason.

    Ollama's base is often not byte-identical to the reference GGUF (its Q4_K_M against a local
    f16), so greedy answers can drift apart after a while. What must hold: where llama.cpp's
    answers with and without the adapter part, Ollama's goes the adapter's way (or, when it
    departed even earlier, it is still clearly closer to the adapter's answer)."""
    got, want, base = answer.strip(), with_adapter.strip(), without_adapter.strip()
    if want == base:
        return "inconclusive", "the adapter does not change llama.cpp's greedy answer to the smoke prompt, so it cannot show whether Ollama applied it"
    if got == want:
        return "passed", "Ollama's answer equals llama.cpp's with the adapter"
    if got == base:
        return "failed", "Ollama answered exactly like the base without the adapter: the adapter was not applied"
    split = len(os.path.commonprefix([want, base]))
    with_prefix, base_prefix = len(os.path.commonprefix([got, want])), len(os.path.commonprefix([got, base]))
    if with_prefix > split:
        return "passed", f"Ollama's answer follows llama.cpp's with the adapter past character {split}, where the base's answer differs"
    if base_prefix > split:
        return "failed", f"Ollama's answer follows the base without the adapter past character {split}: the adapter was not applied"
    sim_with = difflib.SequenceMatcher(None, got, want).ratio()
    sim_base = difflib.SequenceMatcher(None, got, base).ratio()
    if sim_with >= 0.5 and sim_with > sim_base:
        return "passed", f"Ollama's answer is closer to llama.cpp's with the adapter (similarity {sim_with:.2f}) than without ({sim_base:.2f})"
    return "failed", (f"Ollama's answer matches neither llama.cpp's with the adapter (similarity {sim_with:.2f}) nor without "
                      f"({sim_base:.2f}): check the template and the base model")


# -- deploy = plan + apply; rollback -------------------------------------------------------------

def deploy(cfg, export_dir: str | Path, *, host: str | None = None, registry: str | Path | None = None,
           gate: str | Path | None = None, client=None, tokenizer=None, smoke: bool = True) -> list[dict]:
    """plan_deploy + apply_deploy. With `registry` (see registry_paths), the records (also those
    of a failed, rolled back deploy) become events there, in a registry the plan has already
    opened for writing."""
    plan = plan_deploy(cfg, export_dir, host=host, gate=gate, client=client, registry=registry, tokenizer=tokenizer)
    if cfg.export.replace:  # in place of the tag an app calls (export/replace.py)
        from .replace import finish_replace, plan_replace

        plan = plan_replace(plan, cfg.export.replace, allow_base_mismatch=cfg.export.allow_base_mismatch, client=client)
    try:
        records = apply_deploy(plan, client=client, smoke=smoke)
        if plan.replace:
            records = finish_replace(plan, records, client=client)
    except DeployFailed as err:
        if plan.registry is not None:
            record_history(plan.registry, err.records)
        raise
    if plan.registry is not None:
        record_history(plan.registry, records)
    return records


def rollback(cfg, *, name: str | None = None, host: str | None = None, registry: str | Path | None = None, client=None) -> dict:
    """Restore `<name>:previous` (kept by the last deploy) under the model's name; with
    `registry` (see registry_paths), opened before Ollama is touched and the event recorded after."""
    if registry is not None:
        with open_registry(registry) as reg:
            registry = reg.path
    if cfg.export.replace:  # the original kept by the first replace, back under the app's tag
        from .replace import restore_original

        record = restore_original(cfg, cfg.export.replace, host=host, client=client)
        if registry is not None:
            record_history(registry, [record])
        return record
    server = OllamaServer.for_config(cfg, host, client)
    server.version()  # is it Ollama at all: a clear error before any other call
    name = full_name(name or cfg.export.model_name)
    previous = previous_name(name)
    if previous not in server.models():
        raise EdentuneError(f"no previous version of {name} in Ollama ({previous} not found)",
                            hint="rollback restores the model that the last `edentune deploy` replaced")
    server.call("copy", previous, name, what=f"restoring {name}")
    record = {"action": "rollback", "model": name, "time": utc_now(), "host": server.host, "restored_from": previous}
    if registry is not None:
        record_history(registry, [record])
    return record


def _load_tokenizer(base_dir: str):
    from ..models import load_tokenizer

    return load_tokenizer(base_dir)

