"""`edentune review WS`: thin wrapper; the web stack is imported inside the command only."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command("review")
    def review(
        directory: Path = typer.Argument(..., help="cycle workspace folder"),
        port: int = typer.Option(0, "--port", help="port to serve on (default: a free one)"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to bind (a non-loopback one needs --allow-remote)"),
        allow_remote: bool = typer.Option(False, "--allow-remote", help="allow --host beyond this machine"),
        no_browser: bool = typer.Option(False, "--no-browser", help="print the URL only"),
        token: Optional[str] = typer.Option(None, "--token", hidden=True, help="fixed token (default: a random one)"),
    ) -> None:
        """Review the month's data, compare the live and the candidate model blind, see the rounds: a local web app."""
        import webbrowser

        from ..cycle.workspace import load_workspace
        from .server import serve

        load_workspace(directory)
        running = serve(directory, host=host, port=port, allow_remote=allow_remote, token=token)
        out = Console()
        out.print(f"edentune review of {directory}: {running.url}", markup=False, highlight=False, soft_wrap=True)
        out.print("(the token in the URL is required on every request; Ctrl-C stops the server)", markup=False, style="dim")
        if not no_browser:
            webbrowser.open(running.url)
        running.server.run()
