"""request_format eden: the one layout rule (data/eden_layout.py) that training, evaluation and the
export parity check share, and its configuration."""

from __future__ import annotations

import pytest

from edentune.config import RunConfig, load_config
from edentune.data.eden_layout import EDEN_APP_OPTIONS, RequestLayout, request_layout
from edentune.errors import ConfigError, DataError
from edentune.data.encode import Conversation

APP = "You are a test assistant.\nAnswer briefly."


def eden(text: str = APP) -> RequestLayout:
    return RequestLayout("eden", text)


def test_each_reply_is_one_single_turn_example_in_the_apps_layout():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "first?"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "second?"}, {"role": "assistant", "content": "two"}]
    assert eden().examples(msgs) == [
        [{"role": "system", "content": "SYS"}, {"role": "user", "content": f"{APP}\n\nUser: first?\nAssistant:"},
         {"role": "assistant", "content": "one"}],
        [{"role": "system", "content": "SYS"}, {"role": "user", "content": f"{APP}\n\nUser: second?\nAssistant:"},
         {"role": "assistant", "content": "two"}],
    ]
    assert RequestLayout().examples(msgs) == [msgs]  # chat: unchanged


def test_prompt_keeps_only_the_last_user_message():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert eden("T").prompt(msgs) == [{"role": "user", "content": "T\n\nUser: c\nAssistant:"}]
    assert RequestLayout().prompt(msgs) is msgs


def test_conversations_are_split_with_their_source_and_a_bad_record_is_named():
    convs = [Conversation("f.jsonl:1", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
             Conversation("f.jsonl:2", [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}])]
    out = eden().conversations(convs)
    assert [c.source for c in out] == ["f.jsonl:1", "f.jsonl:2#reply1", "f.jsonl:2#reply2"]
    assert [c.messages[-1]["content"] for c in out] == ["a", "a1", "a2"]
    bad = [Conversation("g.jsonl:7", [{"role": "assistant", "content": "hello"}])]
    with pytest.raises(DataError, match=r"g.jsonl:7: assistant message 1 does not answer a user message"):
        eden().conversations(bad)


def test_config_needs_the_apps_text_and_reads_it_from_a_file(tmp_path):
    with pytest.raises(ConfigError, match="request_format eden needs the app's system text"):
        RunConfig().updated({"export.request_format": "eden"})
    with pytest.raises(ConfigError, match="not both"):
        RunConfig().updated({"export.eden_system_text": "a", "export.eden_system_file": "b"})
    (tmp_path / "app.txt").write_text(APP + "\n", encoding="utf-8")  # an editor's final newline is not the app's
    (tmp_path / "c.yaml").write_text("export:\n  request_format: eden\n  eden_system_file: app.txt\n", encoding="utf-8")
    cfg = load_config(tmp_path / "c.yaml")
    assert request_layout(cfg.export) == RequestLayout("eden", APP)
    (tmp_path / "app.txt").unlink()
    with pytest.raises(ConfigError, match=r"export.eden_system_file: cannot read .*app.txt"):
        request_layout(cfg.export)


def test_eden_modelfile_sets_the_apps_sampling_and_num_ctx():
    from edentune.export.modelfile import modelfile_for

    cfg = RunConfig().updated({"export.request_format": "eden", "export.eden_system_text": APP})
    params = modelfile_for(cfg).api_parameters()
    assert {k: params[k] for k in EDEN_APP_OPTIONS} == {"temperature": 0.8, "top_p": 0.92, "top_k": 45, "repeat_penalty": 1.15}
    assert params["num_ctx"] == cfg.export.num_ctx >= cfg.model.max_seq_len
    assert modelfile_for(RunConfig()).api_parameters()["temperature"] == RunConfig().export.temperature  # chat: the config's
