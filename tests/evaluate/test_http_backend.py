"""HTTP backend against a real llama.cpp server (llama-cpp-python[server]) serving the embedded
GGUF on loopback, and against real misbehaving servers on loopback: down, accepting and never
answering, a web page instead of the API, the wrong JSON. Every failure is a clear error in bounded time."""

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from edentune.config import RunConfig
from edentune.errors import EdentuneError
from edentune.evaluate import HttpBackend, backend_from_spec, evaluate, load_suite

import llama_cpp.server  # noqa: F401  installed by `make setup` ([llama] extra): a missing server fails, never skips


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    from edentune.models import embedded_gguf_path

    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "1024", "--n_threads", "2", "--model_alias", "eden"]
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    # Logs go to a file: an unread pipe fills up and blocks the server.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama.cpp server not ready after 90 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_generates_from_real_server(server_url):
    backend = HttpBackend(server_url, "eden", timeout=60)
    convs = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}]
             for q in ("What is the capital of France?", "Say hello.")]
    gens = backend.generate(convs, 12)
    assert len(gens) == 2 and all(g.text for g in gens)
    assert all(0 < g.completion_tokens <= 12 and g.seconds > 0 for g in gens)
    assert "paris" in gens[0].text.lower()


def test_evaluate_over_http(server_url, tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text("- prompt: What is the capital of France? Answer in one sentence.\n  expected_language: en\n"
                     "  expected_keywords: [Paris]\n", encoding="utf-8")
    cfg = RunConfig()
    cfg.evaluation.max_new_tokens = 16
    result = evaluate(cfg, HttpBackend(server_url + "/v1", "eden"), load_suite(str(suite)))
    assert result.metrics["perplexity_replay"] is None  # no logits over HTTP
    assert result.metrics["tokens_per_second"] > 0 and result.cases[0].answer


def test_server_down_is_a_clear_error():
    backend = HttpBackend(f"http://127.0.0.1:{free_port()}", "eden", retries=2, backoff=0.01, timeout=2)
    start = time.monotonic()
    with pytest.raises(EdentuneError, match="after 3 attempts") as err:
        backend.generate([[{"role": "user", "content": "hi"}]], 4)
    assert "is the server running" in str(err.value) and time.monotonic() - start < 10


CONV = [[{"role": "user", "content": "hi"}]]


@contextlib.contextmanager
def silent_server():
    """A port that accepts connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def web_server(routes: dict):
    """A real HTTP server: (method, path) -> (status, content type, body); anything else 404 HTML."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, method):
            if method == "POST":
                self.rfile.read(int(self.headers.get("content-length", 0)))
            status, kind, body = routes.get((method, self.path), (404, "text/html", "<html><h1>Not Found</h1></html>"))
            if status is None:  # hang until the client gives up
                time.sleep(30)
                return
            data = body.encode()
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.answer("GET")

        def do_POST(self):
            self.answer("POST")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


HTML_PAGE = (200, "text/html; charset=utf-8", "<!doctype html><html><body>Welcome to my blog</body></html>")
MODELS = (200, "application/json", json.dumps({"object": "list", "data": [{"id": "eden"}]}))


def timed_error(backend: HttpBackend) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(EdentuneError) as err:
        backend.generate(CONV, 4)
    return str(err.value), time.monotonic() - start


def test_server_that_never_answers_fails_within_the_timeout():
    with silent_server() as url:
        message, elapsed = timed_error(HttpBackend(url, "eden", timeout=1.0))
    host = url.removeprefix("http://")
    assert f"{host} accepted the connection but sent no answer within 1 s" in message
    assert "OpenAI-compatible server" in message and "hint:" in message
    assert elapsed < 3 * 1.0


def test_answer_that_never_comes_is_not_retried():
    routes = {("GET", "/v1/models"): MODELS, ("POST", "/v1/chat/completions"): (None, "", "")}
    with web_server(routes) as url:
        message, elapsed = timed_error(HttpBackend(url, "eden", timeout=1.0, retries=3))
    assert "sent no answer within 1 s (POST" in message and "evaluation.http_timeout_s" in message
    assert elapsed < 3 * 1.0  # one wait, not four


@pytest.mark.parametrize("routes, problem", [
    ({("GET", "/v1/models"): HTML_PAGE, ("POST", "/v1/chat/completions"): HTML_PAGE},
     "GET /v1/models gave the answer is not JSON (text/html: '<!doctype html><html><body>Welcome to my blog</body></html>')"),
    ({}, "POST /v1/chat/completions gave HTTP 404 (text/html"),  # a web server without the API
    ({("POST", "/v1/chat/completions"): HTML_PAGE}, "POST /v1/chat/completions gave the answer is not JSON (text/html"),
    ({("GET", "/v1/models"): MODELS, ("POST", "/v1/chat/completions"): (200, "application/json", '{"answer": "hi"}')},
     "POST /v1/chat/completions gave no choices[0].message.content"),
    ({("GET", "/v1/models"): (200, "application/json", "[1, 2]")}, "GET /v1/models gave the answer is not a JSON object"),
])
def test_not_an_openai_server_is_a_clear_error(routes, problem):
    with web_server(routes) as url:
        message, elapsed = timed_error(HttpBackend(url, "eden", timeout=5.0))
    assert message.startswith(f"not an OpenAI-compatible server at {url}/v1: {problem}"), message
    assert elapsed < 5.0


def test_unknown_model_is_the_servers_message():
    error = (404, "application/json", json.dumps({"error": {"message": 'model "nope" not found, try pulling it first'}}))
    with web_server({("GET", "/v1/models"): MODELS, ("POST", "/v1/chat/completions"): error}) as url:
        message, _ = timed_error(HttpBackend(url, "nope", timeout=5.0))
    assert "rejected POST /v1/chat/completions: HTTP 404" in message and "not found, try pulling it first" in message and "ollama list" in message


@pytest.mark.parametrize("spec, problem", [
    ("http://", "no host"),
    ("http://:8080/v1", "no host"),
    ("http://127.0.0.1:notaport/v1", "Port could not be cast to integer value"),
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://127.0.0.1:0", "port 0"),
    ("http://127.0.0.1 :11434/v1#eden", "whitespace"),
    ("http://127.0.0.1:11434/v1?x=1#eden", "unexpected ?query"),
    ("ftp://127.0.0.1/v1", "must start with http:// or https://"),
])
def test_malformed_server_spec_is_a_clear_error(spec, problem):
    with pytest.raises(EdentuneError) as err:
        backend_from_spec(spec, RunConfig())
    assert "not a server URL" in str(err.value) and problem in str(err.value) and "http://host:port/v1#model" in str(err.value)


def test_spec_takes_the_configured_timeout():
    cfg = RunConfig()
    cfg.evaluation.http_timeout_s = 7.5
    backend = backend_from_spec("http://127.0.0.1:11434#eden", cfg)
    assert (backend.url, backend.model, backend.timeout, backend.connect_timeout) == (
        "http://127.0.0.1:11434/v1/chat/completions", "eden", 7.5, 7.5)
    assert backend_from_spec("https://example.org/openai/v1/", cfg).url == "https://example.org/openai/v1/chat/completions"


def _edentune(*args: str, cwd) -> subprocess.CompletedProcess:
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    return subprocess.run([sys.executable, "-m", "edentune.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": src, "COLUMNS": "200"})


@pytest.mark.parametrize("trickles", ["probe", "answer"])
def test_eval_against_a_trickling_server_ends_at_the_deadline(trickle_server, tmp_path, trickles):
    """Headers at once, then one byte every 0.25 s: each byte is inside the read timeout, so only
    the overall deadline (evaluation.http_deadline_s) ends it, with a message naming it."""
    url = trickle_server.url
    if trickles == "answer":  # the chat completion itself trickles (the probe is passed)
        backend = HttpBackend(url, "eden", timeout=30.0, deadline=1.0)
        backend._probed = True
        message, elapsed = timed_error(backend)
        assert "did not finish its answer within the deadline of 1 s (POST" in message and "evaluation.http_deadline_s" in message
        assert elapsed < 10
        return
    config = tmp_path / "run.yaml"
    config.write_text("evaluation:\n  http_deadline_s: 1.5\n  http_timeout_s: 30\n")
    suite = tmp_path / "s.yaml"
    suite.write_text("- prompt: Say hello.\n  expected_language: en\n", encoding="utf-8")
    out = tmp_path / "results.json"
    res = _edentune("eval", "-m", url + "#eden", "-c", str(config), "--suite", str(suite), "-o", str(out), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "did not finish its answer within the deadline of 1.5 s (GET" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and trickle_server.requests[0].startswith(b"GET /v1/models")


def test_eval_of_a_hostile_server_cannot_write_the_hosts_sysctls(tmp_path):
    """`eval -m http://…` runs the code a server sends in the sandbox; as root (CI) that code is
    not host root: writing kernel.core_pattern (piped, it would run a command as root) is refused.
    The code writes back the value the host already has, so even a failure changes nothing."""
    from edentune.evaluate import sandbox

    host_value = open("/proc/sys/kernel/core_pattern").read()
    code = f"import os\nfd = os.open('/proc/sys/kernel/core_pattern', os.O_WRONLY)\nos.write(fd, {host_value.encode()!r})\n"
    answer = {"choices": [{"message": {"role": "assistant", "content": f"Here:\n```python\n{code}```"}}]}
    routes = {("GET", "/v1/models"): MODELS, ("POST", "/v1/chat/completions"): (200, "application/json", json.dumps(answer))}
    suite = tmp_path / "s.yaml"
    suite.write_text("- prompt: Write a Python program.\n  expected_behavior: provides_running_code\n", encoding="utf-8")
    out = tmp_path / "results.json"
    with web_server(routes) as url:
        res = _edentune("eval", "-m", url + "#eden", "--suite", str(suite), "-o", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (case,) = json.loads(out.read_text())["cases"]
    assert open("/proc/sys/kernel/core_pattern").read() == host_value
    if sandbox.find_sandbox() is None:  # then it must not run at all, and eval says why
        assert os.geteuid() != 0 and case["code_status"] == "not_run" and "code not run (no sandbox)" in res.stderr
        return
    assert case["code_status"] == "fail" and any(s in case["code_error"] for s in ("Permission denied", "Read-only file system"))
