# `make train` and `make test` work on a fresh machine with Python 3.11 and make:
# they create .venv when it is missing, install the package, then run.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: train test install clean describe bench

$(STAMP): setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m src.train phase=3 $(ARGS)

# two pytest workers (pytest-xdist), one test file per worker at a time: most of a test's
# time is single-threaded graph tracing, so two cores run the suite in about half the time
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=30 $(ARGS)

describe: $(STAMP)
	$(PY) -m src.data.describe $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

clean:
	rm -rf outputs multirun .pytest_cache
