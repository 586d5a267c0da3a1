# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lock check-locks demo test unit integration lint typecheck bench bench-profiles soak clean dashboard

LOCAL_PACKAGES := libs/common services/submitter services/poller services/legacy-sim tools/registrations

install: $(STAMP)

# Every third-party package comes from the dev lock, checked against its hashes; the local
# packages follow with --no-deps, and --no-build-isolation so that their build backend is the
# locked setuptools too. The stamp depends on the locks: a new lock reinstalls.
$(STAMP): requirements/dev.txt $(LOCAL_PACKAGES:%=%/pyproject.toml)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation $(LOCAL_PACKAGES:%=-e %)
	@touch $(STAMP)

# Resolve the lock files again (requirements/*.txt, services/legacy-sim/requirements.lock) with
# scripts/lock.py and the uv of the dev lock. Run it after changing a dependency in a pyproject.toml
# or a line of requirements-dev.txt (tests/deploy/test_build.py fails until then), and with
# UPGRADE=1 to take the newest versions the ranges allow. `make install` then reinstalls from the
# new dev lock. docs/builds.md has the whole workflow.
lock: install
	$(BIN)/python scripts/lock.py $(if $(UPGRADE),--upgrade)

check-locks: install
	$(BIN)/python scripts/lock.py --check

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

# N registrations in one burst (default 2000), pipeline and baseline side by side; then the
# fixed poll schedule against the adaptive one on each latency profile (bench-profiles).
bench: install
	$(BIN)/python bench/run.py $(if $(N),--n $(N))
	$(BIN)/python bench/profiles.py $(if $(PROFILE_N),--n $(PROFILE_N)) $(if $(PROFILE_WARMUP),--warmup $(PROFILE_WARMUP))

# Fixed against adaptive per latency profile only (bench/README.md#poll-schedules-per-latency-profile):
# PROFILE_N measured registrations per run (400), after PROFILE_WARMUP (200); PROFILES='A;B' to choose.
bench-profiles: install
	$(BIN)/python bench/profiles.py $(if $(PROFILE_N),--n $(PROFILE_N)) $(if $(PROFILE_WARMUP),--warmup $(PROFILE_WARMUP))

# The pipeline at a steady rate for a set time (default 30 minutes at 50 registrations/s),
# sampling RSS, descriptors, threads and queue depths: bench/README.md#soak. DOCS=FILE also
# writes the figures into FILE between its `<!-- soak figures -->` markers.
soak: install
	$(BIN)/python bench/soak.py $(if $(MINUTES),--minutes $(MINUTES)) $(if $(RATE),--rate $(RATE)) \
		$(if $(SAMPLE_S),--sample-s $(SAMPLE_S)) $(if $(DOCS),--docs $(DOCS))

# docs/dashboard.png: the Grafana dashboard's panels drawn from a live run (Grafana need not run).
dashboard: install
	$(BIN)/python scripts/dashboard_preview.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
