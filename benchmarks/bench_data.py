"""Benchmark the data pipeline on synthetic conversations.

Generates N varied conversations (Korean, English and mixed; coding, general and Korean topics;
about 3% exact and 3% near duplicates; about 1% with planted secrets or personal data; about 1%
malformed lines), then times validate+clean and stats with the embedded model's real tokenizer.

    python benchmarks/bench_data.py --n 100000 --out bench_data.json

Targets on 2 CPU cores: validate+clean < 60 s, stats < 120 s.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edentune.data.clean import clean
from edentune.data.stats import stats
from edentune.models import load_tokenizer, resolve_model_dir
from edentune.io import write_json_atomic

EN_WORDS = ("model data token python list function error memory cache server request value string "
            "number file query index graph batch layer weight train test loss speed order table user "
            "answer").split()
KO_WORDS = ("데이터 모델 학습 함수 오류 메모리 서버 요청 값 문자열 파일 질문 답변 사용자 시간 방법 결과 문제 "
            "한국어 문장 표현 날씨 음식 여행 추석 김치 설명 예시 이유").split()
KO_ENDINGS = ("입니다.", "하세요.", "할까요?", "했어요.", "인가요?", "됩니다.")
SECRETS = ("my key is sk-proj-{r}", "email me: user{n}@example.com", "전화 010-{a}-{b}",
           "aws_secret_access_key = {r40}", "주민번호 900101-1234567", "card 4111 1111 1111 1111")


def _sentence(rng: random.Random, ko: bool) -> str:
    if ko:
        words = rng.choices(KO_WORDS, k=rng.randint(4, 9)) + rng.choices(EN_WORDS, k=rng.randint(0, 2))
        return " ".join(words) + f" {rng.randint(0, 9999)}" + rng.choice(KO_ENDINGS)
    return " ".join(rng.choices(EN_WORDS, k=rng.randint(6, 14))).capitalize() + f" {rng.randint(0, 9999)}."


def _turn(rng: random.Random, ko: bool, code: bool) -> str:
    text = " ".join(_sentence(rng, ko) for _ in range(rng.randint(1, 6)))
    if code:
        text += f"\n```python\ndef f{rng.randint(0, 999)}(x):\n    return x * {rng.randint(2, 9)}\n```"
    return text


def conversation(rng: random.Random) -> dict:
    ko, code = rng.random() < 0.5, rng.random() < 0.5
    turns = rng.choice((2, 2, 4, 6))
    msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": _turn(rng, ko, code and i % 2 == 1)}
             for i in range(turns)]
    return {"messages": msgs}


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    recent: list[dict] = []
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            roll = rng.random()
            if roll < 0.03 and recent:
                rec = rng.choice(recent)  # exact duplicate
            elif roll < 0.06 and recent:
                rec = json.loads(json.dumps(rng.choice(recent)))  # near duplicate: one word changed
                words = rec["messages"][-1]["content"].split(" ")
                words[rng.randrange(len(words))] = "changed"
                rec["messages"][-1]["content"] = " ".join(words)
            else:
                rec = conversation(rng)
                if roll < 0.07:
                    secret = rng.choice(SECRETS).format(r="".join(rng.choices("abcdefXYZ0123456789", k=32)),
                                                        r40="".join(rng.choices("abcdefXYZ0123456789/+", k=40)),
                                                        n=i, a=rng.randint(1000, 9999), b=rng.randint(1000, 9999))
                    rec["messages"][-2]["content"] += " " + secret
                recent = (recent + [rec])[-1000:]
            line = json.dumps(rec, ensure_ascii=False)
            fh.write((line[: len(line) // 2] if roll > 0.99 else line) + "\n")  # ~1% truncated lines


def smollm2_tokenizer():
    return load_tokenizer(resolve_model_dir("embedded"))  # converted once, then a cached folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path("bench_data.json"))
    args = ap.parse_args()
    results: dict = {"n": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        raw, cleaned = Path(tmp) / "raw.jsonl", Path(tmp) / "clean.jsonl"
        t = time.perf_counter()
        generate(raw, args.n)
        results["generate_s"] = time.perf_counter() - t

        t = time.perf_counter()
        _, report = clean([raw], write=cleaned, quarantine=Path(tmp) / "q.jsonl")
        results["validate_clean_s"] = time.perf_counter() - t
        results["clean"] = {k: getattr(report, k) for k in ("lines", "kept", "repaired", "quarantined", "blank")}
        results["clean"]["reasons"] = report.reasons

        t = time.perf_counter()
        tokenizer = smollm2_tokenizer()
        results["tokenizer_load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        st = stats([cleaned], tokenizer=tokenizer, max_seq_len=2048)
        results["stats_s"] = time.perf_counter() - t
        results["stats"] = {"conversations": st.conversations,
                            "conversation_tokens": st.tokens["conversation"].model_dump()}

    table = Table(title=f"edentune data pipeline, {args.n:,} conversations")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("target", justify="right")
    for step, target in (("generate_s", ""), ("validate_clean_s", "< 60"),
                         ("tokenizer_load_s", ""), ("stats_s", "< 120")):
        table.add_row(step.removesuffix("_s"), f"{results[step]:.1f}", target)
    Console().print(table)
    Console().print(results["clean"])
    write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
