"""Checks every export makes, with or without --verify: the adapter's shapes against the base's
config, broken adapter files and configs, and error messages that name paths that still exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import embedded_cfg, make_adapter

from edentune.errors import EdentuneError
from edentune.export.adapter_gguf import read_peft_adapter, validate_adapter_against_base, write_adapter_gguf
from edentune.models import embedded_gguf_path


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("tiny") / "ad")


def _config(model_dir) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def test_export_without_verify_refuses_an_adapter_for_another_model(tiny_adapter, tmp_path):
    from edentune.export import export_adapter

    with pytest.raises(EdentuneError, match=r"(?s)does not fit the base model.*blk\.0\.attn_q: lora_A \(8, 64\)") as err:
        export_adapter(embedded_cfg("llama", tmp_path), tiny_adapter, tmp_path / "export", verify=False)
    assert "model.name_or_path" in str(err.value)
    assert not (tmp_path / "export").exists()


def test_layers_beyond_the_base_are_refused(tiny_llama_dir, tiny_adapter):
    with pytest.raises(EdentuneError, match=r"blk\.1\.attn_q: the base has only 1 layers"):
        read_peft_adapter(tiny_adapter, _config(tiny_llama_dir) | {"num_hidden_layers": 1})


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_broken_safetensors_file_is_a_clear_error(tiny_llama_dir, tiny_adapter, tmp_path, damage):
    ad = tmp_path / "ad"
    shutil.copytree(tiny_adapter, ad)
    weights = ad / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 500, "empty": b""}[damage])
    with pytest.raises(EdentuneError, match="adapter_model.safetensors: not a readable safetensors file"):
        read_peft_adapter(ad, _config(tiny_llama_dir))


@pytest.mark.parametrize(("text", "message"), [
    ("{}", "not a LoRA adapter config: r, lora_alpha missing"),
    ('{"r": 0, "lora_alpha": 16}', "not a LoRA adapter config: r missing or not a positive number"),
    ('{"r": true, "lora_alpha": "16"}', "r, lora_alpha missing"),
    ("[1, 2]", "a JSON object is expected"),
    ("not json", "not readable JSON"),
    ("\udcff", "not readable JSON"),
])
def test_a_broken_adapter_config_is_a_clear_error(tiny_llama_dir, tiny_adapter, tmp_path, text, message):
    ad = tmp_path / "ad"
    shutil.copytree(tiny_adapter, ad)
    (ad / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(EdentuneError, match=message):
        read_peft_adapter(ad, _config(tiny_llama_dir))


def test_validation_errors_name_the_adapter_by_its_label(tiny_llama_dir, tiny_adapter, tmp_path):
    """--verify validates the GGUF while it is still in a temporary folder: the error must name
    something that exists afterwards (export passes `exported from <adapter dir>`)."""
    path = write_adapter_gguf(read_peft_adapter(tiny_adapter, _config(tiny_llama_dir)), tmp_path / "tmp-xyz" / "adapter.gguf")
    with pytest.raises(EdentuneError, match=f"adapter exported from {tiny_adapter} does not fit base") as err:
        validate_adapter_against_base(path, embedded_gguf_path(), label=f"exported from {tiny_adapter}")
    assert "tmp-xyz" not in str(err.value)
    path.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(EdentuneError, match="adapter .* is not a readable GGUF file"):
        validate_adapter_against_base(path, embedded_gguf_path())
