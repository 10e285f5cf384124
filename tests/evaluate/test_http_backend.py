"""HTTP backend against a real llama.cpp server (llama-cpp-python[server]) serving the embedded
GGUF on loopback, plus the server-down error."""

import socket
import subprocess
import sys
import time

import httpx
import pytest

from edentune.config import RunConfig
from edentune.errors import EdentuneError
from edentune.evaluate import HttpBackend, evaluate, load_suite

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
