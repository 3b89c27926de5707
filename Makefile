# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install demo test lint e2e clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install  ## the main job on embedded defaults: API + worker + mock upstream, sample jobs, answers
	cd $(CURDIR) && $(BIN)/pcq standalone --demo

test: install  ## every test; the real-service ones need PostgreSQL and Redis on 127.0.0.1
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) pcq.sqlite3* pcq-broker.sqlite3*
