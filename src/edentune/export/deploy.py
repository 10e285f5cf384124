"""Deploy an export to Ollama over its HTTP API (the `ollama` client), with rollback.

Steps, each guarding against a known failure (USERS.md #1, #2, #4, #10, #17):
1. reach the server and find the base locally: creating FROM a missing base makes Ollama pull
   it from the internet silently, so a missing base is an error with the `ollama pull` command;
2. check the base's own TEMPLATE renders training's ChatML (rendered here in Python); if not,
   send edentune's ChatML template with the model;
3. upload the GGUF as a blob, keep the current model as `<name>:previous`, create the model under
   the same name (Ollama swaps it in one step: apps using the name keep working);
4. read it back with /api/show: the ADAPTER line, SYSTEM, stop tokens and num_ctx must be there,
   otherwise the previous model is restored;
5. record what was deployed (digests, time) in a small JSON registry.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from ..errors import EdentuneError
from ..io import write_json_atomic

DEFAULT_HOST = "http://127.0.0.1:11434"


def full_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def previous_name(name: str) -> str:
    repo, tag = full_name(name).rsplit(":", 1)
    return f"{repo}:previous" if tag == "latest" else f"{repo}:{tag}-previous"


def ollama_host(cfg, host: str | None = None) -> str:
    """`--host`, else the config's `export.ollama_host`, else $OLLAMA_HOST, else Ollama's default."""
    return host or cfg.export.ollama_host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST


def _client(host: str):
    import ollama

    return ollama.Client(host=host)


def _call(fn, *args, host: str, **kwargs):
    """Turn the client's connection and response errors into messages a user can act on."""
    import ollama

    try:
        return fn(*args, **kwargs)
    except ConnectionError:
        raise EdentuneError(f"cannot reach Ollama at {host}", hint="start it with `ollama serve` (or set OLLAMA_HOST)") from None
    except ollama.ResponseError as err:
        raise EdentuneError(f"Ollama at {host} refused the request: {err.error} (HTTP {err.status_code})") from None


def local_models(client, host: str) -> set[str]:
    return {full_name(m.model) for m in _call(client.list, host=host).models if m.model}


def base_template_matches(template: str | None, tok, system: str | None) -> bool:
    """Does the base's Go template render exactly what training's template renders?"""
    from .gotemplate import TemplateError
    from . import parity

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


def check_gate(comparison_json: str | Path, export_report: dict) -> dict:
    """The deploy gate: the comparison must say ship, and be about the adapter this export holds."""
    path = Path(comparison_json)
    try:
        verdict = json.loads(path.read_text(encoding="utf-8"))
        ship, reasons = verdict["ship"], verdict.get("reasons", [])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EdentuneError(f"{path}: not a comparison.json from `edentune compare` ({err})") from None
    if ship is not True:
        raise EdentuneError(f"not deploying: the comparison says the fine-tuned model is not better ({'; '.join(reasons) or 'ship: false'})",
                            hint=f"see {path.parent / 'report.html'}; Ollama was not changed")
    scored, exported = verdict.get("candidate_adapter_sha256"), export_report.get("adapter_sha256")
    if not scored or not exported or scored != exported:
        raise EdentuneError(
            f"not deploying: {path} scored adapter {(scored or 'unknown')[:12]}, the export holds {(exported or 'unknown')[:12]}",
            hint=f"compare the exported adapter itself: `edentune compare --base base --candidate {export_report.get('adapter_dir')}`",
        )
    return {"comparison": str(path), "adapter_sha256": exported}


def deploy(cfg, export_dir: str | Path, *, host: str | None = None, registry: str | Path | None = None,
           gate: str | Path | None = None, client=None, tokenizer=None) -> list[dict]:
    """Create every model of an export in Ollama; returns the registry records written. With
    `gate` (a comparison.json), nothing is deployed unless it says ship for this very adapter."""
    from .api import base_model_dir, load_export
    from .modelfile import CHATML_TEMPLATE, parse_modelfile

    export_dir = Path(export_dir)
    report = load_export(export_dir)
    gate_record = check_gate(gate, report) if gate is not None else None
    host = ollama_host(cfg, host)
    client = client or _client(host)
    present = local_models(client, host)
    gguf_name = "adapter.gguf" if report["route"] == "adapter" else "model.gguf"
    modelfiles = {full_name(name): parse_modelfile((export_dir / fname).read_text(encoding="utf-8"))
                  for name, fname in (report.get("models") or {cfg.export.model_name: "Modelfile"}).items()}  # older exports: one model
    for mf in modelfiles.values():
        if report["route"] == "adapter" and full_name(mf.from_) not in present:
            raise EdentuneError(
                f"base model {mf.from_!r} is not in Ollama at {host}; edentune does not let Ollama pull it silently",
                hint=f"run `ollama pull {mf.from_}` first (it is several GB)",
            )
    digest = _call(client.create_blob, export_dir / gguf_name, host=host)
    records = []
    for name, mf in modelfiles.items():
        kwargs = dict(model=name, system=mf.system, parameters=mf.api_parameters(), stream=False)
        if report["route"] == "adapter":
            template = mf.template
            if template is None:
                base_template = _call(client.show, mf.from_, host=host).template
                tok = tokenizer or _load_tokenizer(base_model_dir(cfg))
                if not base_template_matches(base_template, tok, mf.system):
                    template = CHATML_TEMPLATE  # the base would format prompts unlike training
            kwargs.update(from_=mf.from_, adapters={gguf_name: digest}, template=template)
        else:
            kwargs.update(files={gguf_name: digest}, template=mf.template)
        previous = None
        if name in present:
            previous = previous_name(name)
            _call(client.copy, name, previous, host=host)
        _call(client.create, host=host, **kwargs)
        try:
            _confirm(client, host, name, mf, adapter=report["route"] == "adapter")
        except EdentuneError:
            if previous:
                _call(client.copy, previous, name, host=host)
            raise
        records.append({"action": "deploy", "model": name, "time": _now(), "host": host, "route": report["route"],
                        "from": mf.from_, gguf_name: digest, "previous": previous, "export_dir": str(export_dir),
                        "template": "edentune-chatml" if kwargs.get("template") else "base", "gate": gate_record})
    _append_registry(cfg, registry, records)
    return records


def _confirm(client, host: str, name: str, mf, adapter: bool) -> None:
    from .modelfile import STOP_TOKENS, parse_modelfile

    shown = parse_modelfile(_call(client.show, name, host=host).modelfile or "")
    problems = []
    if adapter and not shown.adapter:
        problems.append("no ADAPTER line: the adapter was not attached")
    if shown.system != mf.system:
        problems.append(f"SYSTEM is {shown.system!r}, exported {mf.system!r}")
    stops = [str(s) for s in shown.parameters.get("stop", [])]
    if any(s not in stops for s in STOP_TOKENS):
        problems.append(f"stop tokens are {stops}, need {list(STOP_TOKENS)}")
    for key in ("num_ctx", "num_predict", "temperature"):
        if shown.parameters.get(key) != mf.parameters.get(key):
            problems.append(f"{key} is {shown.parameters.get(key)}, exported {mf.parameters.get(key)}")
    if problems:
        raise EdentuneError(f"Ollama created {name} but it does not match the export: " + "; ".join(problems))


def rollback(cfg, *, name: str | None = None, host: str | None = None, registry: str | Path | None = None, client=None) -> dict:
    """Restore `<name>:previous` (kept by the last deploy) under the model's name."""
    host = ollama_host(cfg, host)
    client = client or _client(host)
    name = full_name(name or cfg.export.model_name)
    previous = previous_name(name)
    if previous not in local_models(client, host):
        raise EdentuneError(f"no previous version of {name} in Ollama ({previous} not found)",
                            hint="rollback restores the model that the last `edentune deploy` replaced")
    _call(client.copy, previous, name, host=host)
    record = {"action": "rollback", "model": name, "time": _now(), "host": host, "restored_from": previous}
    _append_registry(cfg, registry, [record])
    return record


def registry_path(cfg, registry: str | Path | None = None) -> Path:
    return Path(registry) if registry else Path(cfg.training.output_dir) / "deployments.json"


def _append_registry(cfg, registry, records: list[dict]) -> None:
    import json

    path = registry_path(cfg, registry)
    history = json.loads(path.read_text()) if path.exists() else []
    write_json_atomic(path, history + records)


def _load_tokenizer(base_dir: str):
    from ..models import load_tokenizer

    return load_tokenizer(base_dir)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
