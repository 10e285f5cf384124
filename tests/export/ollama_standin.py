"""STAND-IN for an Ollama server, for tests only: Ollama cannot run on the CI machines.

It implements the few endpoints edentune's deploy uses, following Ollama's API documentation:
version, blobs (HEAD/POST with digest check), create (JSON fields only: Modelfile text is refused,
a missing `from` model is an error instead of a pull), show, tags, copy, delete, and chat. Models
are kept in memory; `show` renders a Modelfile text the way Ollama's does
(FROM/ADAPTER/TEMPLATE/SYSTEM/PARAMETER) and the base's `details` and `model_info` (given per
base model, inherited through FROM). A model's digest in /api/tags is a
hash of its content, so a copy has the digest of its source and a created model a new one (as
Ollama's manifest digests behave); `size` is given per base model (default 1).

`/api/chat` really answers, as Ollama's llama.cpp runner does: the base GGUF registered for the
FROM name (`{"gguf": path}` in `base_models`) plus the created model's adapter blob as a GGUF LoRA
at scale 1 (or the model's own GGUF blob), the prompt rendered from the model's TEMPLATE and
SYSTEM by the Go-template renderer; it always decodes greedily (sampling options other than
num_predict are ignored). Switches simulate known failures: `drop_adapters` (answers from the
base alone, as when an adapter is silently not applied) and `refuse_adapters` (create refuses a
GGUF adapter, as a newer Ollama may); `trickle_create` (create sends its answer one byte at a time, forever).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CREATE_FIELDS = {"model", "from", "files", "adapters", "template", "license", "system", "parameters", "messages",
                 "quantize", "stream"}


def _full(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


class OllamaStandIn:
    def __init__(self, base_models: dict[str, dict] | None = None, *, version: str = "0.13.0",
                 drop_adapters: bool = False, refuse_adapters: bool = False, trickle_create: bool = False):
        self.blobs: dict[str, bytes] = {}
        self.models: dict[str, dict] = {_full(k): dict(v) for k, v in (base_models or {}).items()}
        self.requests: list[tuple[str, str]] = []
        self.create_requests: list[dict] = []
        self.version, self.drop_adapters, self.refuse_adapters = version, drop_adapters, refuse_adapters
        self.trickle_create = trickle_create  # create answers its headers, then one byte every 0.25 s, forever
        self._llamas: dict[tuple, object] = {}
        self._blob_dir = Path(tempfile.mkdtemp(prefix="ollama-standin-"))
        self.stopped = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.host = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._llamas.clear()
        shutil.rmtree(self._blob_dir, ignore_errors=True)

    def _blob_file(self, digest: str) -> Path:
        path = self._blob_dir / digest.replace(":", "-")
        if not path.exists():
            path.write_bytes(self.blobs[digest])
        return path

    def _weights(self, name: str) -> tuple[str, list[str]]:
        """(model GGUF, adapter GGUFs) that llama.cpp loads for a model, following FROM."""
        m = self.models[name]
        if m.get("gguf"):
            return str(m["gguf"]), []
        if m.get("files"):
            return str(self._blob_file(next(iter(m["files"].values())))), []
        if not m.get("from") or _full(m["from"]) not in self.models:
            raise LookupError(f"model {name} has no weights")
        model, adapters = self._weights(_full(m["from"]))
        if not self.drop_adapters:
            adapters = adapters + [str(self._blob_file(d)) for d in (m.get("adapters") or {}).values()]
        return model, adapters

    def answer(self, name: str, messages: list[dict], options: dict) -> str:
        from edentune.export.adapter_gguf import validate_adapter_against_base
        from edentune.export.parity import greedy_answer, llama_model, render_ollama_prompt

        m = self.models[name]
        model, adapters = self._weights(name)
        if len(adapters) > 1:
            raise LookupError("the stand-in serves at most one adapter")
        for adapter in adapters:
            validate_adapter_against_base(adapter, model)  # a bad adapter segfaults llama-cpp-python
        key = (model, tuple(adapters))
        if key not in self._llamas:
            self._llamas[key] = llama_model(model, lora=adapters[0] if adapters else None, n_ctx=1024, n_threads=1)
        params = m.get("parameters") or {}
        prompt = render_ollama_prompt(m.get("template") or "{{ .Prompt }}", m.get("system"), messages)
        stops = params.get("stop") or []
        n = int(options.get("num_predict") or params.get("num_predict") or 128)
        return greedy_answer(self._llamas[key], prompt, n, stops if isinstance(stops, list) else [stops])

    def digest(self, name: str) -> str:
        return hashlib.sha256(json.dumps(self.models[name], sort_keys=True, default=str).encode()).hexdigest()

    def inherited(self, name: str, key: str):
        """A base model's own field (details, model_info, size), followed through FROM."""
        m, seen = self.models.get(name), set()
        while m is not None and m.get(key) is None and m.get("from") and name not in seen:
            seen.add(name)
            name = _full(m["from"])
            m = self.models.get(name)
        return None if m is None else m.get(key)

    def modelfile(self, name: str) -> str:
        m = self.models[name]
        lines = ["# Modelfile generated by the stand-in", f"FROM {m.get('from') or 'blob'}"]
        lines += [f"ADAPTER /blobs/{d.replace(':', '-')}" for d in (m.get("adapters") or {}).values()]
        if m.get("template"):
            lines.append(f'TEMPLATE """{m["template"]}"""')
        if m.get("system") is not None:
            lines.append(f'SYSTEM """{m["system"]}"""')
        for k, v in (m.get("parameters") or {}).items():
            lines += [f"PARAMETER {k} {x}" for x in (v if isinstance(v, list) else [v])]
        return "\n".join(lines) + "\n"

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while (size := int(self.rfile.readline().strip(), 16)):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, code: int, obj=None, lines: list[dict] | None = None):
                data = b"".join(json.dumps(x).encode() + b"\n" for x in lines) if lines else json.dumps(obj or {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/x-ndjson" if lines else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _json(self) -> dict:
                return json.loads(self._body() or b"{}")

            def do_HEAD(self):
                standin.requests.append(("HEAD", self.path))
                digest = self.path.removeprefix("/api/blobs/")
                self._send(200 if digest in standin.blobs else 404)

            def do_GET(self):
                standin.requests.append(("GET", self.path))
                if self.path == "/api/version":
                    return self._send(200, {"version": standin.version})
                if self.path != "/api/tags":
                    return self._send(404, {"error": "not found"})
                self._send(200, {"models": [
                    {"model": n, "name": n, "digest": standin.digest(n), "size": standin.inherited(n, "size") or 1,
                     "modified_at": "2025-01-01T00:00:00Z"} for n in standin.models]})

            def do_DELETE(self):
                standin.requests.append(("DELETE", self.path))
                name = _full(self._json().get("model", ""))
                if standin.models.pop(name, None) is None:
                    return self._send(404, {"error": f"model '{name}' not found"})
                self._send(200)

            def do_POST(self):
                standin.requests.append(("POST", self.path))
                if self.path.startswith("/api/blobs/sha256:"):
                    digest, data = self.path.removeprefix("/api/blobs/"), self._body()
                    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                        return self._send(400, {"error": "digest mismatch"})
                    standin.blobs[digest] = data
                    return self._send(201)
                req = self._json()
                if self.path == "/api/create":
                    return self._create(req)
                if self.path == "/api/show":
                    name = _full(req.get("model", ""))
                    if name not in standin.models:
                        return self._send(404, {"error": f"model '{name}' not found"})
                    m = standin.models[name]
                    params = "\n".join(f"{k} {json.dumps(x)}" for k, v in (m.get("parameters") or {}).items()
                                       for x in (v if isinstance(v, list) else [v]))
                    shown = {"modelfile": standin.modelfile(name), "template": m.get("template", ""),
                             "system": m.get("system"), "parameters": params,
                             "details": standin.inherited(name, "details") or {}, "model_info": standin.inherited(name, "model_info") or {}}
                    if m.get("remote_host"):  # how Ollama shows a cloud model
                        shown.update(remote_host=m["remote_host"], remote_model=name)
                    return self._send(200, shown)
                if self.path == "/api/chat":
                    return self._chat(req)
                if self.path == "/api/copy":
                    src, dst = _full(req.get("source", "")), _full(req.get("destination", ""))
                    if src not in standin.models:
                        return self._send(404, {"error": f"model '{src}' not found"})
                    standin.models[dst] = dict(standin.models[src])
                    return self._send(200)
                self._send(404, {"error": "not found"})

            def _chat(self, req: dict):
                name = _full(req.get("model", ""))
                if name not in standin.models:
                    return self._send(404, {"error": f"model '{name}' not found"})
                if req.get("stream", True):
                    return self._send(400, {"error": "stand-in: only stream=false chat is implemented"})
                try:
                    text = standin.answer(name, req.get("messages") or [], req.get("options") or {})
                except Exception as err:  # noqa: BLE001 - reported like Ollama's runner errors
                    return self._send(500, {"error": f"stand-in runner: {err}"})
                self._send(200, {"model": name, "created_at": "2025-01-01T00:00:00Z", "done": True, "done_reason": "stop",
                                 "message": {"role": "assistant", "content": text}})

            def _create(self, req: dict):
                standin.create_requests.append(req)
                if standin.trickle_create:
                    return self._trickle()
                unknown = set(req) - CREATE_FIELDS
                if unknown:  # e.g. the old `modelfile` text field, which Ollama no longer accepts
                    return self._send(400, {"error": f"unknown field(s) {sorted(unknown)}"})
                if not req.get("model"):
                    return self._send(400, {"error": "model is required"})
                base = req.get("from")
                if base and _full(base) not in standin.models:
                    return self._send(404, {"error": f"stand-in: base '{base}' not present (real Ollama would pull it)"})
                if req.get("adapters") and standin.refuse_adapters:
                    return self._send(400, {"error": "stand-in: this Ollama does not accept GGUF adapters"})
                for digest in list((req.get("adapters") or {}).values()) + list((req.get("files") or {}).values()):
                    if digest not in standin.blobs:
                        return self._send(400, {"error": f"blob {digest} not found"})
                model = {k: req.get(k) for k in ("from", "adapters", "files", "system", "parameters")}
                inherited = standin.models.get(_full(base), {}) if base else {}
                model["template"] = req.get("template") or inherited.get("template")
                if model["system"] is None:
                    model["system"] = inherited.get("system")
                standin.models[_full(req["model"])] = model
                status = [{"status": "using existing layer"}, {"status": "writing manifest"}, {"status": "success"}]
                self._send(200, lines=status if req.get("stream", True) else None, obj=status[-1])

            def _trickle(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(10 ** 9))
                self.end_headers()
                try:
                    while not standin.stopped.wait(0.25):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                except OSError:  # the client gave up
                    pass

        return Handler
