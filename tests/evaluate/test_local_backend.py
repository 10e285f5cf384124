"""Local transformers backend on the tiny random llama (real ChatML tokenizer), end to end through
`evaluate`, a PEFT adapter, and the `eval` / `compare` commands."""

import json

import pytest
from typer.testing import CliRunner

from edentune.cli import app
from edentune.config import RunConfig
from edentune.evaluate import LocalBackend, evaluate, load_suite, perplexity_sets

SUITE = """cases:
  - id: ko-greet
    category: korean
    prompt: 안녕하세요
    expected_language: ko
  - id: en-code
    category: coding
    prompt: Print hello in Python.
    expected_keywords: [print]
    expected_behavior: provides_running_code
  - id: en-who
    category: persona
    prompt: Who are you?
    expected_behavior: introduces_self
"""


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "small.yaml"
    path.write_text(SUITE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def replay_file(tmp_path_factory, sample_dir):
    lines = (sample_dir / "replay.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    path = tmp_path_factory.mktemp("replay") / "replay.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_batched_left_padded_greedy_matches_one_by_one(tiny_llama_dir):
    convs = [[{"role": "system", "content": "s"}, {"role": "user", "content": u}] for u in ("hi", "a much longer question here", "안녕")]
    batched = LocalBackend(tiny_llama_dir, batch_size=3, device="cpu").generate(convs, 6)
    single = LocalBackend(tiny_llama_dir, batch_size=1, device="cpu").generate(convs, 6)
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(0 < g.completion_tokens <= 6 for g in batched)


def test_evaluate_with_perplexity(tiny_llama_dir, suite_file, replay_file):
    cfg = RunConfig()
    cfg.evaluation.max_new_tokens = 4
    validation, replay = perplexity_sets(cfg, [str(replay_file)], [str(replay_file)])
    result = evaluate(cfg, LocalBackend(tiny_llama_dir, device="cpu"), load_suite(str(suite_file)),
                      validation=validation, replay=replay)
    m = result.metrics
    assert len(result.cases) == 3 and m["n"] == 3
    assert m["perplexity_replay"] > 100  # random weights: near-uniform over a 49k vocab
    assert m["perplexity_validation"] == pytest.approx(m["perplexity_replay"])
    assert m["latency_median_s"] > 0 and m["tokens_per_second"] > 0
    assert set(result.by_category) == {"korean", "coding", "persona"}
    assert "en-who" in {c.id for c in result.cases if not c.passed}
    # what `compare` checks before comparing two results: the suite's content and the settings
    assert result.suite_sha256 == load_suite(str(suite_file)).sha256
    s = result.settings
    assert s["max_new_tokens"] == 4 and s["temperature"] == 0.0 and s["persona"]["name"] == "Eden"
    assert s["validation"]["n"] == 2 and s["validation"] == s["replay"]  # the same file for both here


def test_adapter_and_cli(tiny_llama_dir, suite_file, replay_file, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a visible change, so base and candidate differ
    model.save_pretrained(tmp_path / "adapter")
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name_or_path: {tiny_llama_dir}\nevaluation:\n  max_new_tokens: 4\n")

    runner = CliRunner()
    common = ["-c", str(config), "--suite", str(suite_file), "--replay", str(replay_file), "--validation", str(replay_file)]
    for spec, out in (("base", "base.json"), (str(tmp_path / "adapter"), "cand.json")):
        r = runner.invoke(app, ["eval", "-m", spec, *common, "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    cand = json.loads((tmp_path / "cand.json").read_text())
    assert "adapter" in cand["model"] and cand["metrics"]["perplexity_replay"]
    from edentune.io import file_sha256

    assert cand["adapter_sha256"] == file_sha256(tmp_path / "adapter" / "adapter_model.safetensors")
    assert json.loads((tmp_path / "base.json").read_text())["adapter_sha256"] is None

    r = runner.invoke(app, ["compare", "--base", str(tmp_path / "base.json"), "--candidate", str(tmp_path / "cand.json"),
                            "-c", str(config), "--out-dir", str(tmp_path / "report"), "--gate"])
    summary = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert r.exit_code == (0 if summary["ship"] else 1), r.output
    assert summary["metrics"]["forgetting"]["candidate"] is not None
    assert summary["candidate_adapter_sha256"] == cand["adapter_sha256"]  # what `deploy --gate` matches
    assert (tmp_path / "report" / "report.html").exists()
