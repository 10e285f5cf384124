"""Verdicts, the ship gate (which cannot be fooled), and the Markdown / HTML / JSON reports."""

import hashlib
import json
import os
import re

import pytest

from edentune.config import RunConfig
from edentune.errors import EdentuneError
from edentune.evaluate.compare import METRICS, PREDATES_HASHING, comparability, compare, read_training_curves, verdict
from edentune.evaluate.report import rich_table, write_reports
from edentune.evaluate.runner import CaseResult, EvalResult

SPEC = {s.key: s for s in METRICS}
SUITE_SHA = hashlib.sha256(b"the suite").hexdigest()
# These results carry metrics without the per-case answers behind them: they exercise the
# tolerance rule (the paired rule, which needs the cases, is tested in test_significance.py).
TOLERANCE = RunConfig().updated({"evaluation.gate_test": "tolerance"})
SETTINGS = {"max_new_tokens": 256, "temperature": 0.0, "system_prompt": "You are Eden.", "validation": None, "replay": None}


def result(name: str, *, persona=1.0, mixing=0.0, ppl_val=10.0, ppl_replay=8.0, latency=1.0, failing=(),
           suite_sha256=SUITE_SHA, settings=SETTINGS, case_ids=(), answer="Paris.") -> EvalResult:
    """An EvalResult without any model: metrics and cases as given."""
    metrics = {"language_mixing": mixing, "persona_adherence": persona, "code_pass_rate": 0.5, "keyword_hit_rate": 0.8,
               "behavior_pass_rate": 0.7, "case_pass_rate": 0.6, "perplexity_validation": ppl_val,
               "perplexity_replay": ppl_replay, "latency_median_s": latency, "latency_p95_s": 2 * latency,
               "tokens_per_second": 20.0}
    cases = [CaseResult(id=i, category="coding", question="q", answer="나는 ChatGPT야", seconds=1.0,
                        failures=["persona: claims another identity"]) for i in failing]
    cases.append(CaseResult(id="ok", category="general", question="q", answer=answer, seconds=1.0))
    cases += [CaseResult(id=i, category="general", question="q", answer="a", seconds=1.0) for i in case_ids]
    by_category = {"coding": {"case_pass_rate": 0.5, "persona_adherence": persona}, "general": {"case_pass_rate": 1.0}}
    return EvalResult(model=name, suite="default", suite_sha256=suite_sha256, settings=settings, created="now",
                      metrics=metrics, by_category=by_category, by_language={"ko": {"language_consistency": 1 - mixing}},
                      cases=cases)


@pytest.mark.parametrize("key, base, cand, expected", [
    ("persona_adherence", 0.80, 0.90, "better"),
    ("persona_adherence", 0.80, 0.79, "same"),     # within tolerance 0.02
    ("persona_adherence", 0.80, 0.70, "worse"),
    ("language_mixing", 0.10, 0.02, "better"),     # lower is better
    ("language_mixing", 0.02, 0.10, "worse"),
    ("perplexity_validation", 10.0, 9.0, "better"),  # relative change
    ("perplexity_validation", 10.0, 10.1, "same"),
    ("forgetting", 0.0, 0.15, "worse"),            # above max_forgetting 0.10
    ("forgetting", 0.0, 0.05, "same"),
    ("latency_median_s", 1.0, 1.1, "same"),        # timing: 25 % band
    ("latency_median_s", 1.0, 2.0, "worse"),
    ("code_pass_rate", None, None, "n/a"),          # measured by neither: the suite has no such case
    ("code_pass_rate", None, 0.5, "invalid"),       # one side only: not comparable, never a pass
    ("persona_adherence", float("nan"), 0.9, "invalid"),
    ("perplexity_validation", 10.0, float("inf"), "invalid"),
])
def test_verdict(key, base, cand, expected):
    assert verdict(SPEC[key], base, cand, tolerance=0.02, max_forgetting=0.10) == expected


def test_ship_when_nothing_is_worse():
    c = compare(result("base"), result("cand", persona=1.0, ppl_val=9.0, latency=3.0), RunConfig())
    assert c.ship and not c.reasons
    assert c.row("perplexity_validation").verdict == "better"
    assert c.row("latency_median_s").verdict == "worse" and not c.row("latency_median_s").gating


def test_never_ship_when_a_metric_is_worse():
    c = compare(result("base"), result("cand", persona=0.5, ppl_val=5.0), TOLERANCE)
    assert not c.ship and any("Persona adherence" in r for r in c.reasons)
    c = compare(result("base"), result("cand", ppl_replay=10.0), TOLERANCE)  # +25 % replay perplexity
    assert not c.ship and c.row("forgetting").candidate == pytest.approx(0.25)
    assert c.by_category["coding"][[r.key for r in c.by_category["coding"]].index("persona_adherence")].verdict == "same"


def test_reports(tmp_path):
    curves = tmp_path / "metrics.jsonl"
    curves.write_text("\n".join([
        json.dumps({"step": 10, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": 1.5}),
        "not json", "",
        json.dumps({"step": 20, "loss": 1.5, "eval_loss": 1.7, "learning_rate": 2e-4}),
        json.dumps({"global_step": 30, "loss": float("nan")}).replace("NaN", "NaN"),
        json.dumps([1, 2]),
        json.dumps({"event": "final_eval", "step": 20, "eval_loss": 1.65}),  # the best, re-scored: not a curve point
    ]))
    assert read_training_curves(curves) == {"loss": [[10, 2.0], [20, 1.5]], "learning_rate": [[10, 1e-4], [20, 2e-4]],
                                            "grad_norm": [[10, 1.5]], "eval_loss": [[20, 1.7]]}
    base, cand = result("base"), result("cand", persona=0.5, failing=["bad-case"])
    c = compare(base, cand, TOLERANCE, curves)
    paths = write_reports(c, tmp_path / "out", base=base, candidate=cand)
    assert paths == {"json": tmp_path / "out" / "comparison.json", "markdown": tmp_path / "out" / "report.md",
                     "html": tmp_path / "out" / "report.html"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| Persona adherence | 100.0% | 50.0% | ▼ worse |" in md
    assert "### coding" in md and "**bad-case** (coding)" in md and "Ship: no" in md
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # curves, quality, perplexity, timing
    assert "bad-case" in page and "<script" not in page
    summary = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert summary["ship"] is False and summary["metrics"]["persona_adherence"]["verdict"] == "worse"
    assert summary["failing"] == {"base": [], "candidate": ["bad-case"]}
    assert rich_table(c).row_count == len(METRICS)


def test_results_round_trip(tmp_path):
    r = result("base", failing=["x"])
    r.save(tmp_path / "r.json")
    assert EvalResult.load(tmp_path / "r.json") == r


# -- the gate cannot be fooled ----------------------------------------------------------------
def strict_json(path):
    """json.loads that refuses NaN / Infinity, as every strict parser does."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_different_suites_never_ship():
    base, cand = result("base"), result("cand", ppl_val=5.0, suite_sha256=hashlib.sha256(b"another").hexdigest())
    c = compare(base, cand, RunConfig())
    assert not c.ship and c.suite_sha256 is None
    assert any(r.startswith("different test suites") for r in c.reasons), c.reasons
    assert comparability(base, cand) and not comparability(base, result("cand2", ppl_val=5.0))


def test_31_cases_against_2_never_ship():
    base = result("base", case_ids=[f"case-{i}" for i in range(30)])  # 31 with "ok"
    cand = result("cand", ppl_val=5.0, case_ids=["case-0"])             # 2
    c = compare(base, cand, RunConfig())
    assert not c.ship
    (reason,) = [r for r in c.reasons if r.startswith("different cases")]
    assert "base answered 31, fine-tuned 2" in reason and "only in base: case-1" in reason
    # a file whose metrics claim other cases than it holds is refused too
    doctored = result("cand", ppl_val=5.0)
    doctored.metrics["n"] = 31
    assert any("count 31 cases" in r for r in comparability(result("base"), doctored))


def test_different_evaluation_settings_never_ship():
    c = compare(result("base"), result("cand", settings={**SETTINGS, "max_new_tokens": 16}), RunConfig())
    assert not c.ship and "evaluated with different settings: max_new_tokens" in c.reasons


def test_results_before_suite_hashing_load_but_never_ship(tmp_path):
    old = result("base").model_dump(mode="json")
    del old["suite_sha256"], old["settings"]  # what `edentune eval` wrote before hashing
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = EvalResult.load(tmp_path / "old.json")
    assert loaded.suite_sha256 is None
    c = compare(loaded, result("cand", ppl_val=5.0), RunConfig())
    assert not c.ship and c.reasons == [PREDATES_HASHING]
    assert PREDATES_HASHING == "results predate suite hashing; re-run eval"


def test_nan_metric_never_ships_and_json_stays_strict(tmp_path):
    base, cand = result("base"), result("cand", persona=float("nan"), ppl_val=5.0)
    c = compare(base, cand, RunConfig())
    assert not c.ship and c.row("persona_adherence").verdict == "invalid"
    assert any(r.startswith("Persona adherence: not a finite number") for r in c.reasons), c.reasons
    write_reports(c, tmp_path, base=base, candidate=cand)
    summary = strict_json(tmp_path / "comparison.json")
    assert summary["ship"] is False
    assert summary["metrics"]["persona_adherence"] == {"base": 1.0, "candidate": None, "verdict": "invalid", "gating": True}
    assert summary["by_category"]["coding"]["persona_adherence"]["candidate"] is None
    assert "NaN" not in (tmp_path / "comparison.json").read_text()


@pytest.mark.parametrize("base_kw, cand_kw, reason", [
    ({}, {"ppl_val": None}, "Perplexity (validation): measured for the base model only"),
    ({"ppl_replay": float("nan")}, {}, "Forgetting (replay perplexity increase) cannot be computed: not a finite number"),
    ({}, {"ppl_replay": None}, "Forgetting (replay perplexity increase) cannot be computed: measured for the base model only"),
])
def test_missing_or_non_finite_gating_metric_never_ships(base_kw, cand_kw, reason):
    c = compare(result("base", **base_kw), result("cand", **cand_kw), RunConfig())
    assert not c.ship and any(r.startswith(reason) for r in c.reasons), c.reasons


def test_hashes_and_paths_recorded(tmp_path):
    from edentune.evaluate.suite import load_suite

    sha = load_suite("default").sha256
    base, cand = result("base", suite_sha256=sha), result("cand", suite_sha256=sha, ppl_val=9.0)
    base.save(tmp_path / "base.json")
    cand.save(tmp_path / "cand.json")
    loaded_base, loaded_cand = EvalResult.load(tmp_path / "base.json"), EvalResult.load(tmp_path / "cand.json")
    c = compare(loaded_base, loaded_cand, RunConfig())
    assert c.ship, c.reasons
    digest = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("base.json", "cand.json")}
    assert (c.base_results_sha256, c.candidate_results_sha256) == (digest["base.json"], digest["cand.json"])
    assert (c.base_results_path, c.candidate_results_path) == (str(tmp_path / "base.json"), str(tmp_path / "cand.json"))
    assert c.suite_sha256 == sha and c.settings == SETTINGS
    assert compare(base, cand, RunConfig()).base_results_sha256 == digest["base.json"]  # save() records its file too
    in_memory = compare(result("base"), result("cand"), RunConfig())
    assert in_memory.base_results_sha256 is None and in_memory.base_results_path is None
    write_reports(c, tmp_path / "report")
    summary = strict_json(tmp_path / "report" / "comparison.json")
    assert summary["suite_sha256"] == sha
    assert summary["base_results_sha256"] == digest["base.json"] and summary["candidate_results_sha256"] == digest["cand.json"]
    assert summary["base_results_path"] == str(tmp_path / "base.json")
    assert summary["candidate_results_path"] == str(tmp_path / "cand.json")


def test_compare_writes_nothing(tmp_path, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    result("base").save(inputs / "base.json")
    result("cand").save(inputs / "cand.json")
    (inputs / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    c = compare(EvalResult.load(inputs / "base.json"), EvalResult.load(inputs / "cand.json"), RunConfig(), inputs / "metrics.jsonl")
    assert c.curves == {"loss": [[1.0, 2.0]]}
    assert list(work.iterdir()) == [] and {p.name: p.read_bytes() for p in inputs.iterdir()} == before


def test_reports_never_overwrite_the_results_compared(tmp_path):
    result("base").save(tmp_path / "comparison.json")  # a results file unluckily named like the report
    result("cand").save(tmp_path / "cand.json")
    c = compare(EvalResult.load(tmp_path / "comparison.json"), EvalResult.load(tmp_path / "cand.json"), RunConfig())
    before = (tmp_path / "comparison.json").read_bytes()
    with pytest.raises(EdentuneError, match="is the input .*comparison.json: writing it would destroy the input"):
        write_reports(c, tmp_path)
    assert (tmp_path / "comparison.json").read_bytes() == before and not (tmp_path / "report.md").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(EdentuneError, match="a-file is a file, not a directory"):
        write_reports(c, tmp_path / "a-file")


def test_reports_never_overwrite_a_hard_linked_results_file(tmp_path):
    result("base").save(tmp_path / "base.json")
    result("cand").save(tmp_path / "cand.json")
    c = compare(EvalResult.load(tmp_path / "base.json"), EvalResult.load(tmp_path / "cand.json"), RunConfig())
    out = tmp_path / "out"
    out.mkdir()
    os.link(tmp_path / "cand.json", out / "comparison.json")  # the same file under the report's name
    with pytest.raises(EdentuneError, match="writing it would destroy the input"):
        write_reports(c, out)
    assert not (out / "report.md").exists()


def test_reports_are_written_all_or_none(tmp_path):
    base, cand = result("base"), result("cand")
    c = compare(base, cand, RunConfig())
    (tmp_path / "comparison.json").write_text("previous report\n")
    (tmp_path / "report.html").mkdir()  # the last report cannot be written: nothing may be
    with pytest.raises(EdentuneError, match="report.html is a directory"):
        write_reports(c, tmp_path, base=base, candidate=cand)
    assert (tmp_path / "comparison.json").read_text() == "previous report\n"
    assert not (tmp_path / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.json", "report.html"]  # no temporary files left


def test_missing_metrics_jsonl_is_a_clear_error(tmp_path):
    with pytest.raises(EdentuneError, match="cannot read the training metrics"):
        compare(result("base"), result("cand"), RunConfig(), tmp_path / "no-such-metrics.jsonl")


# -- the report: both answers side by side, a table per category ------------------------------
def test_report_shows_both_answers_side_by_side_per_category(tmp_path):
    base = result("base", answer="BASE says <b>Paris</b> | maybe")
    cand = result("cand", answer="CAND says Paris.", failing=["bad-case"])
    base.cases[0].language_ok, base.cases[0].expected_language, base.cases[0].detected_language = True, "en", "en"
    cand.cases[-1].keywords_ok, cand.cases[-1].keywords_missing = False, ["Lyon"]
    cand.cases[-1].failures = ["keywords (any): missing Lyon"]
    c = compare(base, cand, RunConfig())
    write_reports(c, tmp_path, base=base, candidate=cand)
    page = (tmp_path / "report.html").read_text()
    general = page[page.index("<h3>general</h3>"):]
    row = re.search(r"<tr><td><b>ok</b>.*?</tr>", general, re.S).group(0)
    assert row.index("BASE says &lt;b&gt;Paris&lt;/b&gt; | maybe") < row.index("CAND says Paris.")  # base | fine-tuned
    assert "✓ language: expected en, got en" in row and "✗ keywords: missing Lyon" in row
    assert "<b" + ">Paris" not in row.replace("<b>ok</b>", "")  # model output is escaped, never markup
    coding = page[page.index("<h3>coding</h3>"):page.index("<h3>general</h3>")]
    assert "<th>Base</th><th>Fine-tuned</th>" in coding and "<b>bad-case</b>" in coding and "<i>not answered</i>" in coding
    assert "<table class=cases>" in coding and "Persona adherence" in coding  # the category's case table and metrics
    md = (tmp_path / "report.md").read_text()
    md_row = next(line for line in md.splitlines() if line.startswith("| **ok**"))
    cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", md_row)[1:-1]]
    assert len(cells) == 3 and cells[1].startswith("BASE says &lt;b&gt;Paris&lt;/b&gt; \\| maybe") and cells[2].startswith("CAND says")
    assert "✗ keywords: missing Lyon" in cells[2]
    assert md.index("### coding") < md.index("| **bad-case**") < md.index("### general") < md.index("| **ok**")


def test_report_keeps_the_loss_curve_with_its_numbers(tmp_path):
    curves = tmp_path / "metrics.jsonl"
    curves.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.25, "eval_loss": 1.5},
                                                        {"step": 3, "loss": 1.75}]))
    c = compare(result("base"), result("cand"), RunConfig(), curves)
    write_reports(c, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    side = re.search(r"<h2>Training curves</h2><div class=side><img [^>]+><table>(.*?)</table></div>", page, re.S)
    assert side and "<td>loss</td><td class=num>2.5 (step 1)</td><td class=num>1.75 (step 3)</td><td class=num>1.25 (step 2)</td>" in side.group(1)
    assert "| loss | 2.5 (step 1) | 1.75 (step 3) | 1.25 (step 2) |" in (tmp_path / "out" / "report.md").read_text()


# -- the commands -------------------------------------------------------------------------------
def test_eval_and_compare_help(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edentune.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in ("eval", "compare"):
        r = runner.invoke(app, [command, "--help"])
        assert r.exit_code == 0 and "http://host:port/v1#model" in r.output, r.output
    r = runner.invoke(app, ["eval"])  # no model: usage error, no evaluation into the current folder
    assert r.exit_code == 2 and "Missing option '--model'" in r.output and list(tmp_path.iterdir()) == []


def run_cli(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edentune.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_compare_command_refuses_what_it_cannot_compare(tmp_path):
    result("base", case_ids=[f"case-{i}" for i in range(30)]).save(tmp_path / "base.json")
    result("cand", case_ids=["case-0"]).save(tmp_path / "cand.json")
    r = run_cli("compare", "--base", "base.json", "--candidate", "cand.json", "--out-dir", "report", "--gate", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "cannot compare base.json with cand.json: different cases: base answered 31, fine-tuned 2" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr and not (tmp_path / "report").exists()


def test_compare_command_gate(tmp_path):
    from typer.testing import CliRunner

    from edentune.cli import app

    old = result("base").model_dump(mode="json")
    del old["suite_sha256"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    result("base").save(tmp_path / "base.json")
    result("cand", ppl_val=9.0).save(tmp_path / "cand.json")
    runner = CliRunner()
    r = runner.invoke(app, ["compare", "--base", str(tmp_path / "old.json"), "--candidate", str(tmp_path / "cand.json"),
                            "--out-dir", str(tmp_path / "old-report"), "--gate"])
    assert r.exit_code == 1 and strict_json(tmp_path / "old-report" / "comparison.json")["reasons"] == [PREDATES_HASHING]
    r = runner.invoke(app, ["compare", "--base", str(tmp_path / "base.json"), "--candidate", str(tmp_path / "cand.json"),
                            "--out-dir", str(tmp_path / "report"), "--gate"])
    assert r.exit_code == 0, r.output
    summary = strict_json(tmp_path / "report" / "comparison.json")
    assert summary["ship"] is True
    assert summary["candidate_results_sha256"] == hashlib.sha256((tmp_path / "cand.json").read_bytes()).hexdigest()
    cases = re.search(r"<table class=cases>.*?</table>", (tmp_path / "report" / "report.html").read_text(), re.S).group(0)
    assert cases.count("<pre>Paris.</pre>") == 2  # the CLI passes both results: both answers shown
