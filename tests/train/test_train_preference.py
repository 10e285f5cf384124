"""Learning from thumbs up/down: KTO and DPO through TRL on a tiny model move the model towards the
liked answers, continue the SFT adapter (with it as the reference), and fail clearly on bad data."""

from __future__ import annotations

import json
import random

import pytest
import torch
from train_helpers import WORDS, make_config

from edentune.errors import DataError
from edentune.train.preference import read_preferences, train_preferences

LIKED, DISLIKED = "apple apple apple apple", "stone stone stone stone"


def prompt(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": f"Say something about {' '.join(rng.choice(WORDS) for _ in range(3))}?"}]


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def kto_rows(n: int = 16) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt": prompt(rng), "completion": [{"role": "assistant", "content": LIKED if i % 2 else DISLIKED}],
             "label": bool(i % 2)} for i in range(n)]


def dpo_rows(n: int = 8) -> list[dict]:
    rng = random.Random(1)
    return [{"prompt": prompt(rng), "chosen": [{"role": "assistant", "content": LIKED}],
             "rejected": [{"role": "assistant", "content": DISLIKED}]} for _ in range(n)]


def answer_logprob_margin(model_dir: str, adapter_dir, cfg) -> float:
    """log p(liked answer) - log p(disliked answer), summed over the answer tokens, on a fresh prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    msgs = [{"role": "system", "content": cfg.model.system_prompt}, {"role": "user", "content": "Say something about lamp road honey?"}]
    head = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)

    def logprob(answer: str) -> float:
        ids = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(ids[1:])
        return float(logits[torch.arange(len(targets)), targets][len(head) - 1:].sum())

    return logprob(LIKED) - logprob(DISLIKED)


@pytest.mark.parametrize("method", ["kto", "dpo"])
def test_preference_training_prefers_the_liked_answer(method, tiny_llama_dir, tmp_path):
    rows = kto_rows() if method == "kto" else dpo_rows()
    data = write_rows(tmp_path / f"{method}.jsonl", rows)
    cfg = make_config(tiny_llama_dir, data, None, tmp_path / "run").updated({
        "preference.method": method, "preference.learning_rate": 5e-3, "preference.max_steps": 12,
        "preference.warmup_steps": 0, "preference.beta": 0.1,
    })
    before = answer_logprob_margin(tiny_llama_dir, None, cfg)
    result = train_preferences(cfg, data)
    after = answer_logprob_margin(tiny_llama_dir, result.adapter_dir, cfg)
    assert after > before + 1.0, (before, after)
    assert result.run_dir == tmp_path / f"run-{method}" and result.metrics["global_step"] == 12
    saved = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "ref" not in saved  # the frozen reference is not shipped
    events = [json.loads(line)["event"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and "train" in events


def test_kto_continues_the_sft_adapter(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    sft.save_pretrained(tmp_path / "sft")
    data = write_rows(tmp_path / "kto.jsonl", kto_rows())
    cfg = make_config(tiny_llama_dir, data, None, tmp_path / "run").updated({"preference.max_steps": 2, "preference.warmup_steps": 0})
    result = train_preferences(cfg, data, adapter=tmp_path / "sft")
    start, end = load_file(tmp_path / "sft" / "adapter_model.safetensors"), load_file(result.adapter_dir / "adapter_model.safetensors")
    assert start.keys() == end.keys()  # the SFT adapter's own modules, trained further
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert max((start[k] - end[k]).abs().max().item() for k in start) < 0.05  # a small step from SFT, not a fresh adapter


def test_bad_preference_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such preference file"):
        read_preferences(tmp_path / "missing.jsonl", "kto")
    only_up = write_rows(tmp_path / "up.jsonl", [r for r in kto_rows() if r["label"]])
    with pytest.raises(DataError, match="only thumbs-up ratings"):
        read_preferences(only_up, "kto")
    with pytest.raises(DataError, match=r"kto.jsonl:1: missing chosen, rejected for DPO"):
        read_preferences(write_rows(tmp_path / "kto.jsonl", kto_rows()), "dpo")
    (tmp_path / "broken.jsonl").write_text('{"prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl:1: not JSON"):
        read_preferences(tmp_path / "broken.jsonl", "kto")


def test_qlora_kto_through_the_cli(tiny_qwen2_dir, tmp_path):
    """The user's path: `edentune train-feedback` on a 4-bit base, continuing an SFT adapter."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from edentune.cli import app

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir),
                   LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).save_pretrained(tmp_path / "sft")
    data = write_rows(tmp_path / "kto.jsonl", kto_rows())
    cfg = make_config(tiny_qwen2_dir, data, None, tmp_path / "run", optimizer="paged_adamw_8bit",
                      gradient_checkpointing=True).updated({"quantization.load_in_4bit": True, "preference.max_steps": 2})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = CliRunner().invoke(app, ["train-feedback", str(cfg_file), "--data", data, "--adapter", str(tmp_path / "sft")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "run-kto" / "adapter" / "adapter_model.safetensors").exists()
    assert "edentune compare --base base --candidate" in out.output

    out = CliRunner().invoke(app, ["train-feedback", str(cfg_file), "--data", data, "--method", "dpo"])
    assert out.exit_code != 0 and "missing chosen, rejected for DPO" in str(out.exception)


def test_a_folder_that_is_not_an_adapter_is_a_clear_error(tiny_llama_dir, tmp_path):
    from edentune.errors import EdentuneError

    data = write_rows(tmp_path / "kto.jsonl", kto_rows())
    cfg = make_config(tiny_llama_dir, data, None, tmp_path / "run")
    with pytest.raises(EdentuneError, match="not a PEFT adapter directory"):
        train_preferences(cfg, data, adapter=tmp_path)
