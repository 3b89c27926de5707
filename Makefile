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

lint: install  ## ruff, mypy, and the Prometheus config and alert rules (when promtool is installed)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@if command -v promtool >/dev/null; then \
	  promtool check config ops/prometheus/prometheus.yml && \
	  promtool test rules ops/prometheus/alerts.test.yml; \
	else echo "promtool not found: alert rules not checked (Debian: apt-get install prometheus)"; fi

clean:
	rm -rf $(VENV) pcq.sqlite3* pcq-broker.sqlite3*
