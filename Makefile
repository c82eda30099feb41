# prefbench — every target sets itself up on a fresh clone (see `setup`).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
SUITE ?= default
STAMP := $(VENV)/.setup-stamp
ARGS  ?=

.PHONY: help setup bench test lint check clean-cache perf-dpo
help:
	@echo "make bench [SUITE=default|smoke]  run a suite end to end (set-up on first use)"
	@echo "make test                         run the test suite (set-up on first use)"
	@echo "make lint                         ruff"

# Set-up runs only when pyproject.toml changed or the venv is missing (a stamp file).
setup: $(STAMP)
$(STAMP): pyproject.toml .ci/setup.sh
	bash .ci/setup.sh $(VENV)
	@touch $(STAMP)

bench: $(STAMP)
	$(PY) -m benchmarks run --suite $(SUITE) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check methods benchmarks tests

clean-cache:
	rm -rf results/cache results/runs

# DPO speed benchmark vs TRL 1.16 (fresh process per variant, interleaved repeats, medians). Run it on a
# quiet machine: a second busy process on 2 cores skews timings 2-25x.
perf-dpo: $(STAMP)
	$(PY) -m benchmarks.perf.dpo_vs_trl $(ARGS)
