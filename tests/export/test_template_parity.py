"""Template parity: the prompt Ollama builds (Go template + SYSTEM, rendered here in Python, then
llama.cpp's tokenizer with special tokens) has exactly training's apply_chat_template ids."""

from __future__ import annotations

import pytest
from qwen25_template import QWEN25_OLLAMA_TEMPLATE

from edentune.export.gotemplate import TemplateError, render
from edentune.export.modelfile import CHATML_TEMPLATE
from edentune.export.parity import PROBE_CONVERSATIONS, render_ollama_prompt, template_parity
from edentune.models import embedded_gguf_path, load_tokenizer
from edentune.presets import DEFAULT_SYSTEM_PROMPT


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, QWEN25_OLLAMA_TEMPLATE], ids=["edentune-chatml", "ollama-qwen2.5"])
def test_ollama_prompt_tokenizes_like_training(embedded_dir, template):
    report = template_parity(template, DEFAULT_SYSTEM_PROMPT, load_tokenizer(embedded_dir), embedded_gguf_path())
    assert report.passed, report.mismatches[:1]
    assert report.prompts == sum(m["role"] == "user" for c in PROBE_CONVERSATIONS for m in c)


def test_a_wrong_template_is_caught(embedded_dir):
    wrong = CHATML_TEMPLATE.replace("<|im_start|>assistant\n{{ end }}", "<|im_start|>assistant\n\n{{ end }}")
    report = template_parity(wrong, DEFAULT_SYSTEM_PROMPT, load_tokenizer(embedded_dir), embedded_gguf_path())
    assert not report.passed and report.mismatches[0]["ollama_ids"] != report.mismatches[0]["training_ids"]


def test_go_template_subset():
    data = {"System": "s", "Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    assert render("{{- range $i, $_ := .Messages }}{{ $i }}{{ .Role }}{{ if not (eq (len (slice $.Messages $i)) 1) }},{{ end }}{{ end }}", data) == "0user,1assistant"
    assert render("x  {{- .System -}}  y {{ if and .System (ne .System \"t\") }}ok{{ else }}no{{ end }}", data) == "xsy ok"
    with pytest.raises(TemplateError):
        render("{{ .System | printf }}", data)


def test_ollama_merges_system_messages_and_prepends_modelfile_system():
    text = render_ollama_prompt(CHATML_TEMPLATE, "SYS", [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
