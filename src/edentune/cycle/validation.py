"""The fixed validation set, sized so that it can carry a decision.

The validation set picks the best checkpoint and is half of the gate, so it must be big enough
that one conversation more or less does not flip the decision: at least
`validation.min_conversations` conversations and `validation.min_tokens` scored (assistant)
tokens, counted AFTER the max_seq_len length filter. (A 10 % split of 80 conversations is 8, and
with max_seq_len 384 six of those were dropped by training: the best checkpoint was chosen on 2.)

So only conversations that training keeps are frozen into the set, with the model's own chat
template, system prompt and masking (`data.encode.encode_conversation` / `fit_length`): training's
eval loss and the evaluate stage's validation perplexity are over the very same tokens, one
validation loss per adapter. While the set is below the minimum, each round moves up to
`validation.max_share` of its new conversations into it (never records already trained: they
come from this month's data, before the mix), in the order of the content-hash split, so the set
grows month by month until it is met, and it is then frozen again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data.clean import dedup_key
from ..data.split import bucket
from ..errors import DataError


@dataclass
class ValidationSize:
    conversations: int
    tokens: int
    min_conversations: int
    min_tokens: int
    added: int  # moved from this month's data into the set
    dropped_for_length: int  # candidates longer than max_seq_len (left for training, which drops them too)

    @property
    def met(self) -> bool:
        return self.conversations >= self.min_conversations and self.tokens >= self.min_tokens

    def to_json(self) -> dict:
        return {**asdict(self), "met": self.met}

    def warning(self) -> str | None:
        if self.met:
            return None
        return (f"the validation set holds {self.conversations} conversation(s) / {self.tokens} scored tokens after the "
                f"max_seq_len filter, below the minimum ({self.min_conversations} / {self.min_tokens}): checkpoint choice "
                f"and the gate are noisy until later months grow it (validation.min_conversations / min_tokens in cycle.yaml)")


def scored_tokens(cfg, records: list[dict]) -> list[int | None]:
    """Per record: the assistant tokens training scores, or None when training would drop it for
    length (the run's tokenizer, system prompt, max_seq_len and overlong policy)."""
    from ..models import load_tokenizer, resolve_model_dir
    from ..data.encode import Conversation, encode_conversation, fit_length

    m = cfg.model
    tokenizer = load_tokenizer(resolve_model_dir(m.name_or_path, m.gguf_file, m.architecture), m.trust_remote_code)
    out = []
    for i, rec in enumerate(records):
        conv = Conversation(f"record {i + 1}", [{"role": x["role"], "content": x["content"]} for x in rec["messages"]])
        try:
            fitted = fit_length(encode_conversation(tokenizer, conv, m.system_prompt), m.max_seq_len, m.overlong)
        except DataError:  # nothing for the assistant to say: never scored
            fitted = None
        out.append(fitted.trained_tokens if fitted is not None else None)
    return out


def size_validation(cfg, policy, current: list[dict], month: list[dict], split_fraction: float = 0.0
                    ) -> tuple[list[dict], list[dict], ValidationSize]:
    """(validation set, this month's records left for training, size report).

    `current`: the set so far (frozen earlier, or given as files); its records that training would
    drop for length leave it. `month`: this round's clean records not in the set. The first round
    of a workspace without validation files passes `split_fraction`: the month's records in the
    content-hash split's validation share join first. Then, while the minimum is not met, more of
    the month joins, in the split's order, up to `policy.max_share` of it in all."""
    tokens = scored_tokens(cfg, current + month)
    val = [(r, n) for r, n in zip(current, tokens[: len(current)]) if n is not None]
    dropped = len(current) - len(val)
    held = {dedup_key(r) for r, _ in val}
    rest = [(r, n) for r, n in zip(month, tokens[len(current):]) if dedup_key(r) not in held]
    added = 0
    budget = int(max(policy.max_share, split_fraction) * len(month))
    for rec, n in sorted(rest, key=lambda item: bucket(item[0])):  # the split's order
        in_split = bucket(rec) < split_fraction
        met = len(val) >= policy.min_conversations and sum(t for _, t in val) >= policy.min_tokens
        if not in_split and (met or added >= budget):
            break
        if n is None:  # too long: training drops it as well, so it cannot score anything
            dropped += in_split
            continue
        val.append((rec, n))
        added += 1
    taken = {dedup_key(r) for r, _ in val}
    train = [r for r in month if dedup_key(r) not in taken]
    size = ValidationSize(len(val), sum(t for _, t in val), policy.min_conversations, policy.min_tokens, added, dropped)
    return [r for r, _ in val], train, size
