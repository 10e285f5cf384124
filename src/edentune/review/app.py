"""The web app of `edentune review WS`: data review, blind comparison, cycle dashboard.

Server-rendered Jinja2 (autoescape on: conversations hold code, HTML and `<script>`) on FastAPI;
a few lines of inline JavaScript (keyboard shortcuts, posting without a reload, progress polling)
and no front-end build. The page works without JavaScript too (plain forms).

Security, as Jupyter does it: a random token in the printed URL. Every request needs it, in the
query (the first visit, which sets an HttpOnly SameSite=Strict cookie) or in that cookie; anything
else gets 403. Every state-changing request is a POST that must also carry the token in a form
field or an `X-Edentune-Token` header (CSRF). The Host header must be the address served (against
DNS rebinding). The browser only ever sends ids (conversation hashes, opaque pair ids, round ids
looked up in the registry), never a path; a Content-Security-Policy lets only this page's own
script (by nonce) run, so even a slip in escaping could not execute a conversation's markup.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from urllib.parse import urlencode, urlsplit

# (FastAPI reads the endpoints' annotations, so its names are imported here, not inside create_app:
# this module is imported by the `review` command only, never at CLI start.)

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse

from ..cycle import human
from ..cycle.workspace import Workspace, check_round_id, load_workspace
from ..errors import EdentuneError

TEMPLATES = Path(__file__).resolve().parent / "templates"
COOKIE = "edentune_review"
TOKEN_HEADER = "x-edentune-token"


def csrf_refused() -> PlainTextResponse:
    return PlainTextResponse("forbidden: missing or wrong CSRF token", status_code=403)


STATUSES = ("all", "pending", "approved", "rejected", "edited", "quarantined")


def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    return env


def create_app(ws_dir: str | Path, token: str, allowed_hosts: set[str] | None = None):
    """The ASGI app for one workspace. `allowed_hosts`: Host header values accepted (None: any)."""
    ws_dir = Path(ws_dir)
    load_workspace(ws_dir)  # a broken workspace fails at start, not on the first page
    env = _env()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def workspace() -> Workspace:
        return load_workspace(ws_dir)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if allowed_hosts is not None and host not in allowed_hosts:
            return PlainTextResponse("forbidden: unexpected Host header", status_code=403)
        given = request.query_params.get("token")
        from_query = given is not None and secrets.compare_digest(given, token)
        cookie = request.cookies.get(COOKIE)
        if not from_query and not (cookie is not None and secrets.compare_digest(cookie, token)):
            return PlainTextResponse("forbidden: open the URL that `edentune review` printed (it holds the token)", status_code=403)
        if request.method not in ("GET", "HEAD", "POST"):
            return PlainTextResponse("method not allowed", status_code=405)
        # (A POST's CSRF token is checked by `posted` in the endpoint: the body can be read once.)
        request.state.nonce = secrets.token_urlsafe(16)
        response = await call_next(request)
        if from_query:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{request.state.nonce}'; style-src 'unsafe-inline'; img-src data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def posted(request: Request):
        """The POST's form when it carries the token (header or `csrf` field), else None."""
        form = await request.form()
        sent = request.headers.get(TOKEN_HEADER) or form.get("csrf")
        return form if isinstance(sent, str) and secrets.compare_digest(sent, token) else None

    def page(request: Request, name: str, **ctx) -> HTMLResponse:
        ctx.update(csrf=token, nonce=request.state.nonce, workspace=str(ws_dir), page=name.split(".")[0])
        return HTMLResponse(env.get_template(name).render(**ctx))

    def wants_json(request: Request) -> bool:
        return TOKEN_HEADER in request.headers

    def back(request: Request, default: str) -> RedirectResponse:
        # Only a path of this app goes back into a redirect (never an absolute URL from the form).
        ref = urlsplit(request.headers.get("referer") or "")
        same = ref.netloc == request.headers.get("host") and ref.path.startswith("/")
        return RedirectResponse(ref.path + (f"?{ref.query}" if ref.query else "") if same else default, status_code=303)

    @app.get("/")
    def index():
        return RedirectResponse("/review", status_code=303)

    # -- data review -------------------------------------------------------------------------
    @app.get("/review", response_class=HTMLResponse)
    def review_page(request: Request, status: str = "all", flag: str = "", q: str = ""):
        ws = workspace()
        with ws.open_registry() as reg:
            round_id = human.review_round(reg)
            items = human.review_items(ws, reg, round_id) if round_id else []
        counts = human.review_counts(items)
        flags = sorted({f.split(" (")[0] for i in items for f in i.flags})
        status = status if status in STATUSES else "all"
        shown = [i for i in items if _matches(i, status, flag, q)]
        return page(request, "review.html", round_id=round_id, items=shown, counts=counts, flags=flags, status=status,
                    flag=flag, q=q, statuses=STATUSES, mode=ws.config.review,
                    waiting=ws.config.review == "required" and counts["pending"] > 0)

    @app.post("/review/decide")
    async def decide(request: Request):
        form = await posted(request)
        if form is None:
            return csrf_refused()
        decision, only_pending = form.get("decision"), form.get("only_pending") == "1"
        if decision not in ("approved", "rejected", "pending"):
            return PlainTextResponse("unknown decision", status_code=400)
        ws = workspace()
        with ws.open_registry() as reg:
            round_id = human.review_round(reg)
            items = {i.conv_id: i for i in human.review_items(ws, reg, round_id)} if round_id else {}
            ids = [c for c in form.getlist("conv") if c in items and items[c].status == "clean"]
            if only_pending:  # a bulk action from an older page never overrides a decision made since
                ids = [c for c in ids if items[c].decision == "pending"]
            if ids:
                reg.set_review(round_id, ids, decision=decision)
            counts = human.review_counts(human.review_items(ws, reg, round_id)) if round_id else {}
        if wants_json(request):
            return JSONResponse({"changed": ids, "decision": decision, "counts": counts})
        return back(request, "/review")

    @app.post("/review/edit")
    async def edit(request: Request):
        form = await posted(request)
        if form is None:
            return csrf_refused()
        cid = form.get("conv")
        ws = workspace()
        with ws.open_registry() as reg:
            round_id = human.review_round(reg)
            items = {i.conv_id: i for i in human.review_items(ws, reg, round_id)} if round_id else {}
            item = items.get(cid)
            if item is None or item.status != "clean":
                return PlainTextResponse("no such conversation in the round being reviewed", status_code=404)
            if form.get("revert") == "1":
                reg.set_review(round_id, [cid], clear_edit=True)
            else:
                contents = [form.get(f"m{i}") for i in range(len(item.messages))]
                if any(not isinstance(c, str) for c in contents):
                    return PlainTextResponse("every message of the conversation must be sent", status_code=400)
                edited = [{"role": m["role"], "content": c.replace("\r\n", "\n")} for m, c in zip(item.messages, contents)]
                if not any(c.strip() for m, c in zip(edited, contents) if m["role"] == "assistant"):
                    return PlainTextResponse("an edit must keep an answer", status_code=400)
                reg.set_review(round_id, [cid], edited=edited if edited != item.messages else None,
                               clear_edit=edited == item.messages,
                               decision="approved" if item.decision == "pending" else None)
        return back(request, "/review")

    # -- blind comparison --------------------------------------------------------------------
    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(request: Request):
        ws = workspace()
        with ws.open_registry() as reg:
            round_id, pairs = _blind_round(reg)
        units = sorted({p.unit for p in pairs})
        results = {u: human.win_rate([p for p in pairs if p.unit == u]) for u in units}
        done = bool(pairs) and all(p.pick is not None for p in pairs)
        # What the page gets: opaque id, prompt, answer A, answer B, the pick as A/B. Never a side.
        cards = [{"id": p.pair_id, "unit": p.unit, "prompt": p.prompt, "pick": p.pick,
                  "a": p.live_answer if p.first_side == "live" else p.candidate_answer,
                  "b": p.candidate_answer if p.first_side == "live" else p.live_answer} for p in pairs]
        return page(request, "compare.html", round_id=round_id, cards=cards, done=done, results=results,
                    picked=sum(p.pick is not None for p in pairs), min_win_rate=ws.config.gate.human_min_win_rate)

    @app.post("/compare/pick")
    async def pick(request: Request):
        form = await posted(request)
        if form is None:
            return csrf_refused()
        choice = form.get("pick")
        if choice not in ("a", "b", "tie", "both_bad"):
            return PlainTextResponse("unknown pick", status_code=400)
        ws = workspace()
        with ws.open_registry() as reg:
            round_id, pairs = _blind_round(reg)
            ids = {p.pair_id for p in pairs}
            pair_id = form.get("pair")
            if pair_id not in ids:
                return PlainTextResponse("no such pair", status_code=404)
            reg.set_pick(pair_id, choice)
            pairs = reg.blind_pairs(round_id)
        left = sum(p.pick is None for p in pairs)
        if wants_json(request):
            return JSONResponse({"left": left})
        return RedirectResponse("/compare", status_code=303)

    # -- dashboard ---------------------------------------------------------------------------
    @app.get("/dashboard", response_class=HTMLResponse)
    def dashboard(request: Request):
        from ..cycle.report import METRICS, TRENDS, format_metric, status, trend_plot, verdict_text

        ws = workspace()
        table = status(ws.dir)
        plots = [(METRICS[k][0], trend_plot(table, k)) for k in TRENDS]
        rows = [{"round": r.round_id, "persona": r.persona, "status": r.status, "verdict": verdict_text(r),
                 "live": ", ".join(r.live_for), "metrics": {k: format_metric(k, r.metrics.get(k)) for k in METRICS},
                 "has_eval": bool(r.persona) and (ws.eval_dir(r.round_id, r.persona) / "candidate.json").is_file(),
                 "rollback": r.status == "accepted" and not r.live_for} for r in table.rows]
        running = [r for r in table.rows if r.status == "running" and r.persona]
        return page(request, "dashboard.html", rows=rows, metric_labels={k: v[0] for k, v in METRICS.items()}, plots=plots,
                    live=table.live, running=[(r.round_id, r.persona) for r in running])

    @app.get("/dashboard/answers", response_class=HTMLResponse)
    def answers(request: Request, round: str, unit: str):
        from ..evaluate.runner import EvalResult

        ws = workspace()
        with ws.open_registry() as reg:
            run = reg.run(round, unit) if reg.round(round) is not None else None
        if run is None:
            return PlainTextResponse("no such round and persona", status_code=404)
        out = ws.eval_dir(check_round_id(run.round_id), run.persona)  # from the registry's row, not the request
        try:
            live, cand = EvalResult.load(out / "baseline.json"), EvalResult.load(out / "candidate.json")
        except EdentuneError:
            return PlainTextResponse("this round has no evaluation yet", status_code=404)
        by_id = {c.id: c for c in live.cases}
        cases = [{"id": c.id, "question": c.question, "live": by_id[c.id].answer if c.id in by_id else "",
                  "live_ok": by_id[c.id].passed if c.id in by_id else None, "candidate": c.answer, "candidate_ok": c.passed,
                  "failures": c.failures} for c in cand.cases]
        return page(request, "answers.html", round_id=run.round_id, unit=run.persona, cases=cases,
                    live_model=live.model, candidate_model=cand.model)

    @app.get("/api/progress")
    def progress():
        ws = workspace()
        with ws.open_registry() as reg:
            running = [(r.id, run.persona) for r in reg.rounds() if r.status == "running" for run in reg.runs(r.id)
                       if run.status == "running"]
        return JSONResponse([_progress(ws, round_id, unit) for round_id, unit in running])

    @app.get("/dashboard/rollback", response_class=HTMLResponse)
    def rollback_confirm(request: Request, round: str):
        with workspace().open_registry() as reg:
            rnd = reg.round(round)
        if rnd is None:
            return PlainTextResponse("no such round", status_code=404)
        return page(request, "rollback.html", round_id=rnd.id, error=None, done=None)

    @app.post("/dashboard/rollback", response_class=HTMLResponse)
    async def rollback(request: Request):
        from ..cycle.live import rollback as cycle_rollback

        form = await posted(request)
        if form is None:
            return csrf_refused()
        with workspace().open_registry() as reg:
            rnd = reg.round(str(form.get("round")))
        if rnd is None:
            return PlainTextResponse("no such round", status_code=404)
        if form.get("confirm") != "yes":
            return page(request, "rollback.html", round_id=rnd.id, error="tick the confirmation to roll back", done=None)
        try:
            done = cycle_rollback(ws_dir, to_round=rnd.id)
        except EdentuneError as err:
            return page(request, "rollback.html", round_id=rnd.id, error=str(err), done=None)
        return page(request, "rollback.html", round_id=rnd.id, error=None, done=done)

    return app


def _matches(item: human.ReviewItem, status: str, flag: str, q: str) -> bool:
    if status == "edited" and item.edited is None:
        return False
    if status == "quarantined" and item.status != "quarantined":
        return False
    if status in ("pending", "approved", "rejected") and item.decision != status:
        return False
    if flag and not any(f.startswith(flag) for f in item.flags):
        return False
    return not q or q.lower() in item.text.lower()


def _blind_round(reg):
    """The round whose pairs the page shows: the one being prepared, else the latest with pairs."""
    round_id = human.review_round(reg)
    pairs = reg.blind_pairs(round_id) if round_id else []
    if not pairs:
        all_pairs = reg.blind_pairs()
        if all_pairs:
            round_id = all_pairs[-1].round_id
            pairs = [p for p in all_pairs if p.round_id == round_id]
    return round_id, pairs


def _progress(ws: Workspace, round_id: str, unit: str) -> dict:
    """The latest numbers of a running round's training, from its metrics.jsonl."""
    out = {"round": round_id, "unit": unit, "step": None, "max_steps": None, "loss": None, "eval_loss": None}
    path = ws.run_dir(round_id, unit) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line being written
            if e.get("event") == "train":
                out.update(step=e.get("step"), loss=e.get("loss"))
            elif e.get("event") == "eval":
                out["eval_loss"] = e.get("eval_loss")
            elif e.get("event") == "end":
                out.update(step=e.get("global_step"), max_steps=e.get("max_steps"))
    manifest = ws.run_dir(round_id, unit) / "manifest.json"
    if out["max_steps"] is None and manifest.is_file():
        try:
            out["max_steps"] = json.loads(manifest.read_text(encoding="utf-8")).get("max_steps")
        except ValueError:
            pass
    return out


def url_for(host: str, port: int, token: str, path: str = "/review") -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}?{urlencode({'token': token})}"
