"""request_format eden in training: each reply is one single-turn example in the app's layout,
and exactly the reply (with its end-of-turn) is trained, not the app's text in the user turn."""

from __future__ import annotations

import json

from rich.console import Console

from edentune.config import RunConfig
from edentune.data.encode import IGNORE
from edentune.train.run import prepare_data

APP = "You are a test assistant."


def test_training_examples_are_single_turn_in_the_apps_layout(embedded_dir, tmp_path):
    from edentune.models import load_tokenizer

    rec = {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
                        {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
    (tmp_path / "val.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
    cfg = RunConfig().updated({"data.train_files": [str(tmp_path / "train.jsonl")], "data.validation_files": [str(tmp_path / "val.jsonl")],
                               "export.request_format": "eden", "export.eden_system_text": APP})
    tok = load_tokenizer(embedded_dir)
    with open(tmp_path / "log", "w") as log:
        train_set, _, stats = prepare_data(cfg, tok, Console(file=log))
    assert stats["train"]["kept"] == 2  # one example per reply
    texts = [tok.decode(ex.input_ids) for ex in train_set]
    assert texts[1] == (f"<|im_start|>system\n{cfg.model.system_prompt}<|im_end|>\n<|im_start|>user\n{APP}\n\n"
                        "User: And three plus three?\nAssistant:<|im_end|>\n<|im_start|>assistant\nSix.<|im_end|>\n")
    trained = [tok.decode([t for t in ex.labels if t != IGNORE]) for ex in train_set]
    assert trained == ["Four.<|im_end|>", "Six.<|im_end|>"]
