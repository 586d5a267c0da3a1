# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit integration lint typecheck bench clean dashboard

install: $(STAMP)

$(STAMP): libs/common/pyproject.toml services/*/pyproject.toml tools/registrations/pyproject.toml requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e libs/common -e services/submitter -e services/poller \
		-e services/legacy-sim -e tools/registrations -r requirements-dev.txt
	@touch $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

# Most tests wait on latencies: three at a time (docs/testing.md).
test: install lint typecheck
	$(BIN)/python -m pytest -q -n 3 --dist loadgroup --durations=15 tests

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install
	$(BIN)/python -m pytest -q tests/integration

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy libs/common/src services/submitter/src services/poller/src services/legacy-sim/src
	$(BIN)/mypy tools/registrations/src

# N registrations in one burst (default 2000), pipeline and baseline side by side.
bench: install
	$(BIN)/python bench/run.py $(if $(N),--n $(N))

# docs/dashboard.png: the Grafana dashboard's panels drawn from a live run (Grafana need not run).
dashboard: install
	$(BIN)/python scripts/dashboard_preview.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
