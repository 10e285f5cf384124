"""`cycle status`: the history of a workspace as a table, and an HTML report with trend plots.

Everything here reads the registry only (read-only connection, WAL): it works while a round is
running, and while cycle.yaml has errors. Metrics are the dicts the round runner stores on each
run (`Registry.set_run(..., metrics=...)`), under the keys of `METRICS` below.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EdentuneError
from ..io import check_outputs, write_text_atomic
from ..registry import REGISTRY_NAME, SHARED, Registry
from .pending import DEPLOY_EVENTS

# metric key -> (label, kind); kind "rate" prints as a percentage, "loss" as a number, "count" as an integer.
METRICS = {
    "train_records": ("mixed", "count"),
    "new_records": ("new", "count"),
    "replay_records": ("replay", "count"),
    "realised_new_ratio": ("new share of the mix", "rate"),
    "dropped_for_length": ("dropped for length", "count"),
    "trained_records": ("trained", "count"),
    "started_from": ("started from", "text"),
    "val_loss": ("validation loss", "loss"),
    "live_val_loss": ("live round's validation loss", "loss"),
    "korean_consistency": ("Korean consistency", "rate"),
    "persona_adherence": ("persona adherence", "rate"),
    "forgetting": ("forgetting vs the live model", "rate"),
    "forgetting_base": ("forgetting vs the original base", "rate"),
    "case_pass_rate": ("cases passed", "rate"),
}
TRENDS = ("val_loss", "korean_consistency", "persona_adherence", "forgetting", "forgetting_base")  # one plot each in the HTML report


@dataclass
class StatusRow:
    round_id: str
    seq: int
    created: str
    round_status: str
    persona: str  # "shared" for a shared-adapter run, "" for a round that ended before any run began
    status: str  # the run's: running | accepted | refused | failed (the round's when there is no run)
    metrics: dict
    ship: bool | None
    reasons: list[str]
    live_for: list[str]  # personas for which this run is live now
    export_dir: str | None
    adapter_sha256: str | None
    last_step: str | None  # the last recorded step of this run (progress of a running round)
    step_seconds: dict[str, float] = field(default_factory=dict)  # step -> seconds (the round's shared steps and this run's)
    wall_s: float | None = None  # the round's wall time, start to finish (None while running)
    deployed: bool = True  # False: accepted by `cycle run --no-deploy`, waiting for `cycle deploy`


@dataclass
class StatusTable:
    workspace: str
    rows: list[StatusRow]
    live: dict[str, dict] = field(default_factory=dict)  # persona -> {round_id, model, since}
    events: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def status(ws_dir: str | Path) -> StatusTable:
    """The workspace's history: one row per round and persona, oldest first."""
    ws_dir = Path(ws_dir).expanduser()
    with Registry(ws_dir / REGISTRY_NAME, readonly=True) as reg:
        rounds, runs, live, events = reg.rounds(), reg.runs(), reg.live_rows(), reg.events()
        step_rows = reg.list_steps()
    deployed = {(s.round_id, s.persona) for s in step_rows if s.step == "deploy"}
    deployed_rounds = {e.round_id for e in events if e.kind in DEPLOY_EVENTS}
    last_steps = {(s.round_id, s.persona): s.step for s in step_rows}  # recording order: the last wins
    seconds: dict[tuple[str, str], dict[str, float]] = {}
    for st in step_rows:
        if isinstance(st.record.detail.get("seconds"), (int, float)):
            seconds.setdefault((st.round_id, st.persona), {})[st.step] = st.record.detail["seconds"]
    by_round: dict[str, list] = {}
    for run in runs:
        by_round.setdefault(run.round_id, []).append(run)
    rows = []
    for rnd in rounds:
        shared = seconds.get((rnd.id, SHARED), {})
        wall = _seconds_between(rnd.created, rnd.finished)
        if rnd.id not in by_round:
            rows.append(StatusRow(rnd.id, rnd.seq, rnd.created, rnd.status, "", rnd.status, {}, None, [], [], None, None,
                                  last_steps.get((rnd.id, SHARED)), dict(shared), wall))
        for run in by_round.get(rnd.id, []):
            live_for = [lv.persona for lv in live if lv.round_id == rnd.id and (run.persona in (lv.persona, SHARED))]
            ship = run.verdict.get("ship") if isinstance(run.verdict, dict) else None
            rows.append(StatusRow(rnd.id, rnd.seq, rnd.created, rnd.status, run.persona, run.status, run.metrics, ship,
                                  [str(r) for r in run.reasons or []], live_for, run.export_dir, run.adapter_sha256,
                                  last_steps.get((rnd.id, run.persona)) or last_steps.get((rnd.id, SHARED)),
                                  {**shared, **seconds.get((rnd.id, run.persona), {})}, wall,
                                  deployed=run.status != "accepted" or (rnd.id, run.persona) in deployed
                                  or rnd.id in deployed_rounds))
    return StatusTable(workspace=str(ws_dir), rows=rows,
                       live={lv.persona: {"round_id": lv.round_id, "model": lv.model, "since": lv.since} for lv in live},
                       events=[asdict(e) for e in events])


def _seconds_between(start: str | None, end: str | None) -> float | None:
    import datetime as dt

    try:
        return round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 1)
    except (TypeError, ValueError):
        return None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def waiting_rounds(table: StatusTable) -> list[str]:
    """Rounds accepted by `cycle run --no-deploy` and not deployed yet, oldest first."""
    return list(dict.fromkeys(r.round_id for r in table.rows if r.status == "accepted" and not r.deployed))


def format_metric(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    kind = METRICS.get(key, ("", "loss"))[1]
    if not isinstance(value, (int, float)):
        return str(value)
    if kind == "rate":
        return f"{100 * value:.1f}%"
    if kind == "count":
        return f"{value:,.0f}"
    return f"{value:.4f}"


def verdict_text(row: StatusRow, reasons: bool = True) -> str:
    if row.status == "accepted":
        return "deployed" if row.deployed else "accepted, not deployed"
    if row.status == "running":
        return f"running ({row.last_step})" if row.last_step else "running"
    return row.status + (": " + "; ".join(row.reasons) if reasons and row.reasons else "")


def live_text(row: StatusRow, short: bool = False) -> str:
    if not row.live_for:
        return ""
    mark = "●" if short else "● live"
    return mark if row.live_for == [row.persona] else f"{mark}: " + ", ".join(row.live_for)


# -- HTML ---------------------------------------------------------------------------------------
def _data_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def trend_plot(table: StatusTable, key: str) -> str | None:
    """A line per persona across rounds (accepted: filled dots, refused: crosses); a data: URI."""
    series: dict[str, list[tuple[int, float, str]]] = {}
    order = sorted({(r.seq, r.round_id) for r in table.rows})
    x_of = {round_id: i for i, (_, round_id) in enumerate(order)}
    for row in table.rows:
        value = row.metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            series.setdefault(row.persona or "-", []).append((x_of[row.round_id], float(value), row.status))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, kind = METRICS[key]
    scale = 100 if kind == "rate" else 1
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for persona, points in sorted(series.items()):
        xs, ys = [p[0] for p in points], [scale * p[1] for p in points]
        (line,) = ax.plot(xs, ys, label=persona)
        for x, y, st in zip(xs, ys, (p[2] for p in points)):
            ax.plot([x], [y], marker="o" if st == "accepted" else "x", color=line.get_color(), markersize=7)
    ax.set_xticks(range(len(order)), [round_id for _, round_id in order], rotation=30, ha="right")
    ax.set_title(label + (" (%)" if kind == "rate" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _data_uri(fig)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
tr.refused td { color: #a33; } tr.live td { font-weight: bold; }
.trend { display: flex; gap: 2em; align-items: flex-start; margin-bottom: 2em; flex-wrap: wrap; }
"""


def _cell(text: str, cls: str = "") -> str:
    return f"<td{f' class={cls!r}' if cls else ''}>{html.escape(text)}</td>"


def render_html(table: StatusTable) -> str:
    keys = list(METRICS)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["round", "persona", *(METRICS[k][0] for k in keys), "wall time",
                                                            "seconds per step", "verdict", "live"])
    body = []
    for row in table.rows:
        cls = "live" if row.live_for else "refused" if row.status == "refused" else ""
        cells = [_cell(row.round_id), _cell(row.persona, "text")] + [_cell(format_metric(k, row.metrics.get(k))) for k in keys]
        cells += [_cell(format_duration(row.wall_s)), _cell(", ".join(f"{k} {v:g}" for k, v in row.step_seconds.items()), "text")]
        cells += [_cell(verdict_text(row), "text"), _cell(live_text(row), "text")]
        body.append(f"<tr class={cls!r}>{''.join(cells)}</tr>")
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>edentune cycle status</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>edentune cycle: {html.escape(table.workspace)}</h1>",
           "<h2>Rounds</h2>", f"<table><tr>{head}</tr>{''.join(body)}</table>"]
    if table.live:
        out.append("<p>Live now: " + html.escape(", ".join(f"{p} → {v['round_id']} ({v['model']})" for p, v in table.live.items())) + "</p>")
    out.append("<h2>Trends across rounds</h2><p>One line per persona; dots: accepted rounds, crosses: refused ones.</p>")
    for key in TRENDS:
        label = METRICS[key][0]
        rows = [r for r in table.rows if key in r.metrics]
        numbers = "".join(f"<tr>{_cell(r.round_id)}{_cell(r.persona, 'text')}{_cell(format_metric(key, r.metrics.get(key)))}</tr>"
                          for r in rows)
        uri = trend_plot(table, key)
        plot = f"<img alt='{html.escape(label)} by round' src='{uri}'>" if uri else "<p>no values yet</p>"
        out.append(f"<h3>{html.escape(label)}</h3><div class='trend'>{plot}"
                   f"<table><tr><th>round</th><th>persona</th><th>{html.escape(label)}</th></tr>{numbers}</table></div>")
    if table.events:
        out.append("<h2>Deploys and rollbacks</h2><table><tr><th>time</th><th>event</th><th>round</th><th>persona</th><th>model</th></tr>")
        out += [f"<tr>{_cell(e['time'])}{_cell(e['kind'], 'text')}{_cell(e['round_id'] or '')}{_cell(e['persona'] or '', 'text')}"
                f"{_cell(e['model'] or '', 'text')}</tr>" for e in table.events]
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def write_html(table: StatusTable, path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise EdentuneError(f"{path} is a folder", hint="give a file path for the report, e.g. cycle-report.html")
    # Never a file the workspace manages (its rounds, exports, fixed sets, registry, config): io.managed_owner.
    check_outputs([], [path], user_paths=True)
    write_text_atomic(path, render_html(table))
    return path
