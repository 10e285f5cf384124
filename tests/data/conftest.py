import pytest


@pytest.fixture
def tiny_tokenizer():
    """A whitespace WordLevel fast tokenizer with a ChatML template; no network needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "hello world how are you fine thanks what is python code <|im_start|> <|im_end|> user assistant system"
    vocab = {w: i for i, w in enumerate(["[UNK]", *words.split()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                          "{% endfor %}")
    return fast
