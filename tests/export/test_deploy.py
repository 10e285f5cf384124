"""Deploy against a stand-in Ollama server (Ollama cannot run here): plan touches nothing, create,
confirm through /api/show, keep and restore the previous model, the gate re-checks its hashes, the
registry (SQLite, shared with the cycle) is checked before anything is created, and every network failure (down, silent, not
Ollama, malformed host) is a clear, bounded error. The smoke check is in test_smoke_check.py."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import httpx
import pytest
from conftest import make_adapter
from gate_results import SUITE_SHA, scored_comparison
from ollama_standin import OllamaStandIn
from qwen25_template import QWEN25_OLLAMA_TEMPLATE

from edentune.config import RunConfig
from edentune.errors import EdentuneError
from edentune.export import export_adapter
from edentune.export.deploy import (
    DeployPlan,
    apply_deploy,
    check_gate,
    deploy,
    plan_deploy,
    rollback,
)
from edentune.export.modelfile import CHATML_TEMPLATE, STOP_TOKENS
from edentune.export.ollama import check_host
from edentune.io import file_sha256
from edentune.registry import Registry

QWEN_BASE = {"qwen2.5:14b": {"template": QWEN25_OLLAMA_TEMPLATE, "parameters": {"stop": ["<|im_start|>", "<|im_end|>"]}}}
CHANGING = {"/api/create", "/api/copy", "/api/delete"}


def history(path: Path) -> list:
    """The events of a registry, read the way `cycle status` reads one (read-only)."""
    with Registry(path, readonly=True) as reg:
        return reg.events()


def changes(server: OllamaStandIn) -> list[tuple[str, str]]:
    """Requests that change something in Ollama (blob uploads included)."""
    return [(m, p) for m, p in server.requests if p in CHANGING or (m == "POST" and p.startswith("/api/blobs/"))]


@pytest.fixture(scope="module")
def exported(tiny_qwen2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    cfg = RunConfig()
    cfg.model.name_or_path = tiny_qwen2_dir
    cfg.training.output_dir = str(tmp / "run")
    result = export_adapter(cfg, make_adapter(tiny_qwen2_dir, tmp / "ad"), tmp / "export", verify=False)
    return cfg, result


def test_deploy_creates_confirms_and_rolls_back(exported, tmp_path):
    cfg, result = exported
    registry = tmp_path / "registry.sqlite"
    with OllamaStandIn(QWEN_BASE) as server:
        first = deploy(cfg, result.out_dir, host=server.host, registry=registry, smoke=False)[0]
        model = server.models["eden:latest"]
        assert model["adapters"] == {"adapter.gguf": first["digest"]} and model["from"] == "qwen2.5:14b"
        assert model["system"] == cfg.model.system_prompt
        assert model["parameters"]["stop"] == list(STOP_TOKENS) and model["parameters"]["num_ctx"] == cfg.export.num_ctx
        assert model["template"] == QWEN25_OLLAMA_TEMPLATE  # the base's template already matches training
        assert first["previous"] is None and first["digest"] in server.blobs
        assert first["route"] == "adapter" and first["ollama_version"] == "0.13.0" and first["smoke"] == {"status": "skipped"}
        assert all("quantize" not in req for req in server.create_requests)  # never re-quantize a GGUF

        server.models["eden:latest"]["system"] = "the old persona"  # make the current model recognisable
        second = deploy(cfg, result.out_dir, host=server.host, registry=registry, smoke=False)[0]
        assert second["previous"] == "eden:previous"
        assert server.models["eden:previous"]["system"] == "the old persona"
        assert server.models["eden:latest"]["system"] == cfg.model.system_prompt

        restored = rollback(cfg, host=server.host, registry=registry)
        assert restored["restored_from"] == "eden:previous"
        assert server.models["eden:latest"]["system"] == "the old persona"
    events = history(registry)
    assert [(e.kind, e.model, e.round_id, e.persona) for e in events] == [
        ("deploy", "eden:latest", None, None), ("deploy", "eden:latest", None, None), ("rollback", "eden:latest", None, None)]
    assert [e.detail["records"] for e in events] == [[first], [second], [restored]]
    assert events[0].time == first["time"]


def test_deploy_functions_return_records_and_persist_nothing_by_themselves(exported, tmp_path):
    cfg, result = exported
    cfg = cfg.updated({"training.output_dir": str(tmp_path / "run")})
    with OllamaStandIn(QWEN_BASE) as server:
        records = deploy(cfg, result.out_dir, host=server.host, smoke=False)
    assert records[0]["model"] == "eden:latest" and not (tmp_path / "run").exists()


def test_plan_touches_nothing_in_ollama(exported):
    cfg, result = exported
    with OllamaStandIn(QWEN_BASE) as server:
        server.models["eden:latest"] = {"from": "qwen2.5:14b", "system": "old"}
        plan = plan_deploy(cfg, result.out_dir, host=server.host)
        assert isinstance(plan, DeployPlan) and changes(server) == []
        assert {p for _, p in server.requests} == {"/api/version", "/api/tags", "/api/show"}
        (mp,) = plan.models
        assert (plan.route, mp.name, mp.from_, mp.previous, mp.template_source) == ("adapter", "eden:latest", "qwen2.5:14b", "eden:previous", "base")
        assert plan.ollama_version == "0.13.0" and plan.merged_fallback is None and plan.timeout_s == 30
        assert server.models["eden:latest"]["system"] == "old"

        records = apply_deploy(plan, smoke=False)
        assert [p for _, p in changes(server)][-2:] == ["/api/copy", "/api/create"]
        assert records[0]["previous"] == "eden:previous" and server.models["eden:previous"]["system"] == "old"


def test_base_with_another_template_gets_edentune_chatml(exported):
    cfg, result = exported
    other = {"qwen2.5:14b": {"template": "{{ .System }}USER: {{ .Prompt }} ASSISTANT:"}}
    with OllamaStandIn(other) as server:
        (record,) = deploy(cfg, result.out_dir, host=server.host, smoke=False)
        assert server.models["eden:latest"]["template"] == CHATML_TEMPLATE and record["template"] == "edentune-chatml"


def test_missing_base_is_an_error_not_a_silent_pull(exported):
    cfg, result = exported
    with OllamaStandIn({}) as server:
        with pytest.raises(EdentuneError, match=r"base model 'qwen2.5:14b' is not in Ollama") as err:
            deploy(cfg, result.out_dir, host=server.host)
        assert "ollama pull qwen2.5:14b" in str(err.value)
        assert changes(server) == []


def with_base(result, tmp_path: Path, base: str) -> Path:
    """A copy of the export whose Modelfile says FROM `base`."""
    out = tmp_path / "export"
    shutil.copytree(result.out_dir, out)
    text = (out / "Modelfile").read_text()
    (out / "Modelfile").write_text(text.replace("FROM qwen2.5:14b", f"FROM {base}"))
    return out


@pytest.mark.parametrize("base", ["gpt-oss:120b-cloud", "gemma4:cloud", "https://example.com/model"])
def test_adapter_on_a_cloud_base_is_refused(exported, tmp_path, base):
    cfg, result = exported
    export_dir = with_base(result, tmp_path, base)
    with OllamaStandIn({base: {"template": CHATML_TEMPLATE}}) as server:
        with pytest.raises(EdentuneError, match="is not a local model") as err:
            plan_deploy(cfg, export_dir, host=server.host)
        assert "--merged" in str(err.value) and changes(server) == []


def test_adapter_on_a_remote_base_shown_by_ollama_is_refused(exported):
    cfg, result = exported
    remote = {"qwen2.5:14b": dict(QWEN_BASE["qwen2.5:14b"], remote_host="https://ollama.com:443")}
    with OllamaStandIn(remote) as server:
        with pytest.raises(EdentuneError, match=r"remote model served by https://ollama.com:443"):
            deploy(cfg, result.out_dir, host=server.host)
        assert changes(server) == []


def test_old_ollama_without_the_json_create_api_is_refused(exported):
    cfg, result = exported
    with OllamaStandIn(QWEN_BASE, version="0.5.4") as server:
        with pytest.raises(EdentuneError, match=r"version 0.5.4; deploy needs 0.5.5 or newer"):
            deploy(cfg, result.out_dir, host=server.host)
        assert changes(server) == []


def newer_registry(path: Path) -> str:
    """A registry written by a later edentune (schema version 99)."""
    Registry(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO schema_version VALUES (99, 'later')")
    raw.close()
    return "newer than this edentune"


@pytest.mark.parametrize("damage", ["not sqlite", "damaged", "newer"])
def test_a_broken_registry_is_an_error_before_ollama_is_touched(exported, tmp_path, damage):
    cfg, result = exported
    registry = tmp_path / "registry.sqlite"
    if damage == "not sqlite":
        registry.write_text('[{"action": "deploy"}]' * 100)
        match = "cannot open the registry"
    elif damage == "damaged":  # a real registry whose pages were overwritten
        Registry(registry).close()
        data = bytearray(registry.read_bytes())
        data[100:] = b"\xff" * (len(data) - 100)
        registry.write_bytes(bytes(data))
        match = "cannot open the registry"
    else:
        match = newer_registry(registry)
    before = registry.read_bytes()
    with OllamaStandIn(QWEN_BASE) as server:
        for call in (lambda: deploy(cfg, result.out_dir, host=server.host, registry=registry),
                     lambda: rollback(cfg, host=server.host, registry=registry)):
            with pytest.raises(EdentuneError, match=f"deploy registry {registry}.*{match}") as err:
                call()
            assert err.value.hint and "nothing was changed in Ollama" in err.value.hint
        assert server.requests == [] and "eden:latest" not in server.models
    assert registry.read_bytes() == before  # never rewritten


def test_a_broken_legacy_history_is_an_error_before_ollama_is_touched(exported, tmp_path):
    cfg, result = exported
    legacy = tmp_path / "deployments.json"
    for text in ("{not json", '{"a": 1}', "[" * 100000):
        legacy.write_text(text)
        with OllamaStandIn(QWEN_BASE) as server:
            with pytest.raises(EdentuneError, match="deploy history .* (cannot be read|is not a list)") as err:
                deploy(cfg, result.out_dir, host=server.host, registry=tmp_path / "registry.sqlite")
            assert "nothing was changed in Ollama" in str(err.value)
            assert server.requests == [] and "eden:latest" not in server.models
        assert legacy.read_text() == text  # never overwritten
    assert not (tmp_path / "registry.sqlite").exists()


LEGACY = [  # what an older edentune appended to deployments.json: a deploy, a failed deploy, a rollback
    {"action": "deploy", "status": "live", "model": "eden:latest", "time": "2025-01-05T10:00:00+00:00", "route": "adapter",
     "previous": None, "smoke": {"status": "passed"}},
    {"action": "deploy", "status": "rolled back", "model": "eden:latest", "time": "2025-02-05T10:00:00+00:00", "route": "adapter",
     "previous": "eden:previous", "error": "smoke check failed", "restored": "restored from eden:previous"},
    {"action": "rollback", "model": "eden:latest", "time": "2025-03-01T09:00:00+00:00", "restored_from": "eden:previous"},
]


def test_a_legacy_history_is_imported_once_and_left_as_it_is(exported, tmp_path):
    cfg, result = exported
    cfg = cfg.updated({"training.output_dir": str(tmp_path / "run")})
    legacy = tmp_path / "run" / "deployments.json"  # the old default place
    legacy.parent.mkdir()
    legacy.write_text(json.dumps(LEGACY, indent=2))
    before = legacy.read_bytes()
    registry = tmp_path / "run" / "registry.sqlite"
    with OllamaStandIn(QWEN_BASE) as server:
        first = deploy(cfg, result.out_dir, host=server.host, registry=registry, smoke=False)[0]
        second = deploy(cfg, result.out_dir, host=server.host, registry=registry, smoke=False)[0]
    assert legacy.read_bytes() == before
    events = history(registry)
    assert [e.kind for e in events] == ["deploy", "error", "rollback", "import", "deploy", "deploy"]
    assert [e.time for e in events[:3]] == [r["time"] for r in LEGACY]  # the records keep their own times
    assert [e.detail["records"] for e in events[:3]] == [[r] for r in LEGACY]
    assert events[1].detail["error"] == "smoke check failed"
    assert events[3].detail == {"source": str(legacy.resolve()), "sha256": file_sha256(legacy), "events": 3}
    assert [e.detail["records"] for e in events[4:]] == [[first], [second]]

    # a .json given as --registry: imported (here: already, same content) into registry.sqlite beside it
    copy = tmp_path / "run" / "old-history.json"
    copy.write_bytes(before)
    with OllamaStandIn(QWEN_BASE) as server:
        server.models["eden:previous"] = {"from": "qwen2.5:14b"}
        restored = rollback(cfg, host=server.host, registry=copy)
    assert copy.read_bytes() == before
    events = history(registry)
    assert [e.kind for e in events[6:]] == ["rollback"] and events[-1].detail["records"] == [restored]


def test_a_json_registry_path_records_beside_it(exported, tmp_path):
    cfg, result = exported
    legacy = tmp_path / "hist" / "mine.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps(LEGACY[:1]))
    with OllamaStandIn(QWEN_BASE) as server:
        (record,) = deploy(cfg, result.out_dir, host=server.host, registry=legacy, smoke=False)
    events = history(tmp_path / "hist" / "registry.sqlite")
    assert [e.kind for e in events] == ["deploy", "import", "deploy"] and events[-1].detail["records"] == [record]
    assert json.loads(legacy.read_text()) == LEGACY[:1]


# -- the network: down, silent, not Ollama, malformed ----------------------------------------------

def test_ollama_not_running(exported):
    cfg, result = exported
    with OllamaStandIn() as server:
        host = server.host  # the port is closed after the block
    with pytest.raises(EdentuneError, match=f"cannot reach Ollama at {host}: connection refused") as err:
        deploy(cfg, result.out_dir, host=host)
    assert "ollama serve" in str(err.value)
    with pytest.raises(EdentuneError, match="cannot reach Ollama"):
        rollback(cfg, host=host)


def test_a_server_that_accepts_and_never_answers_times_out(exported):
    cfg, result = exported
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel accepts connections; nobody ever answers
    host = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.monotonic()
        with pytest.raises(EdentuneError, match=rf"Ollama at {host} did not answer GET /api/version within 0.5 s") as err:
            plan_deploy(cfg.updated({"export.ollama_timeout_s": 0.5}), result.out_dir, host=host)
        assert time.monotonic() - start < 10
        assert "export.ollama_timeout_s" in str(err.value)
    finally:
        listener.close()


class _WebPage(BaseHTTPRequestHandler):
    status = 200

    def log_message(self, *args):
        pass

    def _page(self):
        body = b"<!DOCTYPE html><html><body>Welcome to nginx!</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _page


class _NotFound(_WebPage):
    status = 404


class _OtherApi(_WebPage):
    """Another JSON API on the port: 404 {"error": ...} for Ollama's paths."""

    def _page(self):
        body = b'{"error": "no route"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _page


@pytest.mark.parametrize("handler", [_WebPage, _NotFound, _OtherApi])
def test_a_web_server_is_not_ollama(exported, handler):
    cfg, result = exported
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    Thread(target=server.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(EdentuneError, match=f"not an Ollama server at {host}") as err:
            deploy(cfg, result.out_dir, host=host)
        assert "11434" in str(err.value)  # says what to check
        with pytest.raises(EdentuneError, match=f"not an Ollama server at {host}"):
            rollback(cfg, host=host)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("host", ["ftp://127.0.0.1:11434", "http://127.0.0.1:99999", "http://127.0.0.1:port", "http://", "local host:11434", ""])
def test_a_malformed_host_is_a_clear_error(exported, host):
    cfg, result = exported
    with pytest.raises(EdentuneError, match="malformed Ollama host") as err:
        deploy(cfg.updated({"export.ollama_host": host or " "}), result.out_dir)
    assert "http://HOST:PORT" in str(err.value)


def test_hosts_in_ollamas_own_forms_are_accepted():
    for host in ("127.0.0.1", "localhost:11434", "http://[::1]:11434", "https://example.com/ollama", ":11434"):
        assert check_host(host) == host


def test_an_unresolvable_host_is_named_as_such():
    from edentune.export.ollama import _connect_reason

    try:
        try:
            raise httpx.ConnectError("[Errno -2] Name or service not known")
        except httpx.ConnectError:
            raise ConnectionError("Failed to connect to Ollama.")  # what the ollama client raises
    except ConnectionError as err:
        assert _connect_reason(err).startswith("the host name does not resolve")


# -- the stand-in, personas, rollback -------------------------------------------------------------

def test_rollback_without_previous(exported):
    cfg, _ = exported
    with OllamaStandIn(QWEN_BASE) as server, pytest.raises(EdentuneError, match="no previous version of eden:latest"):
        rollback(cfg, host=server.host)


def test_standin_follows_the_documented_api():
    with OllamaStandIn(QWEN_BASE) as server:
        assert httpx.get(f"{server.host}/api/version").json() == {"version": "0.13.0"}
        bad = httpx.post(f"{server.host}/api/blobs/sha256:{'0' * 64}", content=b"data")
        assert bad.status_code == 400
        legacy = httpx.post(f"{server.host}/api/create", json={"model": "x", "modelfile": "FROM qwen2.5:14b"})
        assert legacy.status_code == 400 and "modelfile" in legacy.json()["error"]
        streamed = httpx.post(f"{server.host}/api/create", json={"model": "x", "from": "qwen2.5:14b"})
        assert [json.loads(line)["status"] for line in streamed.text.splitlines()][-1] == "success"
        assert httpx.post(f"{server.host}/api/chat", json={"model": "nope", "stream": False}).status_code == 404
        assert httpx.request("DELETE", f"{server.host}/api/delete", json={"model": "x"}).status_code == 200


def test_personas_and_host_from_the_config(exported, tmp_path, monkeypatch):
    """`export.personas` gives one Ollama model per persona on the same adapter; `export.ollama_host`
    is used when no --host is given (and wins over $OLLAMA_HOST)."""
    base_cfg, _ = exported
    personas = {"eden": base_cfg.model.system_prompt, "eden-formal:v2": "You are Eden. Always answer formally."}
    cfg = base_cfg.updated({"export.personas": personas, "training.output_dir": str(tmp_path / "run")})
    result = export_adapter(cfg, make_adapter(cfg.model.name_or_path, tmp_path / "ad"), tmp_path / "export", verify=False)
    assert set(result.modelfiles) == set(personas)
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")  # nothing listens there: must not be used
    with OllamaStandIn(QWEN_BASE) as server:
        records = deploy(cfg.updated({"export.ollama_host": server.host}), result.out_dir, smoke=False)
        assert {r["model"] for r in records} == {"eden:latest", "eden-formal:v2"}
        assert server.models["eden:latest"]["system"] == personas["eden"]
        assert server.models["eden-formal:v2"]["system"] == personas["eden-formal:v2"]
        assert server.models["eden-formal:v2"]["adapters"] == server.models["eden:latest"]["adapters"]


def test_a_persona_without_a_prompt_is_a_config_error():
    from edentune.config import parse_config
    from edentune.errors import ConfigError

    with pytest.raises(ConfigError, match="persona 'eden-ko'"):
        parse_config({"export": {"personas": {"eden-ko": "  "}}})


# -- the gate ---------------------------------------------------------------------------------------
# The gate's tampering cases through the real command line are in test_gate_binding.py.

def test_deploy_gate_ships_only_a_better_model_and_only_this_adapter(exported, tmp_path):
    cfg, result = exported
    sha = json.loads(result.report_path.read_text())["adapter_sha256"]
    assert sha == file_sha256(Path(result.report["adapter_dir"]) / "adapter_model.safetensors")
    registry = tmp_path / "run" / "registry.sqlite"
    with OllamaStandIn(QWEN_BASE) as server:
        with pytest.raises(EdentuneError, match="not deploying: the comparison says .*Persona adherence is worse"):
            deploy(cfg, result.out_dir, host=server.host, registry=registry,
                   gate=scored_comparison(tmp_path / "worse", sha, better=False))
        with pytest.raises(EdentuneError, match="not deploying: .* scored adapter 000000000000"):
            deploy(cfg, result.out_dir, host=server.host, gate=scored_comparison(tmp_path / "other", "0" * 64))
        with pytest.raises(EdentuneError, match="not a comparison.json"):
            deploy(cfg, result.out_dir, host=server.host, gate=tmp_path / "missing.json")
        assert "eden:latest" not in server.models and server.requests == [] and not registry.exists()

        ok = scored_comparison(tmp_path / "ok", sha)
        (record,) = deploy(cfg, result.out_dir, host=server.host, gate=ok, registry=registry, smoke=False)
        assert "eden:latest" in server.models
        report = json.loads(result.report_path.read_text())
        assert record["gate"] == {"comparison": str(ok), "adapter_sha256": sha, "suite_sha256": SUITE_SHA,
                                  "results_checked": {"base": str(tmp_path / "ok" / "baseline.json"),
                                                      "candidate": str(tmp_path / "ok" / "candidate.json")},
                                  "files_sha256": report["files"]}
        assert record["digest"] == "sha256:" + report["files"]["adapter.gguf"]


@pytest.mark.parametrize("missing", ["suite_sha256", "base_results_sha256", "candidate_results_sha256", "candidate_adapter_sha256"])
def test_gate_refuses_an_old_comparison_without_hashes(tmp_path, missing):
    comparison = scored_comparison(tmp_path, "a" * 64)
    verdict = json.loads(comparison.read_text())
    verdict[missing] = None
    comparison.write_text(json.dumps(verdict))
    with pytest.raises(EdentuneError, match=f"has no {missing}.*older `edentune compare`") as err:
        check_gate(comparison, {"adapter_sha256": "a" * 64}, RunConfig())
    assert "re-run `edentune compare`" in str(err.value)


def test_gate_refuses_results_changed_after_compare(tmp_path):
    comparison = scored_comparison(tmp_path, "a" * 64)
    assert check_gate(comparison, {"adapter_sha256": "a" * 64}, RunConfig())["results_checked"]
    (tmp_path / "candidate.json").write_text((tmp_path / "candidate.json").read_text().replace('"tuned"', '"other"'))
    with pytest.raises(EdentuneError, match=r"candidate.json changed after `edentune compare` scored it"):
        check_gate(comparison, {"adapter_sha256": "a" * 64}, RunConfig())


# -- the CLI ----------------------------------------------------------------------------------------

def test_export_cli_does_not_import_the_root_cli():
    code = "import sys, edentune.export.cli; assert 'edentune.cli' not in sys.modules, 'imports the root CLI'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deploy_cli_writes_the_registry(exported, tmp_path):
    from typer.testing import CliRunner

    from edentune.cli import app

    cfg, result = exported
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.updated({"training.output_dir": str(tmp_path / "run")}).model_dump(mode="json")))
    runner = CliRunner()
    assert "--no-smoke-check" in runner.invoke(app, ["deploy", "--help"]).output
    with OllamaStandIn(QWEN_BASE) as server:
        out = runner.invoke(app, ["deploy", str(config), "-e", str(result.out_dir), "--host", server.host, "--no-smoke-check"])
        assert out.exit_code == 0, out.output
        assert "eden:latest" in server.models
        registry = tmp_path / "run" / "registry.sqlite"
        assert f"recorded in {registry}" in " ".join(out.output.split())  # rich wraps long lines

        server.models["eden:previous"] = {"from": "qwen2.5:14b"}
        workspace = tmp_path / "ws"  # a folder (a cycle workspace): its registry.sqlite
        workspace.mkdir()
        out = runner.invoke(app, ["deploy", str(config), "--rollback", "--host", server.host, "--registry", str(workspace)])
        assert out.exit_code == 0, out.output
    (event,) = history(registry)
    (record,) = event.detail["records"]
    assert event.kind == "deploy" and record["model"] == "eden:latest" and record["smoke"] == {"status": "skipped"}
    (event,) = history(workspace / "registry.sqlite")
    assert event.kind == "rollback" and f"recorded in {workspace / 'registry.sqlite'}" in " ".join(out.output.split())


# -- a server that trickles: the overall deadline (export.ollama_deadline_s / _create_deadline_s) --

def _edentune(*args: str) -> subprocess.CompletedProcess:
    import os

    src = str(Path(__file__).resolve().parents[2] / "src")
    return subprocess.run([sys.executable, "-m", "edentune.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": src, "COLUMNS": "200"})


def test_deploy_and_rollback_against_a_trickling_server_end_at_the_deadline(exported, tmp_path, trickle_server):
    """Headers at once, then one byte every 0.25 s: inside the 30 s read timeout each time, so
    only the overall deadline ends `deploy` and `deploy --rollback`, with a message naming it."""
    cfg, result = exported
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.updated({"training.output_dir": str(tmp_path / "run"),
                                              "export.ollama_deadline_s": 1.5}).model_dump(mode="json")))
    for args in (["-e", str(result.out_dir), "--no-smoke-check"], ["--rollback"]):
        start = time.monotonic()
        res = _edentune("deploy", str(config), *args, "--host", trickle_server.url)
        assert time.monotonic() - start < 60  # a 2 s deadline plus the start of Python; the body alone would take years
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        message = " ".join(res.stderr.split())
        assert f"Ollama at {trickle_server.url} did not finish GET /api/version within the deadline of 1.5 s" in message
        assert "export.ollama_deadline_s" in message
    registry = tmp_path / "run" / "registry.sqlite"
    assert not registry.exists() or history(registry) == []  # nothing was deployed or rolled back


def test_a_create_that_trickles_ends_at_its_deadline_and_the_previous_model_is_back(exported):
    cfg, result = exported
    with OllamaStandIn(QWEN_BASE) as server:
        server.models["eden:latest"] = {"from": "qwen2.5:14b", "system": "the old persona"}
        before = json.dumps(server.models, sort_keys=True)
        server.trickle_create = True
        with pytest.raises(EdentuneError, match="did not finish creating eden:latest within the deadline of 1.5 s") as err:
            deploy(cfg.updated({"export.ollama_create_deadline_s": 1.5}), result.out_dir, host=server.host, smoke=False)
        assert "export.ollama_create_deadline_s" in str(err.value)
        server.models.pop("eden:previous", None)  # the copy kept while deploying (restored from)
        assert json.dumps(server.models, sort_keys=True) == before


def test_another_programs_database_as_registry_is_refused_untouched(exported, tmp_path):
    """`deploy --registry other.sqlite`: checked read-only before any write or pragma, so it is
    not even switched to WAL: the file stays byte for byte as it was, and no -wal file appears."""
    cfg, result = exported
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as raw:  # another program's database, in SQLite's default rollback-journal mode
        raw.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        raw.execute("INSERT INTO notes (text) VALUES ('keep me')")
    raw.close()
    before = other.read_bytes()
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.updated({"training.output_dir": str(tmp_path / "run")}).model_dump(mode="json")))
    with OllamaStandIn(QWEN_BASE) as server:
        for args in (["-e", str(result.out_dir), "--no-smoke-check"], ["--rollback"]):
            res = _edentune("deploy", str(config), *args, "--host", server.host, "--registry", str(other))
            message = " ".join(res.stderr.split())
            assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
            assert f"{other}: not an edentune registry (a database of another program, with the table(s) notes)" in message
            assert "nothing was changed in Ollama" in message
        assert server.requests == []
    assert other.read_bytes() == before and before[18:20] == b"\x01\x01"  # header bytes 18-19: 1 = rollback journal, 2 = WAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite", "run.yaml"]
