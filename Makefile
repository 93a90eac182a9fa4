# prefect-parallel-requests: install, demo, tests and benchmark.
#   make demo    create .venv, start the local test API, run the flow on the example file
#   make test    create .venv and run the whole test suite
#   make bench   the benchmarks (see README, "Benchmark"); the second needs Redis on 127.0.0.1:6379
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m tasks.platform.embedded_prefect_api --prepare
	touch $@

demo: install
	PYTHONPATH=. $(BIN)/python examples/run_demo.py

test: install
	$(BIN)/python -m pytest -q -n 4 --dist worksteal -m "not timing"
	$(BIN)/python -m pytest -q -m timing

bench: install
	PYTHONPATH=. $(BIN)/python bench/benchmark.py
	PYTHONPATH=. $(BIN)/python bench/batch_mode.py
	PYTHONPATH=. $(BIN)/python bench/redis_limiter.py
	PYTHONPATH=. $(BIN)/python bench/limit_dialects.py

clean:
	rm -rf $(VENV) examples/output .pytest_cache
