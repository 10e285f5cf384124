"""`edentune export` and `edentune deploy`: thin wrappers over edentune.export (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


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
        from ..config import load_config
        from ..io import check_output_dir
        from .api import EXPORT_MARKER, export_adapter, export_merged

        check_output_dir(output, marker=EXPORT_MARKER, inputs=[adapter, config], user_paths=True)  # before any work
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
        smoke_check: bool = typer.Option(True, "--smoke-check/--no-smoke-check",
                                         help="after create, ask the model a fixed prompt and compare with llama.cpp on the exported files"),
        registry: Path = typer.Option(
            None, "--registry",
            help="SQLite registry that records deploys and rollbacks, or a cycle workspace folder (its registry.sqlite); "
                 "default: training.output_dir/registry.sqlite. A deployments.json of an older edentune beside it, or "
                 "given here as PATH.json, is imported once and left unchanged; records then go to registry.sqlite beside it"),
        replace: str = typer.Option(None, "--replace", help="publish under this existing tag in place of its model (e.g. qwen2.5:7b, "
                                    "the name Garden of Eden V3 calls); the original is kept as TAG-edentune-original and "
                                    "--rollback --replace TAG puts it back (default: export.replace)"),
        allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch",
                                                 help="--replace: accept a tag whose base differs from the trained base (costs memory and latency)"),
    ) -> None:
        """Create the exported model in Ollama (keeps the old one as <name>:previous), or roll back."""
        from ..config import load_config
        from . import deploy as d
        from . import history

        cfg = load_config(config)
        if replace or allow_base_mismatch:
            cfg = cfg.updated({"export.replace": replace or cfg.export.replace,
                               "export.allow_base_mismatch": allow_base_mismatch or cfg.export.allow_base_mismatch})
        where = registry or history.default_registry(cfg)
        recorded = f"recorded in {history.registry_paths(where)[0]}"
        if rollback:
            rec = d.rollback(cfg, host=host, registry=where)
            console.print(f"[green]restored[/] {rec['model']} from {rec['restored_from']}; {recorded}", highlight=False, soft_wrap=True)
            return
        try:
            records = d.deploy(cfg, export_dir, host=host, gate=gate, registry=where, smoke=smoke_check)
        except d.DeployFailed as err:
            for rec in err.records:
                if rec.get("smoke", {}).get("status") == "failed":
                    console.print(f"  Ollama answered: {rec['smoke']['answer']!r}", highlight=False, markup=False)
                    console.print(f"  llama.cpp with the adapter: {rec['smoke']['expected']!r}", highlight=False, markup=False)
            console.print(f"the failed attempt is {recorded}", highlight=False, soft_wrap=True)
            raise
        for rec in records:
            console.print(f"[green]deployed[/] {rec['model']} (FROM {rec['from']}, {rec['route']} route; "
                          f"previous kept as {rec['previous'] or '-'}); smoke check: {rec['smoke']['status']}", highlight=False)
            if rep := rec.get("replace"):
                console.print(f"  in place of the original {rep['tag']}, kept as {rep['backup']}; undo: "
                              f"edentune deploy {config} --rollback --replace {rep['tag']}", highlight=False, markup=False)
                for note in filter(None, [rep.get("cost"), rep["warning"]]):
                    console.print(f"  [yellow]warning:[/] {note}", highlight=False)
        console.print(recorded, highlight=False, soft_wrap=True)
