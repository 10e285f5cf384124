"""`--help` of every command and subcommand: exit 0, usage shown, no traceback.

Commands are found by walking the click tree of the Typer app, so a command added later (a new
stage's `register`) is covered without touching this file.
"""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from edentune.cli import app


def _command_paths(command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    # typer's groups carry their subcommands in `.commands` (typer may vendor its own click)
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        paths.extend(_command_paths(sub, (*path, name)))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


def test_the_walk_finds_every_stage():
    names = {" ".join(p) for p in COMMANDS}
    # one command of each stage and the nested groups: if the walk broke, this would shrink
    assert {"", "init", "config check", "plan", "train", "inspect", "data", "data inspect", "data clean", "eval",
            "compare", "export", "deploy"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "edentune")
def test_help_of_every_command(path):
    result = CliRunner().invoke(app, [*path, "--help"], catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "Traceback" not in result.output
