"""`edentune export` and `edentune deploy`: thin wrappers over edentune.export (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        config: Path = typer.Argument(..., help="run config YAML"),
        adapter: Path = typer.Option(..., "--adapter", "-a", help="PEFT adapter directory (adapter_model.safetensors)"),
        output: Path = typer.Option(Path("export"), "--output", "-o", help="export directory (replaced atomically)"),
        merged: bool = typer.Option(False, "--merged", help="fallback route: merge into the base and write one GGUF model"),
        verify: bool = typer.Option(False, "--verify", help="llama.cpp parity checks (logits, greedy, template) before finishing"),
    ) -> None:
        """Export an adapter for Ollama: adapter.gguf + Modelfile (or model.gguf with --merged)."""
        from ..cli import console
        from ..config import load_config
        from .api import export_adapter, export_merged

        cfg = load_config(config)
        result = (export_merged if merged else export_adapter)(cfg, adapter, output, verify=verify)
        console.print(f"[green]exported[/] {result.gguf} and {len(result.modelfiles)} Modelfile(s); report {result.report_path}")
        for name, rep in result.report.get("logits", {}).items():
            console.print(f"  parity vs {Path(name).name}: max rel {rep['max_rel']:.4f}, top-1 {rep['top1_agreement']:.3f}"
                          + (f", adapter delta rel {rep['delta_rel']:.3f}" if rep.get("delta_rel") is not None else ""))
        console.print("create it in Ollama with `edentune deploy` or:")
        for cmd in result.create_commands:
            console.print(f"  {cmd}", highlight=False)

    @app.command()
    def deploy(
        config: Path = typer.Argument(..., help="run config YAML"),
        export_dir: Path = typer.Option(Path("export"), "--export", "-e", help="directory written by `edentune export`"),
        host: str = typer.Option(None, "--host", help="Ollama URL (default: export.ollama_host, then $OLLAMA_HOST, then http://127.0.0.1:11434)"),
        rollback: bool = typer.Option(False, "--rollback", help="restore the model the last deploy replaced"),
        gate: Path = typer.Option(None, "--gate", help="comparison.json from `edentune compare`: deploy only if it says ship for this adapter"),
    ) -> None:
        """Create the exported model in Ollama (keeps the old one as <name>:previous), or roll back."""
        from ..cli import console
        from ..config import load_config
        from . import deploy as d

        cfg = load_config(config)
        if rollback:
            rec = d.rollback(cfg, host=host)
            console.print(f"[green]restored[/] {rec['model']} from {rec['restored_from']}")
            return
        for rec in d.deploy(cfg, export_dir, host=host, gate=gate):
            console.print(f"[green]deployed[/] {rec['model']} (FROM {rec['from']}; previous kept as {rec['previous'] or '-'})")
