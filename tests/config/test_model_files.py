"""What a config or a command names as a model or an adapter: hub ids answered from the local
cache or failing at once when offline, and broken adapter files named in a clear error."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from edentune.errors import EdentuneError
from edentune.models import check_adapter_dir, resolve_model_dir

CLOSED_PORT_ENDPOINT = "http://127.0.0.1:9"  # nothing listens on the discard port: connect is refused at once


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty private HF cache and a hub endpoint that refuses connections."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT_ENDPOINT)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_an_uncached_hub_id_fails_at_once_when_offline(hub):
    started = time.monotonic()
    with pytest.raises(EdentuneError) as exc:
        resolve_model_dir("Some-Org/some-model")
    assert time.monotonic() - started < 5  # one refused connect, not transformers' retries
    msg = str(exc.value)
    assert "Some-Org/some-model" in msg and "not in the local Hugging Face cache" in msg and "offline?" in msg
    assert "127.0.0.1:9" in msg and "hf download Some-Org/some-model" in msg


def test_hf_hub_offline_is_respected_without_any_connect(hub, monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no network call expected"))
    with pytest.raises(EdentuneError, match="HF_HUB_OFFLINE is set.*offline"):
        resolve_model_dir("Some-Org/some-model")


def test_a_complete_cached_hub_model_is_used_from_the_cache(hub, monkeypatch):
    import socket

    snapshot = fake_hub_cache(hub, "Some-Org/cached", {"config.json": "{}", "model.safetensors": ""})
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no network call expected"))
    assert resolve_model_dir("Some-Org/cached") == str(snapshot)


def test_a_preset_alias_names_its_hub_model(hub):
    snapshot = fake_hub_cache(hub, "Qwen/Qwen2.5-0.5B-Instruct", {"config.json": "{}", "model.safetensors": ""})
    assert resolve_model_dir("qwen2.5-0.5b") == str(snapshot)


def test_a_config_only_cache_serves_config_and_tokenizer_offline(hub):
    snapshot = fake_hub_cache(hub, "Some-Org/partial", {"config.json": "{}", "tokenizer.json": "{}"})
    assert resolve_model_dir("Some-Org/partial") == str(snapshot)


@pytest.mark.parametrize("name", ["nonsense-model", "gpt2", "a/b/c"])
def test_a_name_that_is_no_model_is_refused(hub, name):
    with pytest.raises(EdentuneError, match="unknown model"):
        resolve_model_dir(name)


# -- adapters ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_llama_dir) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    return out


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _non_lora_tensors(p: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(p))


BROKEN_ADAPTERS = {
    "truncated weights": ("adapter_model.safetensors", _truncate, "not a readable safetensors file"),
    "garbage weights": ("adapter_model.safetensors", lambda p: p.write_bytes(b"\x07" * 4096), "not a readable safetensors file"),
    "empty weights": ("adapter_model.safetensors", lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    "no LoRA tensors": ("adapter_model.safetensors", _non_lora_tensors, "holds no LoRA weights"),
    "weights missing": ("adapter_model.safetensors", lambda p: p.unlink(), "no adapter_model.safetensors"),
    "empty config": ("adapter_config.json", lambda p: p.write_text("{}"), "missing peft_type, r, lora_alpha, target_modules"),
    "config without r": ("adapter_config.json",
                         lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "r"})),
                         "missing r"),
    "config not JSON": ("adapter_config.json", lambda p: p.write_text('{"r": 4,'), "not valid JSON"),
    "config a list": ("adapter_config.json", lambda p: p.write_text("[]"), "must be a JSON object"),
    "config binary": ("adapter_config.json", lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    "config r zero": ("adapter_config.json",
                      lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "r": 0})), "r must be a positive integer"),
}


def broken_copy(tiny_adapter: Path, tmp_path: Path, case: str) -> tuple[Path, Path]:
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    name, damage, _ = BROKEN_ADAPTERS[case]
    damage(adapter / name)
    return adapter, adapter / name


def test_the_intact_adapter_passes(tiny_adapter):
    assert check_adapter_dir(tiny_adapter)["r"] == 4


@pytest.mark.parametrize("case", sorted(BROKEN_ADAPTERS))
def test_broken_adapter_files_are_named(tiny_adapter, tmp_path, case):
    adapter, damaged = broken_copy(tiny_adapter, tmp_path, case)
    with pytest.raises(EdentuneError) as exc:
        check_adapter_dir(adapter)
    msg = str(exc.value)
    assert BROKEN_ADAPTERS[case][2] in msg
    assert str(damaged) in msg or str(adapter) in msg


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from edentune.cli import main

    monkeypatch.setattr(sys, "argv", ["edentune", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def _config_file(tmp_path: Path, model_dir: str) -> Path:
    import yaml

    from edentune.config import parse_config

    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    cfg = parse_config({"preset": "embedded", "model": {"name_or_path": model_dir, "max_seq_len": 256},
                        "quantization": {"load_in_4bit": False}, "data": {"train_files": [str(data)]},
                        "training": {"output_dir": str(tmp_path / "run"), "optimizer": "adamw_torch"}})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


@pytest.mark.parametrize("case", ["truncated weights", "empty config"])
def test_eval_with_a_broken_adapter(tiny_adapter, tiny_llama_dir, tmp_path, monkeypatch, capsys, case):
    adapter, damaged = broken_copy(tiny_adapter, tmp_path, case)
    code, out = run_main(monkeypatch, capsys, "eval", "-m", str(adapter), "-c", str(_config_file(tmp_path, tiny_llama_dir)),
                         "-o", str(tmp_path / "res.json"))
    assert code == 2 and "Traceback" not in out and str(damaged) in out
    assert not (tmp_path / "res.json").exists()


@pytest.mark.parametrize("case", ["garbage weights", "config without r"])
def test_train_feedback_with_a_broken_adapter(tiny_adapter, tiny_llama_dir, tmp_path, monkeypatch, capsys, case):
    adapter, damaged = broken_copy(tiny_adapter, tmp_path, case)
    rows = [{"prompt": [{"role": "user", "content": f"question {i}?"}],
             "completion": [{"role": "assistant", "content": "yes" if i % 2 else "no"}], "label": bool(i % 2)} for i in range(4)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out = run_main(monkeypatch, capsys, "train-feedback", str(_config_file(tmp_path, tiny_llama_dir)),
                         "--data", str(data), "--adapter", str(adapter))
    assert code == 2 and "Traceback" not in out and str(damaged) in out


@pytest.fixture
def fake_hub(hub, monkeypatch):
    """A local HTTP server as the hub endpoint; `answers` maps a path prefix to (status, headers, JSON
    body) or None (accept and never answer)."""
    import http.server
    import threading

    answers: dict[str, tuple[int, dict, dict] | None] = {}
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            for prefix, answer in answers.items():
                if self.path.startswith(prefix):
                    if answer is None:
                        release.wait(10)
                        return
                    status, headers, body = answer
                    data = json.dumps(body).encode()
                    self.send_response(status)
                    for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                    return
            self.send_error(500)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield answers
    release.set()
    server.shutdown()
    server.server_close()


def test_a_hub_id_the_hub_does_not_know_is_named(fake_hub):
    fake_hub["/api/models/Some-Org/typo"] = (404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"})
    with pytest.raises(EdentuneError, match="Some-Org/typo: no such model on the Hugging Face hub"):
        resolve_model_dir("Some-Org/typo")


def test_a_hub_that_accepts_but_never_answers_fails_within_the_timeout(fake_hub, monkeypatch):
    import edentune.models

    monkeypatch.setattr(edentune.models, "HUB_API_TIMEOUT_S", 1.0)
    fake_hub["/api/models/"] = None
    started = time.monotonic()
    with pytest.raises(EdentuneError, match="did not answer within 1 s.*offline"):
        resolve_model_dir("Some-Org/slow")
    assert time.monotonic() - started < 5


def test_a_hub_id_the_hub_knows_is_passed_on_for_download(fake_hub, caplog):
    fake_hub["/api/models/Some-Org/real"] = (200, {}, {"id": "Some-Org/real", "sha": "0" * 40, "private": False})
    assert resolve_model_dir("Some-Org/real") == "Some-Org/real"
    assert "could not look up" not in caplog.text  # a real answer, understood
