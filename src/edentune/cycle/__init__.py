"""The monthly cycle (`edentune cycle`): a workspace, its round registry, the replay buffer,
status/report and rollback; `run_round` (in round.py) runs one month end to end.

`run_round` is imported lazily: it pulls in the training stack, and `status` or `rollback`
must not pay for that.
"""

from __future__ import annotations

from typing import Any

from .workspace import Workspace, WorkspaceConfig, init_workspace, load_workspace

__all__ = ["Workspace", "WorkspaceConfig", "init_workspace", "load_workspace", "rollback", "run_round", "status"]


def __getattr__(name: str) -> Any:
    if name == "run_round":
        from .round import run_round

        return run_round
    if name == "status":
        from .report import status

        return status
    if name == "rollback":
        from .live import rollback

        return rollback
    raise AttributeError(f"module 'edentune.cycle' has no attribute {name!r}")
