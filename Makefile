# prefbench — every target sets itself up on a fresh clone (see `setup`).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
SUITE ?= default
STAMP := $(VENV)/.setup-stamp
ARGS  ?=

.PHONY: help setup bench bench-gpu bench-multi test lint check baseline report clean-cache perf-dpo perf
help:
	@echo "make bench [SUITE=default|smoke|small|paper-*]  run a suite end to end (set-up on first use)"
	@echo "make test                         run the test suite (set-up on first use)"
	@echo "make check                        smoke suite + regression gate vs results/baseline/"
	@echo "make baseline                     refresh this machine kind's results/baseline/smoke/<kind>.json"
	@echo "make report [SUITE=...]           HTML report + figures of the last run"
	@echo "make perf-dpo                     DPO speed benchmark vs TRL"
	@echo "make perf [ARGS=...]              every training/sampling phase vs its floor + the DPO-vs-TRL benchmark"
	@echo "make bench-multi [ACCEL=ddp]      a suite under accelerate launch (benchmarks/configs/accelerate/)"
	@echo "make lint                         ruff"

# Set-up runs only when pyproject.toml changed or the venv is missing (a stamp file).
setup: $(STAMP)
$(STAMP): pyproject.toml .ci/setup.sh
	bash .ci/setup.sh $(VENV)
	@touch $(STAMP)

bench: $(STAMP)
	$(PY) -m benchmarks run --suite $(SUITE) $(ARGS)
	$(PY) -m benchmarks report --suite $(SUITE)

# The smoke suite in bf16 on CUDA (needs a GPU; per-stage CUDA peak memory lands in stages.json)
bench-gpu: $(STAMP)
	$(PY) -m benchmarks run --suite smoke --set device=cuda --set dtype=bfloat16 --set runs_dir=results/runs-gpu --set cache_dir=results/cache-gpu
	$(PY) -m benchmarks report --run results/runs-gpu/smoke

# A suite under accelerate launch: ACCEL = ddp | fsdp | zero2 | zero3 | cpu2 (benchmarks/configs/accelerate/)
ACCEL ?= ddp
bench-multi: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/accelerate launch --config_file benchmarks/configs/accelerate/$(ACCEL).yaml -m benchmarks.cli run --suite $(SUITE) $(ARGS)
	$(PY) -m benchmarks report --suite $(SUITE)

# HTML report + paper figures of the last run of SUITE
report: $(STAMP)
	$(PY) -m benchmarks report --suite $(SUITE)

# Regression gate: the smoke suite's metrics over its seeds (and the ours/TRL step-time ratio) against the
# baseline of this machine's kind, results/baseline/smoke/<kind>.json (another kind's, with wider bands, if none)
check: $(STAMP)
	$(PY) -m benchmarks run --suite smoke
	$(PY) -m benchmarks.perf.dpo_vs_trl --variants trl,ours --repeats 3 --out results/perf/dpo_vs_trl.json
	$(PY) -m benchmarks check --run results/runs/smoke --baseline results/baseline --perf results/perf/dpo_vs_trl.json --require-claims dpo_sanity,bon_kl_bound

# Refresh this machine kind's baseline deliberately: writes results/baseline/smoke/<kind>.json (then commit it)
baseline: $(STAMP)
	$(PY) -m benchmarks run --suite smoke
	$(PY) -m benchmarks.perf.dpo_vs_trl --variants trl,ours --repeats 3 --out results/perf/dpo_vs_trl.json
	$(PY) -m benchmarks baseline --run results/runs/smoke --baseline results/baseline --perf results/perf/dpo_vs_trl.json

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

# Every training/sampling phase (DPO step and reference, PPO generation / forwards / update, RM step, evaluation
# sampling) against its floor (a bare forward+backward or model.generate on the same tokens), then the DPO-vs-TRL
# benchmark, at fp32 and bf16 autocast and at 1 and 2 threads (PERF_GRID; PERF_GRID= for one cell). ARGS go to
# the phases benchmark (e.g. ARGS="--phases dpo,eval --repeats 1"), DPO_ARGS to dpo_vs_trl.
# Ratios are measured interleaved; a busy machine still makes them noisy.
DPO_ARGS ?=
PERF_GRID ?= --dtypes float32,bfloat16 --thread-counts 1,2
perf: $(STAMP)
	$(PY) -m benchmarks.perf.phases --out results/perf/phases.json $(PERF_GRID) $(ARGS)
	$(PY) -m benchmarks.perf.dpo_vs_trl --out results/perf/dpo_vs_trl.json $(DPO_ARGS)
