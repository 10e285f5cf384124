"""Assistant-only masking, system prompt, zero-trained-token errors, overlong handling, splitting."""

from __future__ import annotations

import pytest

from edentune.errors import DataError
from edentune.models import load_tokenizer
from edentune.data.encode import (
    IGNORE, Conversation, encode_all, encode_conversation, fit_length, load_splits, read_conversations,
)
from edentune.config import DataConfig

from train_helpers import write_jsonl

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    t = load_tokenizer(tiny_llama_dir)
    assert t.pad_token_id == t.eos_token_id == t.convert_tokens_to_ids("<|im_end|>")  # the pitfall under test
    return t


def trained_text(tok, ex) -> list[str]:
    return [tok.decode([i]) for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE]


def test_only_assistant_tokens_and_end_of_turn_are_trained(tok):
    ex = encode_conversation(tok, Conversation("t:1", CONV), system_prompt=None)
    assert "".join(trained_text(tok, ex)) == "Hello!<|im_end|>See you.<|im_end|>"
    assert all(label in (IGNORE, tok_id) for tok_id, label in zip(ex.input_ids, ex.labels))
    # Every <|im_end|> closing an assistant turn is trained; those closing system/user turns are not.
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [label != IGNORE for i, label in zip(ex.input_ids, ex.labels) if i == end]
    assert ends == [False, False, True, False, True]
    # The "\n" after <|im_end|> is never trained.
    assert tok.decode([ex.input_ids[-1]]) == "\n" and ex.labels[-1] == IGNORE


def test_missing_system_prompt_is_inserted_explicitly(tok):
    ex = encode_conversation(tok, Conversation("t:1", CONV[1:]), system_prompt="You are Eden.")
    text = tok.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nYou are Eden.<|im_end|>")
    assert "".join(trained_text(tok, ex)) == "Hello!<|im_end|>See you.<|im_end|>"


def test_conversation_without_trained_tokens_is_an_error_naming_it(tok):
    with pytest.raises(DataError, match="data.jsonl:7: no assistant tokens"):
        encode_conversation(tok, Conversation("data.jsonl:7", CONV[:2]), system_prompt=None)


def test_malformed_record_fails_clearly(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    path.write_text(good + '\n{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: message 0: unknown role"):
        read_conversations(path)
    path.write_text('{"messages": [{"role": "user"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: truncated JSON"):
        read_conversations(path)


def test_overlong_drop_and_truncate_are_counted(tok):
    short = Conversation("s:1", CONV)
    long = Conversation("l:1", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}])
    # Long only in its prompt: truncation would cut away the whole reply, so it is dropped.
    long_prompt = Conversation("p:1", [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}])
    convs = [short, long, long_prompt]
    _, stats = encode_all(tok, convs, max_len=64, overlong="drop", system_prompt=None)
    assert (stats.kept, stats.truncated, stats.dropped_overlong) == (1, 0, 2)
    out, stats = encode_all(tok, convs, max_len=64, overlong="truncate", system_prompt=None)
    assert (stats.kept, stats.truncated, stats.dropped_overlong) == (2, 1, 1)
    assert stats.dropped_sources == ["p:1"]
    assert len(out[1].input_ids) == 64 and out[1].trained_tokens > 0


def test_fit_length_keeps_short_examples_untouched(tok):
    ex = encode_conversation(tok, Conversation("s:1", CONV), system_prompt=None)
    assert fit_length(ex, 10_000, "drop") is ex


def test_validation_split_is_deterministic_by_content(tmp_path):
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(200)]
    f = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = DataConfig(train_files=[f], validation_fraction=0.2)
    train, val = load_splits(cfg)
    assert len(train) + len(val) == 200 and 20 < len(val) < 60
    # Order-independent: reversing the file keeps each conversation on its side.
    write_jsonl(tmp_path / "d.jsonl", records[::-1])
    _, val2 = load_splits(cfg)
    assert sorted(c.messages[0]["content"] for c in val) == sorted(c.messages[0]["content"] for c in val2)
