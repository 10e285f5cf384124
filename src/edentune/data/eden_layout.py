"""The request layout a model is served with: ordinary chat, or the way Garden of Eden V3 asks.

Garden of Eden V3 (github.com/wannahappyaroundme/Garden_of_Eden_V3, `src-tauri/src/services/ollama.rs`)
never sends a conversation: every turn is one non-raw `POST /api/generate` to the model `qwen2.5:7b`
whose `prompt` is the app's own system text, a blank line, `User: <message>`, a newline and
`Assistant:`, with no `system` and no `num_ctx`. Ollama puts that whole prompt in the **user**
slot of the model's TEMPLATE and the Modelfile's SYSTEM in the system slot (server/routes.go,
GenerateHandler). A model fine-tuned on ordinary multi-turn chats is therefore served out of
distribution; with `export.request_format: eden` training, evaluation and the export parity check
all go through `RequestLayout` below, so the three see the same text.

This module is the one place that rule lives (train, evaluate and export import it). Multi-turn
records: each assistant reply becomes its own single-turn example holding only the user message
right before it (the app never shows the model earlier turns). A record's own system turn stays
the system slot (it plays the Modelfile's SYSTEM); without one the caller inserts the config's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError

EDEN_APP_MODEL = "qwen2.5:7b"  # the model name the app calls (a constant in the app since v1.0.0)
# The options the app sends with every request; they override the Modelfile's, so an exported
# Modelfile sets the same ones (and `ollama run` answers like the app does).
EDEN_APP_OPTIONS = {"temperature": 0.8, "top_p": 0.92, "top_k": 45, "repeat_penalty": 1.15}


def eden_prompt(app_text: str, message: str) -> str:
    """The `prompt` field of the app's /api/generate request for one user message."""
    return f"{app_text}\n\nUser: {message}\nAssistant:"


@dataclass(frozen=True)
class RequestLayout:
    """`chat`: conversations as they are. `eden`: single-turn, the user slot holding the app's prompt."""

    format: str = "chat"
    app_text: str | None = None

    @property
    def single_turn(self) -> bool:
        return self.format == "eden"

    def _user(self, content: str) -> dict:
        return {"role": "user", "content": eden_prompt(self.app_text or "", content)}

    def examples(self, messages: list[dict]) -> list[list[dict]]:
        """Training examples of one record: itself (chat), or one [system?, user, assistant] per
        assistant reply (eden). A reply without a user message right before it is a DataError."""
        if not self.single_turn:
            return [messages]
        head = [messages[0]] if messages and messages[0]["role"] == "system" else []
        out = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0 or messages[i - 1]["role"] != "user":
                raise DataError(f"assistant message {i + 1} does not answer a user message; "
                                "request_format eden trains one (user, reply) pair per example")
            out.append(head + [self._user(messages[i - 1]["content"]), {"role": "assistant", "content": m["content"]}])
        return out

    def prompt(self, messages: list[dict]) -> list[dict]:
        """What the model is asked for a conversation ending at a user turn: itself (chat), or
        [system?, user] with only the last user message in the app's layout (eden)."""
        if not self.single_turn:
            return messages
        head = [messages[0]] if messages and messages[0]["role"] == "system" else []
        return head + [self._user(messages[-1]["content"])]

    def conversations(self, convs: list) -> list:
        """`examples` over objects with `.source` and `.messages` (dataclasses, e.g. training's
        Conversation): one per example, sourced `file:line#replyN` when a record was split."""
        if not self.single_turn:
            return list(convs)
        out = []
        for c in convs:
            try:
                parts = self.examples(c.messages)
            except DataError as err:
                raise DataError(f"{c.source}: {err.args[0]}", hint="fix or drop that record (`edentune data clean`)") from None
            out += [dataclasses.replace(c, source=c.source if len(parts) == 1 else f"{c.source}#reply{k + 1}", messages=m)
                    for k, m in enumerate(parts)]
        return out


def request_layout(export_cfg) -> RequestLayout:
    """The layout a run config's `export` section asks for (the app's text read from its file)."""
    if export_cfg.request_format != "eden":
        return RequestLayout()
    return RequestLayout("eden", app_system_text(export_cfg))


def app_system_text(export_cfg) -> str:
    """`export.eden_system_text`, or the contents of `export.eden_system_file` (UTF-8, trailing newline removed)."""
    if export_cfg.eden_system_text is not None:
        return export_cfg.eden_system_text
    path = Path(export_cfg.eden_system_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"export.eden_system_file: cannot read {path} ({getattr(err, 'strerror', None) or err})",
                          hint="point it at a UTF-8 text file holding the app's system text (docs/deploy-to-ollama.md)") from None
    # An editor's final newline is not part of the app's text (it is joined with "\n\nUser: ").
    return text[:-1] if text.endswith("\n") else text
