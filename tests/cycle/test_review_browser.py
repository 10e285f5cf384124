"""`edentune review` in a real browser: Playwright drives the system Chromium (installed by `make
setup`; Playwright's own browser download is not used). The workspace is a round stopped after
cleaning (`review: required`), so no model is trained here; the blind pairs are put in the
registry as the round's blind step would (that step itself runs in test_review_cycle.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edentune.cycle import human
from edentune.registry import Registry

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser]
if not CHROMIUM and not os.environ.get("CI"):
    pytestmark.append(pytest.mark.skip(reason="no system chromium (make setup installs it); required in CI"))

XSS = {"messages": [{"role": "user", "content": "Why does this not show? <script>window.__pwned = 'script'</script>"},
                    {"role": "assistant", "content": "Because <img src=x onerror=\"window.__pwned='img'\"> is escaped. "
                                                     "<b>bold</b> stays literal too."}]}
SECRET = {"messages": [{"role": "user", "content": "Mail the report to jane.doe@example.com please."},
                       {"role": "assistant", "content": "Done: I drafted the mail to jane.doe@example.com with the report attached."}]}
WRONG_LANGUAGE = {"messages": [{"role": "user", "content": "오늘 날씨가 어떤가요? 우산이 필요할까요?"},
                               {"role": "assistant", "content": "It looks sunny today, so you will not need an umbrella."}]}
SCREENSHOTS = os.environ.get("EDENTUNE_SCREENSHOT_DIR")  # docs/img: the README's pictures


@pytest.fixture(scope="module")
def review_ws(tmp_path_factory, make_workspace, new_data, standin_factory):
    from edentune.cycle.round import run_round

    month_records, write_jsonl = new_data
    d = tmp_path_factory.mktemp("review")
    month = write_jsonl(d / "month.jsonl", [XSS, SECRET, WRONG_LANGUAGE, SECRET, *month_records(seed=7)])
    server = standin_factory()
    ws = make_workspace(d / "ws", server.host, review="required")
    result = run_round(ws, [month], round_id="2026-05")
    assert result.status == "waiting"
    return ws


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def server(review_ws):
    from edentune.review.server import serve

    running = serve(review_ws, background=True)
    yield running
    running.stop()


def _registry(ws: Path) -> Registry:
    return Registry(ws / "registry.sqlite")


def _items(ws: Path) -> dict[str, human.ReviewItem]:
    from edentune.cycle.workspace import load_workspace

    with _registry(ws) as reg:
        return {i.conv_id: i for i in human.review_items(load_workspace(ws), reg, "2026-05")}


def _shot(page, name: str, keep: bool = False) -> None:
    """`keep`: only when the picture is missing (the dashboard's is best taken in test_review_cycle.py, with rounds)."""
    if SCREENSHOTS and not (keep and (Path(SCREENSHOTS) / name).exists()):
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=False)


def test_requests_without_the_token_are_refused(server):
    base = server.url.split("?")[0]
    for url in (base, base.replace("/review", "/dashboard"), base.replace("/review", "/api/progress")):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code == 403
    wrong = urllib.request.Request(base + "?token=not-the-token")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(wrong, timeout=10)
    assert err.value.code == 403
    # The token's cookie alone does not make a POST: it needs the CSRF field too.
    post = urllib.request.Request(base.replace("/review", "/review/decide"), data=b"decision=rejected&conv=x", method="POST",
                                  headers={"Cookie": f"edentune_review={server.token}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(post, timeout=10)
    assert err.value.code == 403
    with urllib.request.urlopen(server.url, timeout=10) as ok:
        assert ok.status == 200


def test_remote_host_needs_allow_remote(review_ws):
    from edentune.errors import EdentuneError
    from edentune.review.server import serve

    with pytest.raises(EdentuneError, match="--allow-remote"):
        serve(review_ws, host="0.0.0.0", background=True)


def test_script_and_onerror_in_a_conversation_render_inert(server, browser):
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(server.url)
    page.wait_for_selector("article.conv")
    assert page.evaluate("window.__pwned") is None and not dialogs
    text = page.inner_text("main")
    assert "<script>window.__pwned = 'script'</script>" in text and "<img src=x onerror=" in text and "<b>bold</b>" in text
    assert page.locator("article.conv img, article.conv script, article.conv b").count() == 0
    flags = page.locator("article.conv .flag").all_inner_texts()
    assert "secrets/PII redacted" in flags
    assert any(f.startswith("quarantined: language mismatch") for f in flags) and any(f.startswith("quarantined: exact duplicate") for f in flags)
    page.close()


def test_decisions_persist_across_a_restart_and_change_what_trains(review_ws, server, browser):
    from edentune.cycle.round import _select
    from edentune.cycle.workspace import load_workspace

    items = [i for i in _items(review_ws).values() if i.status == "clean" and "held out" not in " ".join(i.flags)]
    approve, reject, edit = items[0], items[1], items[2]
    page = browser.new_page()
    page.goto(server.url)
    page.locator(f"article[data-id='{approve.conv_id}'] button.approve").click()
    page.locator(f"article[data-id='{approve.conv_id}'].approved").wait_for()
    page.locator(f"article[data-id='{reject.conv_id}']").focus()
    page.keyboard.press("r")  # the keyboard shortcut
    page.locator(f"article[data-id='{reject.conv_id}'].rejected").wait_for()
    card = page.locator(f"article[data-id='{edit.conv_id}']")
    card.locator("details.edit summary").click()
    answer_box = card.locator("textarea").nth(len(edit.messages) - 1)
    answer_box.fill("An edited answer, written by the reviewer.")
    card.locator("button.save").click()
    page.wait_for_load_state()
    page.locator(f"article[data-id='{reject.conv_id}'].rejected").wait_for()
    counts = {k: int(page.inner_text(f"[data-count={k}]")) for k in ("total", "clean", "approved", "rejected", "pending", "quarantined")}
    assert counts["approved"] + counts["rejected"] + counts["pending"] == counts["clean"]
    assert counts["clean"] + counts["quarantined"] == counts["total"]
    assert counts["rejected"] == 1 and counts["approved"] == 2  # the edit approves an undecided conversation
    page.close()
    server.stop()

    # A new server (a new token): the decisions come from the registry.
    from edentune.review.server import serve

    again = serve(review_ws, background=True)
    try:
        page = browser.new_page()
        page.goto(again.url)
        assert "approved" in page.locator(f"article[data-id='{approve.conv_id}']").get_attribute("class")
        assert "rejected" in page.locator(f"article[data-id='{reject.conv_id}']").get_attribute("class")
        edited_card = page.locator(f"article[data-id='{edit.conv_id}']")
        assert "An edited answer, written by the reviewer." in edited_card.inner_text()
        assert edit.messages[-1]["content"] in edited_card.inner_text()  # the original is kept beside the edit
        _shot(page, "review.png")
        page.close()
    finally:
        again.stop()
    kept = _items(review_ws)[edit.conv_id]
    assert kept.messages == edit.messages and kept.edited[-1]["content"] == "An edited answer, written by the reviewer."

    # What the round's select step trains on.
    ws = load_workspace(review_ws)
    out = review_ws / "selected.jsonl"
    with _registry(review_ws) as reg:
        _select(ws, "default", ws.shared_data_dir("2026-05") / "usable.jsonl", out, human.review_filter(ws, reg, "2026-05"))
    trained = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    ids = {human.conv_id({"messages": r["messages"]}) for r in trained}
    assert reject.conv_id not in ids and approve.conv_id in ids
    assert [r["messages"][-1]["content"] for r in trained if r.get("review_edited") == edit.conv_id] == [
        "An edited answer, written by the reviewer."]


def test_a_second_tab_does_not_lose_decisions(review_ws, server, browser):
    context = browser.new_context()
    tab1, tab2 = context.new_page(), context.new_page()
    tab1.goto(server.url + "&status=pending")
    tab2.goto(server.url + "&status=pending")
    pending = tab1.locator("article.conv").evaluate_all("els => els.map(e => e.dataset.id)")
    first, second = pending[0], pending[1]
    tab1.locator(f"article[data-id='{first}'] button.reject").click()
    tab1.locator(f"article[data-id='{first}'].rejected").wait_for()
    tab2.locator(f"article[data-id='{second}'] button.reject").click()
    tab2.locator(f"article[data-id='{second}'].rejected").wait_for()
    # tab2 still shows `first` as undecided: its bulk "approve every undecided one" must not override tab1.
    tab2.click("#approve-all-shown")
    tab2.wait_for_load_state()
    items = _items(review_ws)
    assert items[first].decision == "rejected" and items[second].decision == "rejected"
    assert all(i.decision != "pending" for i in items.values() if i.status == "clean")
    tab1.goto(server.url)
    assert "rejected" in tab1.locator(f"article[data-id='{second}']").get_attribute("class")
    context.close()


def test_blind_page_hides_the_sides_and_picks_give_win_rate_and_dpo_pairs(review_ws, server, browser):
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(6)]
    pairs = [{"pair_id": f"opaque{i}x{os.urandom(4).hex()}", "seq": i, "prompt": p, "first_side": "live" if i % 2 else "candidate",
              "live_answer": f"Answer kept by model one, {i}.", "candidate_answer": f"Answer given by model two, {i}.",
              "detail": {"conv_id": f"c{i}"}} for i, p in enumerate(prompts)]
    with _registry(review_ws) as reg:
        reg.add_blind_pairs("2026-05", "default", pairs)
    # The user prefers "model two" (the candidate) in 4 pairs, "model one" in 1, and calls one a tie.
    wanted = {0: "two", 1: "two", 2: "two", 3: "two", 4: "one", 5: "tie"}
    requests = []
    page = browser.new_page()
    page.on("request", lambda r: requests.append((r.url, r.post_data or "")))
    page.goto(server.url.replace("/review", "/compare"))
    html = page.content()
    for leak in ("first_side", "live_answer", "candidate_answer"):
        assert leak not in html
    assert not re.search(r"\b(live|candidate)\b", page.inner_text("main"), re.I)
    _shot(page, "compare.png")
    for section in page.locator("section.pair").all():
        text = section.inner_text()
        i = int(re.search(r"Question number (\d)", text).group(1))
        a = section.locator("pre.answer").nth(0).inner_text()
        if wanted[i] == "tie":
            choice = "tie"
        else:
            choice = "a" if f"model {wanted[i]}" in a else "b"
        section.locator(f"button[value={choice}]").click()
        page.wait_for_timeout(50)
    page.wait_for_selector("tr.result")
    assert page.inner_text("tr.result .win-rate") == f"{100 * 4.5 / 6:.1f}%"
    for url, body in requests:
        assert not re.search(r"live|candidate|first_side", url + body, re.I), (url, body)
        if "/compare/pick" in url:
            assert re.fullmatch(r"pair=opaque\dx[0-9a-f]+&pick=(a|b|tie|both_bad)", body), body
    page.close()

    with _registry(review_ws) as reg:
        picked = reg.blind_pairs("2026-05")
    rate = human.win_rate(picked)
    assert (rate["candidate"], rate["live"], rate["tie"]) == (4, 1, 1) and rate["ci_low"] < rate["win_rate"] < rate["ci_high"]
    dpo = human.dpo_pairs(picked)
    assert len(dpo) == 5
    for row in dpo:
        i = int(row["prompt"][0]["content"].split()[-1].rstrip("?"))
        assert f"model {wanted[i]}" in row["chosen"][0]["content"]
        assert row["provenance"]["round"] == "2026-05" and row["provenance"]["chosen_model"] in ("live", "candidate")


def test_dashboard_renders_the_rounds(review_ws, server, browser):
    page = browser.new_page()
    page.goto(server.url.replace("/review", "/dashboard"))
    assert "2026-05" in page.inner_text("#rounds")
    _shot(page, "dashboard.png", keep=True)
    page.close()


def test_rollback_needs_a_confirmation_and_reports_refusals(server, browser):
    page = browser.new_page()
    page.goto(server.url.replace("/review", "/dashboard/rollback") + "&round=2026-05")
    page.click("button:has-text('roll back')")
    page.wait_for_selector("p.bad")
    assert "tick the confirmation" in page.inner_text("main")
    page.check("input[name=confirm]")
    page.click("button:has-text('roll back')")
    # The round is still being prepared: the cycle's rollback refuses it, and the page says why.
    page.wait_for_selector("p.bad:has-text('2026-05')")
    assert page.locator("p.bad").count() == 1 and "2026-05" in page.inner_text("p.bad") and "Done" not in page.inner_text("main")
    page.close()


def test_cli_refuses_a_remote_host_without_allow_remote(review_ws):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "edentune", "review", str(review_ws), "--host", "0.0.0.0", "--no-browser"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--allow-remote" in proc.stderr and "Traceback" not in proc.stderr
