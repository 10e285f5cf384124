"""Two personas in one round: each trains its own adapter on its own records, passes or fails its
own gate, and becomes its own Ollama model with its own SYSTEM prompt."""

from __future__ import annotations

import json

from edentune.cycle.round import run_round
from edentune.io import file_sha256
from edentune.registry import Registry


def test_two_personas_two_adapters_two_models(make_workspace, new_data, standin_factory, tmp_path, short_parity):
    month_records, write_jsonl = new_data
    server = standin_factory()
    personas = [
        {"name": "professional", "system_prompt": "You are Eden. Answer formally and precisely.",
         "select": {"field": "tone", "equals": "professional"}},
        {"name": "friendly", "system_prompt": "You are Eden. Answer warmly and casually.",
         "select": {"field": "tone", "equals": "friendly"}},
    ]
    ws = make_workspace(tmp_path / "ws", server.host, personas=personas)
    records = month_records(seed=7, n_sample=10, n_generated=8)  # the sample has 11 conversations short enough
    for i, r in enumerate(records):
        r["tone"] = "professional" if i % 2 else "friendly"
    new = write_jsonl(tmp_path / "new.jsonl", records)

    result = run_round(ws, [new], round_id="2026-01")

    units = {u.unit: u for u in result.units}
    assert set(units) == {"professional", "friendly"}
    assert units["professional"].adapter_sha256 != units["friendly"].adapter_sha256
    with Registry(ws / "registry.sqlite", readonly=True) as reg:
        for name, persona in zip(("professional", "friendly"), personas):
            selected = [json.loads(line) for line in (ws / "rounds" / "2026-01" / name / "data" / "new.jsonl").read_text().splitlines()]
            assert selected and all(r["tone"] == name for r in selected)
            run = reg.run("2026-01", name)
            assert run.verdict is not None and run.verdict["ship"] == units[name].ship
            assert run.status == units[name].status
            assert reg.step("2026-01", name, "evaluate").detail["baseline"] == "base model"
            if units[name].status == "accepted":
                model = server.models[f"eden-{name}:latest"]
                digest = "sha256:" + file_sha256(ws / "rounds" / "2026-01" / name / "export" / "adapter.gguf")
                assert model["adapters"] == {"adapter.gguf": digest} and model["system"] == persona["system_prompt"]
                assert reg.live(name).model == f"eden-{name}" and reg.live(name).round_id == "2026-01"
            else:
                assert f"eden-{name}:latest" not in server.models and reg.live(name) is None
    # this data and config make both better than the base: two models in Ollama
    assert [units[n].status for n in ("professional", "friendly")] == ["accepted", "accepted"], \
        {n: u.reasons for n, u in units.items()}
    assert server.models["eden-professional:latest"]["adapters"] != server.models["eden-friendly:latest"]["adapters"]
