"""`edentune cycle run WS --from-eden [DB]`: this month's Garden of Eden conversations as the round's input.

The import (`edentune.data.eden`) writes the round's files into the round's own data folder,
`rounds/<round>/shared/data/eden/` (chats.jsonl, ratings.jsonl, quarantine.jsonl, import.json),
and the round runs on them exactly as on `--new`/`--feedback` files. Only replies newer than
the watermark of the last finished round are imported; the watermark (the newest message time
in that round's snapshot) is recorded in the registry as an `eden-import` event of the round,
after the round finished, so a crashed round never moves it. A round that is continued after a
crash reuses its import (the database may have grown since: re-importing would change the
round's inputs and retrain it from scratch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..errors import DataError
from ..registry import Registry
from .workspace import Workspace, load_workspace

EVENT = "eden-import"
FINISHED = ("accepted", "refused")
CHATS, RATINGS, QUARANTINE, REPORT = "chats.jsonl", "ratings.jsonl", "quarantine.jsonl", "import.json"


@dataclass
class EdenInputs:
    round_id: str
    new: list[Path]
    feedback: list[Path]
    detail: dict  # what the registry event records: database, since, watermark, counts, ratings
    reused: bool = False


def import_dir(ws: Workspace, round_id: str) -> Path:
    return ws.shared_data_dir(round_id) / "eden"


def last_watermark(reg: Registry) -> int | None:
    """The newest watermark of a finished round (accepted or refused: either trained on its month)."""
    finished = {r.id for r in reg.rounds() if r.status in FINISHED}
    marks = [e.detail.get("watermark_ms") for e in reg.events() if e.kind == EVENT and e.round_id in finished]
    marks = [m for m in marks if isinstance(m, int)]
    return max(marks) if marks else None


def prepare(ws_dir: str | Path, db: str | Path | None, round_id: str | None, console: Console) -> EdenInputs:
    """Import the database (or reuse the import of the unfinished round being continued)."""
    from ..data.cli import show_eden_import
    from ..data.eden import import_eden
    from .round import _pick_round

    ws = load_workspace(ws_dir)
    with ws.open_registry() as reg:
        # An unfinished round is continued only on its own earlier import (the files it ingested).
        running = [r for r in reg.rounds() if r.status == "running"]
        earlier = [import_dir(ws, running[0].id) / CHATS] if round_id is None and len(running) == 1 else []
        round_id = _pick_round(reg, round_id, Console(quiet=True), [f for f in earlier if f.is_file()])
        existing = reg.round(round_id)
        since = last_watermark(reg)
    out = import_dir(ws, round_id)
    if existing is not None and existing.status == "running" and (out / REPORT).is_file():
        detail = json.loads((out / REPORT).read_text(encoding="utf-8"))
        console.print(f"continuing round {round_id} on its earlier Garden of Eden import ({detail['database']})",
                      markup=False, highlight=False)
        return EdenInputs(round_id, [out / CHATS], [out / RATINGS] if detail["ratings"]["written"] else [], detail, True)
    res = import_eden(db, out / CHATS, feedback=out / RATINGS, quarantine=out / QUARANTINE, report_path=out / REPORT,
                      since_ms=since)
    show_eden_import(res, console)
    if not res.counts["records_written"]:
        after = f" after {res.to_json()['since']} (the last round's watermark)" if since is not None else ""
        raise DataError(f"{res.db}: no new conversation to train on{after}",
                        hint="chat with the app, then run the round again; nothing was started")
    if not res.ratings["written"]:
        console.print("no thumbs up/down ratings: this round trains with SFT only", markup=False, highlight=False)
    return EdenInputs(round_id, [out / CHATS], [out / RATINGS] if res.ratings["written"] else [], res.to_json())


def record(ws_dir: str | Path, inputs: EdenInputs) -> None:
    """After the round finished: its watermark, so the next round imports only what came later."""
    if inputs.reused and _recorded(ws_dir, inputs.round_id):
        return
    d = inputs.detail
    with load_workspace(ws_dir).open_registry() as reg:
        reg.record_event(EVENT, round_id=inputs.round_id, detail={
            "database": d["database"], "since_ms": d["since_ms"], "watermark_ms": d["watermark_ms"],
            "counts": d["counts"], "ratings": {k: v for k, v in d["ratings"].items() if k != "dropped"}})


def _recorded(ws_dir: str | Path, round_id: str) -> bool:
    with load_workspace(ws_dir).open_registry(readonly=True) as reg:
        return any(e.kind == EVENT and e.round_id == round_id for e in reg.events())
