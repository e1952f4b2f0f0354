# Two commands for a newcomer: `make train` and `make test`. Both create .venv on first use.
# `make bench` reruns the CPU benchmarks behind the README's tables (about 40 minutes on 2 cores).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-fast bench clean

# pyproject.toml says what the code needs (ranges, extras); constraints.txt the exact versions installed.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

# Two test files at a time (pytest-xdist; a file's tests stay together, so its fixtures are built once), then
# the tests that measure wall time alone. The 25 slowest are listed at the end of each part.
test: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadfile -m "not serial" --durations=25 $(ARGS)
	$(PY) -m pytest tests -m serial --durations=5 $(ARGS) || [ $$? -eq 5 ]  # 5: ARGS left no such test

# the unit tests only (no process started, no end-to-end run): under 2 minutes, for every edit
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/matmul_throughput.py
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/cross_entropy.py
	$(PY) benchmarks/newton_schulz.py
	$(PY) benchmarks/tokenize_speed.py
	$(PY) benchmarks/training_speed.py --repeats 3 --steps 8
	$(PY) benchmarks/muon_vs_adamw.py

clean:
	rm -rf runs data_cache
