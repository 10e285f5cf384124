"""`evaluate(cfg, backend, suite)`: generate every answer, run every check, aggregate metrics.

Metrics (rates in 0..1, None when no case measures them):

| key                       | meaning                                                              |
|---------------------------|----------------------------------------------------------------------|
| `language_consistency`    | answers in the expected language (per language in `by_language`)     |
| `language_mixing`         | 1 - consistency: wrong language or mixed                             |
| `persona_adherence`       | answers passing every persona rule                                   |
| `code_pass_rate`          | cases that ask for running code (`provides_running_code`) whose answer's Python runs in the sandbox (no code: a fail); None (n/a) without such cases or when no code was run (no sandbox) |
| `keyword_hit_rate`        | keyword cases passing their any/all rule                             |
| `keyword_recall`          | mean share of a case's keywords found                                |
| `behavior_pass_rate`      | cases passing their named behaviour                                  |
| `case_pass_rate`          | cases passing all their checks                                       |
| `perplexity_validation`   | assistant-token perplexity of the validation split (local models)    |
| `perplexity_replay`       | the same on the general-knowledge replay set (forgetting measure)    |
| `latency_median_s`, `latency_p95_s`, `tokens_per_second` | response time per answer    |
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, PrivateAttr

from edentune.config import RunConfig
from edentune.data.eden_layout import request_layout
from edentune.errors import EdentuneError
from edentune.io import atomic_open

from .backends import Backend, Generation
from .checks import AnswerContext, check_behavior, keyword_hits, language_ok, run_answer_code
from .persona import check_persona
from .sandbox import Limits, check_run_code
from .suite import Case, Suite, canonical_sha256

BUNDLED_REPLAY = Path(__file__).resolve().parents[1] / "data" / "sample" / "replay.jsonl"


class CaseResult(BaseModel):
    id: str
    category: str
    question: str
    answer: str
    seconds: float
    completion_tokens: int | None = None
    expected_language: str | None = None
    detected_language: str | None = None
    language_ok: bool | None = None
    keywords_found: list[str] = []
    keywords_missing: list[str] = []
    keywords_ok: bool | None = None
    code_status: str | None = None  # pass | fail | timeout | blocked | not_run (no sandbox), None without Python
    code_error: str = ""
    behavior: str | None = None
    behavior_ok: bool | None = None
    persona_ok: bool = True
    failures: list[str] = []

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def keyword_recall(self) -> float | None:
        total = len(self.keywords_found) + len(self.keywords_missing)
        return len(self.keywords_found) / total if total else None


class EvalResult(BaseModel):
    model: str
    suite: str
    # Content hash of the cases answered (`Suite.sha256`); None in files written before it existed,
    # which `compare` never ships.
    suite_sha256: str | None = None
    # Everything besides the suite that changes the scores (see `evaluation_settings`): two results
    # are compared only when these match.
    settings: dict[str, Any] = {}
    adapter_sha256: str | None = None  # weights of the PEFT adapter scored (local backend), for the deploy gate
    # What scored the answers (gguf | transformers-<dtype> | transformers-nf4 | http; None in older
    # files) and the sha256 of the served files it ran on (gguf: base_gguf, adapter_gguf), so that
    # `compare` sets only like against like and `deploy --gate` can check the deployed files.
    backend: str | None = None
    artifacts: dict[str, str] = {}
    created: str
    metrics: dict[str, float | None]
    by_category: dict[str, dict[str, float | None]]
    by_language: dict[str, dict[str, float | None]]
    cases: list[CaseResult]
    # "validation" / "replay" -> [summed NLL, scored tokens] per conversation, for the paired loss
    # comparison (`significance.paired_loss`); empty in files written before it existed.
    perplexity_terms: dict[str, list[list[float]]] = {}
    # The file this result was read from / written to and its sha256, recorded by `compare` so that
    # `deploy --gate` can check the comparison is about these very files.
    _path: str | None = PrivateAttr(None)
    _sha256: str | None = PrivateAttr(None)

    @property
    def results_path(self) -> str | None:
        return self._path

    @property
    def results_sha256(self) -> str | None:
        return self._sha256

    def save(self, path: str | Path) -> None:
        # Kept as Python writes it (a non-finite metric stays NaN): `compare` must tell it from "not measured".
        data = (json.dumps(self.model_dump(mode="json"), ensure_ascii=False, indent=2) + "\n").encode("utf-8")
        with atomic_open(path, "wb") as fh:
            fh.write(data)
        self._path, self._sha256 = str(Path(path).resolve()), hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        try:
            data = Path(path).read_bytes()  # hashed and parsed from the same bytes
            result = cls.model_validate(json.loads(data.decode("utf-8")))
        except (OSError, ValueError, RecursionError) as err:
            first = (str(err) or type(err).__name__).splitlines()[0]
            raise EdentuneError(f"{path}: not an `edentune eval` results file ({first})") from None
        result._path, result._sha256 = str(Path(path).resolve()), hashlib.sha256(data).hexdigest()
        return result


def scoring_differences(base: EvalResult, cand: EvalResult, allow_different_backends: bool = False) -> list[str]:
    """Why two results were not scored the same way: another backend, or another base GGUF file
    (the adapter differs by design). Allowed on request only when both sides record what they ran on."""
    problems = []
    b, c = base.artifacts.get("base_gguf"), cand.artifacts.get("base_gguf")
    if base.backend != cand.backend:
        problems.append(f"scored on different backends: base {base.backend or 'not recorded'}, "
                        f"fine-tuned {cand.backend or 'not recorded'}")
    elif base.backend == "gguf" and b != c:
        problems.append(f"scored on different base GGUF files: base {(b or 'not recorded')[:12]}, fine-tuned {(c or 'not recorded')[:12]}")
    recorded = all(r.backend is not None and (r.backend != "gguf" or r.artifacts.get("base_gguf")) for r in (base, cand))
    if problems and allow_different_backends and recorded:
        return []
    if problems and allow_different_backends:
        problems.append("--allow-different-backends needs both results to record their backend and files: re-run eval")
    return problems


def evaluation_settings(cfg: RunConfig, backend: Backend, validation: list | None, replay: list | None) -> dict[str, Any]:
    """The inputs besides the suite that change scores: generation length and sampling, the system
    prompt, the persona rules, the language threshold, and the perplexity sets (by content hash)."""
    def conversations(convs: list | None) -> dict | None:
        # By messages, not by `source` (file:line): the same conversations read from another path match.
        return {"n": len(convs), "sha256": canonical_sha256([getattr(c, "messages", c) for c in convs])} if convs else None

    layout = {} if cfg.export.request_format == "chat" else {  # chat: the settings of older results, unchanged
        "request_format": cfg.export.request_format, "app_system_text": request_layout(cfg.export).app_text}
    return layout | {
        "max_new_tokens": cfg.evaluation.max_new_tokens,
        "temperature": getattr(backend, "temperature", None),
        "system_prompt": cfg.model.system_prompt,
        "persona": cfg.persona.model_dump(mode="json"),
        "korean_hangul_threshold": cfg.evaluation.korean_hangul_threshold,
        "validation": conversations(validation),
        "replay": conversations(replay),
    }


def check_answer(case: Case, gen: Generation, cfg: RunConfig, limits: Limits = Limits()) -> CaseResult:
    """Every check that applies to one answer; `failures` says why it did not pass."""
    ev, persona, answer = cfg.evaluation, cfg.persona, gen.text
    r = CaseResult(id=case.id, category=case.category, question=case.question, answer=answer,
                   seconds=round(gen.seconds, 4), completion_tokens=gen.completion_tokens)
    if case.expected_language:
        r.expected_language = case.expected_language
        r.language_ok, r.detected_language = language_ok(answer, case.expected_language, ev.korean_hangul_threshold)
        if r.language_ok is False:
            r.failures.append(f"language: expected {case.expected_language}, got {r.detected_language}")
    if case.expected_keywords:
        kw = keyword_hits(answer, case.expected_keywords.words, case.expected_keywords.mode)
        r.keywords_found, r.keywords_missing, r.keywords_ok = kw.found, kw.missing, kw.passed
        if not kw.passed:
            r.failures.append(f"keywords ({case.expected_keywords.mode}): missing {', '.join(kw.missing)}")
    code = run_answer_code(answer, limits, ev.run_code)
    if code:
        r.code_status, r.code_error = code.status, code.error
        if code.status not in ("pass", "not_run"):
            r.failures.append(f"code {code.status}: {code.error}")
    if case.expected_behavior:
        names = tuple(n for n in (persona.name, persona.korean_name) if n)
        r.behavior = case.expected_behavior
        r.behavior_ok, reason = check_behavior(case.expected_behavior, answer, AnswerContext(names, code))
        already_listed = code is not None and case.expected_behavior == "provides_running_code"  # the code failure
        if r.behavior_ok is False and not already_listed:
            r.failures.append(f"{case.expected_behavior}: {reason}")
    p = check_persona(answer, case.question, persona)
    r.persona_ok = p.passed
    r.failures.extend(f"persona: {reason}" for reason in p.reasons)
    return r


def _rate(flags: list[bool | None]) -> float | None:
    vals = [f for f in flags if f is not None]
    return sum(vals) / len(vals) if vals else None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


# Pass/fail metric -> whether one case passed it (None: the metric does not apply to the case).
# The rates below are the share of passes; `compare` pairs the same flags case by case.
# The cases that ask for running code are the same set for every model answering the suite (an
# answer without code fails). Counting every answer that happens to contain code would compare
# the base and a fine-tuned model over different sets, and a base that never writes code would
# have no rate at all, which the gate must treat as unmeasured (never ship). Code in other
# answers is still run and shown in its case's checks.
PASS_FLAGS: dict[str, Callable[[CaseResult], bool | None]] = {
    "language_consistency": lambda c: c.language_ok,
    "persona_adherence": lambda c: c.persona_ok,
    "code_pass_rate": lambda c: c.code_status == "pass" if c.behavior == "provides_running_code" else None,
    "keyword_hit_rate": lambda c: c.keywords_ok,
    "behavior_pass_rate": lambda c: c.behavior_ok,
    "case_pass_rate": lambda c: c.passed,
}


def case_metrics(cases: list[CaseResult]) -> dict[str, float | None]:
    """Quality metrics of a set of answers (overall, or one category / language)."""
    rates = {key: _rate([flag(c) for c in cases]) for key, flag in PASS_FLAGS.items()}
    consistency = rates["language_consistency"]
    recalls = [c.keyword_recall for c in cases if c.keyword_recall is not None]
    # Code not run (no sandbox) is not measured: a rate over the rest would count only the answers
    # without code, so the metric is n/a rather than 0 or 1.
    code_run = not any(c.code_status == "not_run" for c in cases)
    return {
        "n": len(cases),
        "language_consistency": consistency,
        "language_mixing": None if consistency is None else 1 - consistency,
        "persona_adherence": rates["persona_adherence"],
        "code_pass_rate": rates["code_pass_rate"] if code_run else None,
        "keyword_hit_rate": rates["keyword_hit_rate"],
        "keyword_recall": sum(recalls) / len(recalls) if recalls else None,
        "behavior_pass_rate": rates["behavior_pass_rate"],
        "case_pass_rate": rates["case_pass_rate"],
    }


def timing_metrics(generations: list[Generation], generation_seconds: float) -> dict[str, float | None]:
    """Per-answer latency and overall throughput (tokens / wall time spent generating)."""
    latencies = [g.seconds for g in generations]
    tokens = [g.completion_tokens for g in generations if g.completion_tokens is not None]
    return {
        "latency_median_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": _percentile(latencies, 0.95),
        "tokens_per_second": sum(tokens) / generation_seconds if tokens and generation_seconds > 0 else None,
    }


def perplexity_sets(cfg: RunConfig, validation_files: list[str] | None = None, replay_files: list[str] | None = None,
                    limit: int = 200) -> tuple[list, list]:
    """(validation, replay) conversations for perplexity, at most `limit` each. Validation: the given
    files, else the run's validation split (as training makes it); replay: the given files, else
    `data.replay_files`, else the bundled general-knowledge replay sample."""
    from edentune.data.encode import load_splits, read_conversations

    if validation_files:
        validation = [c for f in validation_files for c in read_conversations(f)]
    else:
        validation = load_splits(cfg.data)[1] if cfg.data.train_files else []
    replay_files = replay_files or cfg.data.replay_files or [str(BUNDLED_REPLAY)]
    replay = [c for f in replay_files for c in read_conversations(f)]
    return validation[:limit], replay[:limit]


def evaluate(cfg: RunConfig, backend: Backend, suite: Suite, *, validation: list | None = None,
             replay: list | None = None, limits: Limits = Limits(),
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Answer every case of `suite` with `backend` and check the answers against `cfg`'s persona and
    thresholds. Perplexity needs a local backend and conversations (see `perplexity_sets`)."""
    check_run_code(cfg.evaluation.run_code)  # run_code: sandbox without one fails now, not after generating
    layout = request_layout(cfg.export)  # eden: each case asked the way the app asks (single-turn /api/generate)
    conversations = [layout.prompt(c.conversation(cfg.model.system_prompt)) for c in suite.cases]
    generations: list[Generation] = []
    seconds = 0.0
    step = getattr(backend, "batch_size", 1)
    for i in range(0, len(conversations), step):
        batch = backend.generate(conversations[i: i + step], cfg.evaluation.max_new_tokens)
        generations.extend(batch)
        seconds += max((g.seconds for g in batch), default=0.0)  # answers of one batch share its time
        if progress:
            progress(len(generations), len(conversations))
    results = [check_answer(c, g, cfg, limits) for c, g in zip(suite.cases, generations)]

    metrics = {**case_metrics(results), **timing_metrics(generations, seconds)}
    from .perplexity import perplexity_of

    terms_of, perplexity = getattr(backend, "perplexity_terms", None), getattr(backend, "perplexity", None)
    ppl_terms: dict[str, list[list[float]]] = {}
    for name, convs in (("validation", validation), ("replay", replay)):
        convs = layout.conversations(convs) if convs else convs
        if convs and terms_of:
            ppl_terms[name] = terms_of(convs, cfg.model.system_prompt)
            metrics[f"perplexity_{name}"] = perplexity_of(ppl_terms[name])
        else:
            metrics[f"perplexity_{name}"] = perplexity(convs, cfg.model.system_prompt) if convs and perplexity else None

    by_category = {cat: case_metrics([r for r in results if r.category == cat]) for cat in suite.categories}
    languages = sorted({r.expected_language for r in results if r.expected_language})
    by_language = {lang: case_metrics([r for r in results if r.expected_language == lang]) for lang in languages}
    return EvalResult(model=backend.name, adapter_sha256=getattr(backend, "adapter_sha256", None), suite=suite.path,
                      backend=getattr(backend, "backend", None), artifacts=getattr(backend, "artifacts", None) or {},
                      suite_sha256=suite.sha256, settings=evaluation_settings(cfg, backend, validation, replay),
                      created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      metrics=metrics, by_category=by_category, by_language=by_language, cases=results,
                      perplexity_terms=ppl_terms)
