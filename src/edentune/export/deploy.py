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
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdentuneError
from ..io import file_sha256
from ..registry import REGISTRY_NAME, Registry
from .gate import GATE_HASH_FIELDS, check_export_files, check_gate, check_uploaded  # noqa: F401 - re-exported

DEFAULT_HOST = "http://127.0.0.1:11434"
# /api/create with from/files/adapters (the only form this module sends) exists since Ollama
# v0.5.5 (its release notes; the older form took Modelfile text). Dev builds report 0.0.0.
MIN_OLLAMA_VERSION = (0, 5, 5)
SMOKE_PROMPT = "Introduce yourself in one sentence, then name three colours."
SMOKE_OPTIONS = {"temperature": 0, "top_k": 1, "seed": 0, "num_predict": 24}
_HOST_HINT = "give --host (or export.ollama_host / $OLLAMA_HOST) as http://HOST:PORT, e.g. http://127.0.0.1:11434"


class OllamaRefused(EdentuneError):
    """Ollama answered the request with an error status (as opposed to not answering at all)."""

    def __init__(self, message: str, *, error: str, status: int, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.error, self.status = error, status


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


def full_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def previous_name(name: str) -> str:
    repo, tag = full_name(name).rsplit(":", 1)
    return f"{repo}:previous" if tag == "latest" else f"{repo}:{tag}-previous"


def ollama_host(cfg, host: str | None = None) -> str:
    """`--host`, else the config's `export.ollama_host`, else $OLLAMA_HOST, else Ollama's default."""
    return check_host(host or cfg.export.ollama_host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST)


def check_host(host: str) -> str:
    """A host the client can use (ollama's own forms: `HOST`, `HOST:PORT`, `http(s)://HOST:PORT/path`), else an error."""
    text = host.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    problem = None
    if not text or any(c.isspace() or ord(c) < 32 for c in text):
        problem = "it is empty or contains spaces"
    elif scheme not in ("http", "https"):
        problem = f"the scheme {scheme!r} is not http or https"
    else:
        try:
            split = urllib.parse.urlsplit(f"{scheme}://{rest}")
            split.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
        except ValueError as err:
            problem = str(err)
        else:
            if not split.hostname and not rest.startswith(":"):
                problem = "it names no host"
    if problem:
        raise EdentuneError(f"malformed Ollama host {host!r}: {problem}", hint=_HOST_HINT)
    return text


UPLOAD_MIN_RATE = 1 << 20  # bytes/s: an upload moving at least this fast is given more time than its deadline


class _Server:
    """The Ollama a deploy talks to: a client for quick calls, one with the long read timeout for
    blob upload, create and chat (which loads the model), and errors that name the host."""

    def __init__(self, host: str, timeout: float, long_timeout: float, client=None, deadline: float = 60.0,
                 long_deadline: float = 1200.0):
        self.host, self.timeout, self.long_timeout = check_host(host), timeout, long_timeout
        self.deadline, self.long_deadline = deadline, long_deadline  # overall, however slowly it trickles (netdeadline)
        if client is not None:
            self.quick = self.slow = client
            return
        import httpx
        import ollama

        from ..netdeadline import client_transport

        try:
            self.quick = ollama.Client(host=self.host, timeout=httpx.Timeout(self.timeout), transport=client_transport())
            self.slow = ollama.Client(host=self.host, timeout=httpx.Timeout(self.long_timeout, connect=self.timeout),
                                      transport=client_transport())
        except (ValueError, httpx.InvalidURL) as err:
            raise EdentuneError(f"malformed Ollama host {self.host!r}: {err}", hint=_HOST_HINT) from None

    @classmethod
    def for_config(cls, cfg, host: str | None = None, client=None) -> _Server:
        return cls(ollama_host(cfg, host), cfg.export.ollama_timeout_s, cfg.export.ollama_create_timeout_s, client,
                   cfg.export.ollama_deadline_s, cfg.export.ollama_create_deadline_s)

    @classmethod
    def for_plan(cls, plan: DeployPlan, client=None) -> _Server:
        deadlines = (plan.cfg.export.ollama_deadline_s, plan.cfg.export.ollama_create_deadline_s) if plan.cfg else ()
        return cls(plan.host, plan.timeout_s, plan.create_timeout_s, client, *deadlines)

    def call(self, method: str, *args, slow: bool = False, what: str = "the request", **kwargs):
        import httpx
        import ollama

        from ..netdeadline import deadline

        client, timeout = (self.slow, self.long_timeout) if slow else (self.quick, self.timeout)
        overall = self.long_deadline if slow else self.deadline
        try:
            with deadline(overall, min_rate=UPLOAD_MIN_RATE if slow else None) as limit:
                return getattr(client, method)(*args, **kwargs)
        except ollama.ResponseError as err:
            if _looks_like_html(err.error):
                raise self.not_ollama(f"it answered {what} with HTTP {err.status_code}") from None
            raise OllamaRefused(f"Ollama at {self.host} refused {what}: {err.error} (HTTP {err.status_code})",
                                error=str(err.error), status=err.status_code) from None
        except ConnectionError as err:  # ollama's wrapper of httpx.ConnectError (refused, DNS)
            raise EdentuneError(f"cannot reach Ollama at {self.host}: {_connect_reason(err)}",
                                hint="start it with `ollama serve`, or check --host / export.ollama_host / $OLLAMA_HOST") from None
        except httpx.TimeoutException as err:
            if limit.expired:
                key = "export.ollama_create_deadline_s" if slow else "export.ollama_deadline_s"
                raise EdentuneError(f"Ollama at {self.host} did not finish {what} within the deadline of {overall:g} s: it answers "
                                    "too slowly or never stops", hint=f"check that Ollama (not another program) listens at that host "
                                    f"and port; for a slow server raise {key}") from None
            key = "export.ollama_create_timeout_s" if slow else "export.ollama_timeout_s"
            raise EdentuneError(
                f"Ollama at {self.host} did not answer {what} within {timeout:g} s ({type(err).__name__})",
                hint=f"check that Ollama (not another program) listens at that host and port; for a slow server raise {key}",
            ) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as err:
            raise EdentuneError(f"malformed Ollama host {self.host!r}: {err}", hint=_HOST_HINT) from None
        except httpx.TransportError as err:
            raise EdentuneError(f"the connection to Ollama at {self.host} failed during {what}: {err or type(err).__name__}",
                                hint="check that Ollama (not another program) listens at that host and port") from None
        except ValueError as err:  # JSON that is not JSON, or not the shape of Ollama's answer (pydantic)
            raise self.not_ollama(f"its answer to {what} is not Ollama's JSON ({str(err).splitlines()[0][:120]})") from None

    def not_ollama(self, why: str) -> EdentuneError:
        return EdentuneError(f"not an Ollama server at {self.host}: {why}",
                             hint="check --host / export.ollama_host: it must be Ollama's API address (default port 11434)")

    def version(self) -> str:
        # ollama-python 0.6.3 has no method for /api/version; its _request_raw keeps the error mapping.
        try:
            response = self.call("_request_raw", "GET", "/api/version", what="GET /api/version")
        except OllamaRefused as err:  # every Ollama has this endpoint
            raise self.not_ollama(f"GET /api/version answered HTTP {err.status}") from None
        try:
            version = response.json()["version"]
        except (ValueError, KeyError, TypeError):
            raise self.not_ollama("GET /api/version did not return Ollama's {\"version\": ...}") from None
        if not isinstance(version, str):
            raise self.not_ollama("GET /api/version did not return a version string")
        return version

    def show(self, name: str) -> dict:
        """The raw /api/show answer (the client's model drops fields such as `remote_host`)."""
        response = self.call("_request_raw", "POST", "/api/show", json={"model": name}, what=f"/api/show for {name}")
        try:
            shown = response.json()
        except ValueError:
            raise self.not_ollama(f"/api/show for {name} is not JSON") from None
        if not isinstance(shown, dict):
            raise self.not_ollama(f"/api/show for {name} is not a JSON object")
        return shown

    def models(self) -> set[str]:
        return {full_name(m.model) for m in self.call("list", what="GET /api/tags").models if m.model}


def _looks_like_html(text) -> bool:
    return isinstance(text, str) and text.lstrip()[:15].lower().startswith(("<!doctype", "<html"))


def _connect_reason(err: BaseException) -> str:
    cause = str(err.__context__ or err)
    if any(s in cause for s in ("Name or service not known", "nodename nor servname", "getaddrinfo", "No address associated")):
        return f"the host name does not resolve ({cause})"
    if "refused" in cause.lower():
        return "connection refused (nothing listens on that port)"
    return cause


def version_tuple(version: str) -> tuple[int, int, int] | None:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version.strip())
    return tuple(int(x) for x in m.groups()) if m else None  # type: ignore[return-value]


def remote_reason(name: str, shown: dict | None = None) -> str | None:
    """Why `name` is a model that runs elsewhere (Ollama cloud models are tagged `:cloud` or
    `…-cloud` and /api/show reports their `remote_host`), or None for a local model."""
    if "://" in name:
        return "it is a URL, not a local model"
    tag = full_name(name).rsplit(":", 1)[1]
    if tag == "cloud" or tag.endswith("-cloud"):
        return "it is an Ollama cloud model (runs on ollama.com)"
    if shown and (shown.get("remote_host") or shown.get("remote_model")):
        return f"it is a remote model served by {shown.get('remote_host') or 'another host'}"
    return None


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
    server = _Server.for_config(cfg, host, client)
    version = server.version()
    base = cfg.export.ollama_base
    if full_name(base) not in server.models():
        raise EdentuneError(f"base model {base!r} is not in Ollama at {server.host}",
                            hint=f"run `ollama pull {base}` first (edentune never lets Ollama pull it silently)")
    return version


# -- registry: the standalone deploy's history (a cycle records its own deploys per round) -------

LEGACY_HISTORY = "deployments.json"  # the JSON history of edentune before the SQLite registry


def default_registry(cfg) -> Path:
    return Path(cfg.training.output_dir) / REGISTRY_NAME


def registry_paths(registry: str | Path) -> tuple[Path, Path | None]:
    """(the SQLite registry, the legacy JSON history to import into it) for a `--registry` PATH:
    a SQLite file; a folder (a cycle workspace): FOLDER/registry.sqlite; a legacy `.json` history:
    registry.sqlite beside it. The legacy history is that .json, else a deployments.json beside
    the SQLite file (the old default place), when it exists."""
    path = Path(registry)
    if path.suffix.lower() == ".json":
        return path.parent / REGISTRY_NAME, path if path.exists() else None
    if path.is_dir():
        path = path / REGISTRY_NAME
    legacy = path.parent / LEGACY_HISTORY
    return path, legacy if legacy.exists() else None


def open_registry(registry: str | Path) -> Registry:
    """The registry for `registry` (see registry_paths), opened for writing (created or upgraded),
    with the legacy JSON history imported once (the JSON file itself is only read). Any problem
    is an EdentuneError, raised before the caller touches Ollama."""
    path, legacy = registry_paths(registry)
    imported = read_legacy_history(legacy) if legacy is not None else None
    try:
        reg = Registry(path)
    except EdentuneError as err:
        raise EdentuneError(f"deploy registry {err.args[0]}",
                            hint="; ".join(filter(None, [err.hint, "nothing was changed in Ollama"]))) from None
    if imported is not None:
        try:
            reg.import_events(history_events(imported), source=str(legacy.resolve()), sha256=file_sha256(legacy))
        except BaseException:
            reg.close()
            raise
    return reg


def read_legacy_history(path: str | Path) -> list[dict]:
    """The records of a deployments.json written by an older edentune; an unreadable file is an error."""
    path = Path(path)
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise EdentuneError(f"deploy history {path} cannot be read ({str(err)[:200]})",
                            hint="repair it or move it aside (its records are imported into the registry once); "
                                 "nothing was changed in Ollama") from None
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise EdentuneError(f"deploy history {path} is not a list of deploy records",
                            hint="repair it or move it aside (its records are imported into the registry once); "
                                 "nothing was changed in Ollama")
    return history


def history_events(records: list[dict]) -> list[dict]:
    """One registry event per deploy/rollback record, with the cycle's event kinds: "deploy",
    "error" (a failed deploy, rolled back) or "rollback"; the record itself under detail.records
    (as in the cycle's deploy events). No round or persona: a standalone deploy has neither."""
    events = []
    for r in records:
        kind = "rollback" if r.get("action") == "rollback" else "error" if r.get("status") == "rolled back" else "deploy"
        detail = {"records": [r]} | ({"error": r.get("error")} if kind == "error" else {})
        events.append({"kind": kind, "model": r["model"] if isinstance(r.get("model"), str) else None,
                       "time": r["time"] if isinstance(r.get("time"), str) else None, "detail": detail})
    return events


def record_history(registry: Path, records: list[dict]) -> None:
    with Registry(registry) as reg:
        reg.record_events(history_events(records))


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
    server = _Server.for_config(cfg, host, client)
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
    server = _Server.for_plan(plan, client)
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


def _create(server: _Server, mp: ModelPlan, route: str, gguf: Path, digest: str | None) -> None:
    kwargs = dict(model=mp.name, system=mp.system, parameters=mp.parameters, stream=False)  # never `quantize` a GGUF
    if route == "adapter":
        kwargs.update(from_=mp.from_, adapters={gguf.name: digest}, template=mp.template)
    else:
        from .modelfile import CHATML_TEMPLATE

        kwargs.update(files={gguf.name: digest}, template=mp.template if mp.template_source != "base" else CHATML_TEMPLATE)
    server.call("create", slow=True, what=f"creating {mp.name}", **kwargs)


def _confirm(server: _Server, mp: ModelPlan, adapter: bool) -> None:
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


def _undo(server: _Server, touched: list[ModelPlan]) -> dict[str, str]:
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
    return {"action": "deploy", "status": "live", "model": mp.name, "time": _now(), "host": plan.host,
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


def smoke_check(server: _Server, mp: ModelPlan, with_adapter: str, without_adapter: str) -> dict:
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
    server = _Server.for_config(cfg, host, client)
    server.version()  # is it Ollama at all: a clear error before any other call
    name = full_name(name or cfg.export.model_name)
    previous = previous_name(name)
    if previous not in server.models():
        raise EdentuneError(f"no previous version of {name} in Ollama ({previous} not found)",
                            hint="rollback restores the model that the last `edentune deploy` replaced")
    server.call("copy", previous, name, what=f"restoring {name}")
    record = {"action": "rollback", "model": name, "time": _now(), "host": server.host, "restored_from": previous}
    if registry is not None:
        record_history(registry, [record])
    return record


def _load_tokenizer(base_dir: str):
    from ..models import load_tokenizer

    return load_tokenizer(base_dir)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
