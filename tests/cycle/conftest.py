"""Fixtures for the cycle's round tests: generated months of conversations and ratings, a small
workspace on the embedded model, the Ollama stand-in, and one finished round shared by the tests.

Sizes are the smallest that still show the behaviour on 2 CPU cores: 4 optimizer steps of batch 2
at max_seq_len 256, a 3-case suite answered in 12 tokens, a 6-conversation forgetting set.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))  # ollama_standin

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "edentune" / "data" / "sample"
OLLAMA_BASE = "smollm2:135m"
SUITE_CASES = ("ko-who-are-you", "en-who-are-you", "ko-list-reverse")  # Korean, persona, coding


def _short(rec: dict, limit: int = 700) -> bool:
    # ASCII-escaped length: a Hangul syllable (\uXXXX) counts 6, roughly its share of tokens.
    return len(json.dumps(rec, ensure_ascii=True)) < limit


def generated_records(rng: random.Random, n: int) -> list[dict]:
    """Short Korean, coding and general conversations with numbers from `rng` (so months differ)."""
    out = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        kind = i % 3
        if kind == 0:
            msgs = [f"{a} 더하기 {b}는 얼마인가요?", f"{a} 더하기 {b}는 {a + b}입니다. 더 궁금한 점이 있으면 말씀해 주세요."]
            cat = "korean"
        elif kind == 1:
            msgs = [f"Write a Python function that multiplies a number by {a}.",
                    f"Here it is:\n\n```python\ndef times_{a}(x):\n    return x * {a}\n\nprint(times_{a}({b}))  # {a * b}\n```"]
            cat = "coding"
        else:
            msgs = [f"How many minutes are in {a} hours?", f"{a} hours is {a * 60} minutes, since each hour has 60 minutes."]
            cat = "general"
        out.append({"messages": [{"role": "user", "content": msgs[0]}, {"role": "assistant", "content": msgs[1]}],
                    "category": cat})
    return out


def month_records(seed: int, n_sample: int = 8, n_generated: int = 9) -> list[dict]:
    """One month of new conversations: short ones from the bundled sample plus generated ones."""
    rng = random.Random(seed)
    sample = [json.loads(line) for line in (SAMPLE / "eden_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    sample = [r for r in sample if _short(r)]
    return rng.sample(sample, n_sample) + generated_records(rng, n_generated)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def ratings(seed: int, n: int = 8) -> list[dict]:
    """Thumbs up = a conversation's own answer, thumbs down = another conversation's answer."""
    recs = [r for r in month_records(seed, n_sample=n, n_generated=0)]
    out = []
    for i, r in enumerate(recs):
        turn = [m for m in r["messages"] if m["role"] != "system"][:2]
        if i % 2:
            other = recs[(i + 3) % len(recs)]["messages"]
            turn = turn[:1] + [{"role": "assistant", "content": next(m["content"] for m in other if m["role"] == "assistant")}]
        out.append({"messages": turn, "rating": "down" if i % 2 else "up"})
    return out


@pytest.fixture(scope="session")
def new_data():
    """(month_records, write_jsonl) for tests that build their own month."""
    return month_records, write_jsonl


@pytest.fixture(scope="session")
def cycle_files(tmp_path_factory) -> dict[str, Path]:
    """Three months of new data, ratings, a 3-case suite and a small forgetting set."""
    from edentune.evaluate.suite import resolve_suite_path

    d = tmp_path_factory.mktemp("cycle-files")
    files = {f"month{m}": write_jsonl(d / f"month{m}.jsonl", month_records(seed=m)) for m in (1, 2, 3)}
    files["ratings2"] = write_jsonl(d / "ratings2.jsonl", ratings(seed=20))
    # The fixed validation set: conversations like the generated part of every month, so that a
    # month that learns something measurably lowers its loss (a 3-record split would be noise).
    files["validation"] = write_jsonl(d / "validation.jsonl", generated_records(random.Random(99), 6))
    general = [json.loads(line) for line in (SAMPLE / "replay.jsonl").read_text(encoding="utf-8").splitlines()]
    files["forgetting"] = write_jsonl(d / "forgetting.jsonl", [r for r in general if _short(r, 900)][:6])
    cases = {c["id"]: c for c in yaml.safe_load(resolve_suite_path("default").read_text(encoding="utf-8"))["cases"]}
    suite = [cases[i] for i in SUITE_CASES]
    files["suite"] = d / "suite.yaml"
    files["suite"].write_text(yaml.safe_dump({"name": "cycle-test", "cases": suite}, allow_unicode=True), encoding="utf-8")
    return files


def configure(ws_dir: Path, files: dict[str, Path], host: str, **overrides) -> None:
    """Size a fresh workspace's cycle.yaml for tests (as a user would edit it)."""
    path = ws_dir / "cycle.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    run = data["run"]
    run["model"]["max_seq_len"] = 256
    # Batch 2: KTO needs more than one example per batch (its KL term).
    run["training"].update(max_steps=4, per_device_batch_size=2, gradient_accumulation_steps=1, warmup_steps=1,
                           eval_steps=2, save_steps=2, logging_steps=1, learning_rate=1e-3)
    run["preference"].update(max_steps=1, warmup_steps=0)
    # A 3-case suite moves a rate by a third per case: only a collapse of every case counts as worse
    # here (round 3 of the months test is refused by its validation loss and forgetting).
    run["evaluation"].update(suite=str(files["suite"]), max_new_tokens=12, tolerance=0.7, max_forgetting=0.5)
    run["export"]["ollama_base"] = OLLAMA_BASE
    data["replay"] = {"new_ratio": 0.7, "quotas": {"persona": 3, "korean": 3, "coding": 4, "general": 3}, "seed": 42}
    # 6 fixed conversations, below the minimum of 9: round 1 grows the set from its month (the
    # size rule in a real round; the rule itself: test_validation_size.py).
    data["validation"] = {"fraction": 0.25, "files": [str(files["validation"])], "min_conversations": 9, "min_tokens": 0}
    data["forgetting_files"] = [str(files["forgetting"])]
    # As loose as max_forgetting above: the cumulative limit has its own test (test_cumulative_forgetting.py).
    data["gate"] = {"max_cumulative_forgetting": 1.0}
    data["ollama"] = {"host": host, "base": None}
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="session")
def make_workspace(cycle_files):
    from edentune.cycle.workspace import init_workspace

    def make(path: Path, host: str, personas=None, **overrides) -> Path:
        init_workspace(path, model="embedded", personas=personas)
        configure(path, cycle_files, host, **overrides)
        return path

    return make


@pytest.fixture(scope="session")
def standin_factory():
    """Start a labeled Ollama stand-in with the base pulled; stopped at the end of the session."""
    from ollama_standin import OllamaStandIn

    from edentune.export.modelfile import CHATML_TEMPLATE
    from edentune.models import embedded_gguf_path

    started = []

    def start() -> OllamaStandIn:
        # The base GGUF makes /api/chat real: deploy's smoke check compares its answer with llama.cpp's.
        server = OllamaStandIn({OLLAMA_BASE: {"gguf": str(embedded_gguf_path()), "template": CHATML_TEMPLATE,
                                              "parameters": {"stop": ["<|im_end|>"]}}})
        started.append(server.__enter__())
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


@contextlib.contextmanager
def one_parity_probe():
    """The export's llama.cpp parity check on one probe conversation instead of all (as the export
    tests' `short_probes`): the check itself is tested in tests/export."""
    from edentune.export import parity

    saved = parity.PROBE_CONVERSATIONS
    parity.PROBE_CONVERSATIONS = [saved[2]]
    try:
        yield
    finally:
        parity.PROBE_CONVERSATIONS = saved


@pytest.fixture
def short_parity():
    with one_parity_probe():
        yield


@pytest.fixture(scope="session")
def first_round(tmp_path_factory, make_workspace, cycle_files, standin_factory):
    """Round 2026-01 on month 1, finished (the months test continues this workspace; the resume
    test compares an interrupted round with it). Returns what the round produced then."""
    from edentune.cycle.round import run_round

    server = standin_factory()
    ws = make_workspace(tmp_path_factory.mktemp("months") / "ws", server.host)
    with one_parity_probe():
        result = run_round(ws, [cycle_files["month1"]], round_id="2026-01")
    gate = json.loads((ws / "rounds" / "2026-01" / "default" / "eval" / "gate.json").read_text(encoding="utf-8"))
    return {"ws": ws, "server": server, "result": result, "gate": gate,
            "eden": json.loads(json.dumps(server.models.get("eden:latest")))}
