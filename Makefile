# Two entry points do all set-up: `make demo` and `make test`.
# Both create or update the virtual environment in $(VENV) first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first and pinned, so that the project's
# torch range is already satisfied and pip never pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dialogrl models fetch smollm2-135m-instruct
	$(BIN)/dialogrl pipeline --config recipes/smollm2-135m/pipeline-quick.yaml

test: $(STAMP)
	$(BIN)/ruff check data evaluation training tests
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check data evaluation training tests
	$(BIN)/ruff format --check data evaluation training tests

clean-venv:
	rm -rf $(VENV)
