from data_helpers import chat, write_lines, write_records

from edentune.data.stats import compute_stats, stats, topic_flags


def test_stats_with_tiny_tokenizer(tmp_path, tiny_tokenizer):
    recs = [chat("hello world", "fine thanks"), chat("how are you", "fine"),
            chat("what is python code", "python is code " * 30)]
    path = write_records(tmp_path / "in.jsonl", recs + [recs[0]])
    write_lines(tmp_path / "bad.jsonl", ["{bad"])
    st = stats([path, tmp_path / "bad.jsonl"], tokenizer=tiny_tokenizer, max_seq_len=40)
    assert (st.conversations, st.invalid_lines, st.turns, st.exact_duplicates) == (4, 1, 8, 1)
    assert st.tokens["user"].max == 4 and st.tokens["assistant"].max == 90 and st.chat_template
    # The template adds 3 tokens per turn ("<|im_start|> role ... <|im_end|>"); full rendering agrees.
    full = [len(tiny_tokenizer(tiny_tokenizer.apply_chat_template(r["messages"], tokenize=False))["input_ids"])
            for r in recs]
    assert st.tokens["conversation"].max == max(full)
    assert st.over_max_seq_len == sum(n > 40 for n in full + full[:1])
    assert sum(c for _, _, c in st.histogram) == 4


def test_plain_callable_tokenizer_and_mixes():
    recs = [chat("안녕하세요 반갑습니다", "네 안녕하세요"), chat("hello there", "hi"), chat("fix it", "```py\nx\n```")]
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731
    st = compute_stats(recs, tokenizer=words)
    assert not st.chat_template
    assert st.tokens["conversation"].max == max(sum(words([m["content"] for m in r["messages"]])) for r in recs)
    assert st.languages == {"ko": 1, "en": 2} and st.topics == {"coding": 1, "general": 1, "korean": 1}


def test_topic_flags():
    assert topic_flags({"coding": 55, "general": 25, "korean": 20}) == []
    flags = topic_flags({"coding": 80, "general": 10, "korean": 10})
    assert flags == ["coding is 80%, target 50%-60%", "general is 10%, target 20%-30%"]
    assert topic_flags({"coding": 55, "general": 25, "korean": 20, "persona": 50}) == []  # own quota
