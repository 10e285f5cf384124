"""The round's decisions through `run_round` itself, four months in a row, with the expensive stages
stood in (training writes an adapter file, evaluation returns scores that depend on the month,
export and deploy write nothing), so that the bookkeeping is checked in seconds: all new records
trained plus 3/7 replay, the realised ratio and the starting adapter recorded, the validation set
grown to its minimum after the length filter, forgetting against the original base accumulating
until the cumulative limit refuses month 4 while every month stays under the per-round limit."""

from __future__ import annotations

import math
import random
import types
from pathlib import Path

import pytest
import yaml

import edentune.cycle.round as round_mod
import edentune.train as train_mod
from edentune.cycle import status
from edentune.cycle.workspace import init_workspace
from edentune.evaluate.runner import CaseResult, EvalResult, case_metrics
from edentune.registry import SHARED, Registry

FORGETTING_PER_MONTH = 1.05  # replay perplexity x1.05 a month: +5 % against the live model (limit 10 %)


def _month_of(adapter) -> int:
    """0 for the base; k for the adapter trained in round 2026-0k."""
    return 0 if adapter is None else int(Path(adapter).relative_to(Path(adapter).parents[3]).parts[0][-2:])


def fake_train(cfg, resume=True, console=None, init_adapter=None, **_):
    run = Path(cfg.training.output_dir)
    (run / "adapter").mkdir(parents=True, exist_ok=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(random.randbytes(64))
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    mixed = len(Path(cfg.data.train_files[0]).read_text(encoding="utf-8").splitlines())
    validation = len(Path(cfg.data.validation_files[0]).read_text(encoding="utf-8").splitlines())
    return types.SimpleNamespace(metrics={"global_step": 4, "data": {
        "train": {"kept": mixed - 1, "dropped_overlong": 1, "trained_tokens": 50 * mixed},
        "validation": {"kept": validation, "dropped_overlong": 0, "trained_tokens": 40 * validation}}})


def fake_evaluate(cfg, adapter, suite, validation, forgetting):
    k = _month_of(adapter)
    cases = [CaseResult(id=c.id, category=c.category, question=c.question, answer="a", seconds=0.1) for c in suite.cases]
    val = [[20.0 - 0.5 * k + i % 3, 10] for i in range(len(validation))]  # lower every month
    rep = [[20.0 + i % 4 + 10 * k * math.log(FORGETTING_PER_MONTH), 10] for i in range(len(forgetting))]
    metrics = case_metrics(cases)
    for key, terms in (("validation", val), ("replay", rep)):
        metrics[f"perplexity_{key}"] = math.exp(sum(x for x, _ in terms) / sum(n for _, n in terms))
    return EvalResult(model=f"month {k}", suite=suite.path, suite_sha256=suite.sha256, settings={"max_new_tokens": 1},
                      created="now", metrics=metrics, by_category={}, by_language={}, cases=cases,
                      perplexity_terms={"validation": val, "replay": rep})


def fake_export(cfg, adapter, out):
    out.mkdir(parents=True, exist_ok=True)
    for name in ("adapter.gguf", "export.json", "Modelfile"):
        (out / name).write_text(name, encoding="utf-8")
    return types.SimpleNamespace(gguf=out / "adapter.gguf", report_path=out / "export.json",
                                 modelfiles={"eden": out / "Modelfile"}, report={})


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(train_mod, "train", fake_train)
    monkeypatch.setattr(round_mod, "_evaluate", fake_evaluate)
    monkeypatch.setattr(round_mod, "_export", fake_export)
    monkeypatch.setattr(round_mod, "_ollama_preflight", lambda *_: None)
    monkeypatch.setattr(round_mod, "deploy_export", lambda *_, **__: [])


def test_four_months_of_decisions(tmp_path, stand_ins, new_data):
    month_records, write_jsonl = new_data
    ws = init_workspace(tmp_path / "ws", model="embedded")
    data = yaml.safe_load(ws.config_path.read_text(encoding="utf-8"))
    data["validation"].update(min_conversations=8, min_tokens=200)
    ws.config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    results = []
    for m in (1, 2, 3, 4):
        month = write_jsonl(tmp_path / f"month{m}.jsonl", month_records(seed=m, n_sample=10, n_generated=20))
        results.append(round_mod.run_round(ws.dir, [month], round_id=f"2026-0{m}"))
    assert [r.status for r in results] == ["accepted", "accepted", "accepted", "refused"]
    (reason,) = results[3].units[0].reasons
    assert reason.startswith("forgetting against the original base is +21.6% (limit 20%")

    with Registry(ws.registry_path, readonly=True) as reg:
        size = reg.step("2026-01", SHARED, "fixed").detail["validation"]
        assert size["met"] and size["conversations"] >= 8 and size["tokens"] >= 200  # grown from month 1 (fraction 0.1 is 3)
        assert size["conversations"] == len(ws.validation_path.read_text(encoding="utf-8").splitlines())
        for m in (2, 3, 4):
            assert reg.step(f"2026-0{m}", SHARED, "fixed").detail["validation"]["added"] == 0  # met: frozen
            mix = reg.step(f"2026-0{m}", "default", "mix").detail
            new = reg.step(f"2026-0{m}", "default", "select").detail["records"]
            assert mix["new"] == new and mix["replay"] == round(new * 3 / 7)  # every new record, plus 3/7 of it
            run = reg.run(f"2026-0{m}", "default")
            assert run.metrics["realised_new_ratio"] == round(new / (new + mix["replay"]), 4)
            assert run.metrics["started_from"] == f"round 2026-0{m - 1}"
            assert run.metrics["forgetting"] == pytest.approx(0.05)
            assert run.metrics["forgetting_base"] == pytest.approx(FORGETTING_PER_MONTH ** m - 1)
        assert reg.run("2026-01", "default").metrics["started_from"] == "base"
        assert reg.live("default").round_id == "2026-03"
    rows = {r.round_id: r for r in status(ws.dir).rows}
    assert rows["2026-02"].metrics["trained_records"] == rows["2026-02"].metrics["train_records"] - 1
    assert rows["2026-02"].metrics["dropped_for_length"] == 1 and rows["2026-04"].status == "refused"
    assert set(rows["2026-04"].step_seconds) >= {"ingest", "fixed", "mix", "sft", "evaluate", "gate"}
