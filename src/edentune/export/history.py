"""The deploy history of a standalone `edentune deploy`: the SQLite registry it records in.

One registry format for standalone deploys and the cycle (`edentune.registry`); a legacy
`deployments.json` of earlier releases is imported once and left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import EdentuneError
from ..io import file_sha256
from ..registry import REGISTRY_NAME, Registry


# -- registry: the standalone deploy's history (a cycle records its own deploys per round) -------

LEGACY_HISTORY = "deployments.json"  # the JSON history of edentune before the SQLite registry


def default_registry(cfg) -> Path:
    return Path(cfg.training.output_dir) / REGISTRY_NAME


def registry_paths(registry: str | Path) -> tuple[Path, Path | None]:
    """(the SQLite registry, the legacy JSON history to import into it) for a `--registry` PATH:
    a SQLite file; a folder (a cycle workspace): FOLDER/registry.sqlite; a legacy `.json` history:
    registry.sqlite beside it. The legacy history is that .json, else a deployments.json beside
    the SQLite file (the old default place), when it exists."""
    path = Path(registry)
    if path.suffix.lower() == ".json":
        return path.parent / REGISTRY_NAME, path if path.exists() else None
    if path.is_dir():
        path = path / REGISTRY_NAME
    legacy = path.parent / LEGACY_HISTORY
    return path, legacy if legacy.exists() else None


def open_registry(registry: str | Path) -> Registry:
    """The registry for `registry` (see registry_paths), opened for writing (created or upgraded),
    with the legacy JSON history imported once (the JSON file itself is only read). Any problem
    is an EdentuneError, raised before the caller touches Ollama."""
    path, legacy = registry_paths(registry)
    imported = read_legacy_history(legacy) if legacy is not None else None
    try:
        reg = Registry(path)
    except EdentuneError as err:
        raise EdentuneError(f"deploy registry {err.args[0]}",
                            hint="; ".join(filter(None, [err.hint, "nothing was changed in Ollama"]))) from None
    if imported is not None:
        try:
            reg.import_events(history_events(imported), source=str(legacy.resolve()), sha256=file_sha256(legacy))
        except BaseException:
            reg.close()
            raise
    return reg


def read_legacy_history(path: str | Path) -> list[dict]:
    """The records of a deployments.json written by an older edentune; an unreadable file is an error."""
    path = Path(path)
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise EdentuneError(f"deploy history {path} cannot be read ({str(err)[:200]})",
                            hint="repair it or move it aside (its records are imported into the registry once); "
                                 "nothing was changed in Ollama") from None
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise EdentuneError(f"deploy history {path} is not a list of deploy records",
                            hint="repair it or move it aside (its records are imported into the registry once); "
                                 "nothing was changed in Ollama")
    return history


def history_events(records: list[dict]) -> list[dict]:
    """One registry event per deploy/rollback record, with the cycle's event kinds: "deploy",
    "error" (a failed deploy, rolled back) or "rollback"; the record itself under detail.records
    (as in the cycle's deploy events). No round or persona: a standalone deploy has neither."""
    events = []
    for r in records:
        kind = "rollback" if r.get("action") == "rollback" else "error" if r.get("status") == "rolled back" else "deploy"
        detail = {"records": [r]} | ({"error": r.get("error")} if kind == "error" else {})
        events.append({"kind": kind, "model": r["model"] if isinstance(r.get("model"), str) else None,
                       "time": r["time"] if isinstance(r.get("time"), str) else None, "detail": detail})
    return events


def record_history(registry: Path, records: list[dict]) -> None:
    with Registry(registry) as reg:
        reg.record_events(history_events(records))
