"""`export -o` replaces only a previous export: never the adapter, the user's folder, or `.`."""

import hashlib
import os
import shutil

import pytest
from conftest import embedded_cfg, make_adapter

from edentune.errors import EdentuneError
from edentune.export.api import EXPORT_MARKER, export_adapter


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def adapter_and_cfg(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-outdir")
    cfg = embedded_cfg("llama", root)
    cfg.model.name_or_path = tiny_llama_dir
    return make_adapter(tiny_llama_dir, root / "adapter"), cfg


def test_export_replaces_only_its_own_folder(adapter_and_cfg, tmp_path):
    adapter, cfg = adapter_and_cfg
    out = tmp_path / "export"
    first = export_adapter(cfg, adapter, out, verify=False)
    assert (out / EXPORT_MARKER).is_file() and first.gguf.is_file()
    export_adapter(cfg, adapter, out, verify=False)  # a previous export holding only its own files: replaced as a whole
    assert (out / "adapter.gguf").is_file() and sorted(os.listdir(tmp_path)) == ["export"]  # no temporaries or old copies left
    (out / "notes.txt").write_text("the user's notes on this export")
    (out / "mine").mkdir()
    (out / "mine" / "eval.json").write_text("{}")
    _refused(cfg, adapter, out, r"holds files its earlier write did not put there: mine, notes.txt; replacing the folder would delete them",
             tmp_path)
    res = _cli(cfg, adapter, out, tmp_path)  # the command line says the same, and writes nothing
    assert res.exit_code != 0 and "mine, notes.txt" in str(res.exception)
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "mine")
    export_adapter(cfg, adapter, out, verify=False)
    assert sorted(os.listdir(tmp_path)) == ["export", "run.yaml"]


def _cli(cfg, adapter, out, config_dir):
    from typer.testing import CliRunner

    from edentune.cli import app
    from edentune.config import render_config_yaml

    (config_dir / "run.yaml").write_text(render_config_yaml(cfg))
    before = snapshot(out)
    res = CliRunner().invoke(app, ["export", str(config_dir / "run.yaml"), "--adapter", str(adapter), "-o", str(out)])
    assert snapshot(out) == before
    return res


def _refused(cfg, adapter, out, message, root):
    before = snapshot(root)
    with pytest.raises(EdentuneError, match=message):
        export_adapter(cfg, adapter, out, verify=False)
    assert snapshot(root) == before


def test_export_refuses_the_adapter_folder_inside_or_around_it(adapter_and_cfg):
    adapter, cfg = adapter_and_cfg
    for out in (adapter, adapter / "export", adapter.parent):
        _refused(cfg, adapter, out, "overlaps the input", adapter.parent)


def test_export_refuses_a_folder_it_did_not_write(adapter_and_cfg, tmp_path):
    adapter, cfg = adapter_and_cfg
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("the user's notes")
    (tmp_path / "beside.txt").write_text("beside it")
    _refused(cfg, adapter, precious, "not empty and was not written by edentune", tmp_path)
    (tmp_path / "a-file").write_text("x")
    _refused(cfg, adapter, tmp_path / "a-file", "is not a folder", tmp_path)


def test_export_refuses_the_current_folder(adapter_and_cfg, tmp_path, monkeypatch):
    adapter, cfg = adapter_and_cfg
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    _refused(cfg, adapter, ".", "current folder", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    _refused(cfg, adapter, ".", "current folder", tmp_path)  # even an empty one: it is the working directory
    assert empty.is_dir()


def test_export_cli_refusal_is_a_clear_error(adapter_and_cfg, tmp_path):
    from typer.testing import CliRunner

    from edentune.cli import app

    adapter, cfg = adapter_and_cfg
    from edentune.config import render_config_yaml

    (tmp_path / "run.yaml").write_text(render_config_yaml(cfg))
    before = snapshot(adapter)
    res = CliRunner().invoke(app, ["export", str(tmp_path / "run.yaml"), "--adapter", str(adapter), "-o", str(adapter)])
    assert res.exit_code != 0 and isinstance(res.exception, EdentuneError) and "overlaps the input" in str(res.exception)
    assert snapshot(adapter) == before
