# dcssdae developer commands. `make install` then `make test` is the whole set-up.
PY      ?= .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

# Runs of the training recipes (override on the command line, e.g. make distill PHASE3_CKPT=...).
RUNS        ?= runs
PHASE3_CKPT ?= $(RUNS)/phase3/checkpoints/last.ckpt

.PHONY: install test test-fast bench bench-quality quickstart distill lint clean

install:
	python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

bench:
	$(PY) benchmarks/bench_networks.py
	$(PY) benchmarks/bench_samplers.py
	$(PY) benchmarks/bench_loader.py

bench-quality:   # EqM vs FM at equal budget on the default photos (~30 min on 2 cores); PNGs in runs/bench_quality
	$(PY) benchmarks/bench_quality.py train --steps 500 --evals 4 --out $(RUNS)/bench_quality
	$(PY) benchmarks/bench_quality.py evaluate --runs $(RUNS)/bench_quality --crops 4 --nfe-crops 1

quickstart:
	$(PY) -m dcssdae.cli fit --config configs/quickstart.yaml

distill:
	$(PY) -m dcssdae.cli fit --config configs/distill.yaml --model.init_from $(PHASE3_CKPT)

lint:
	$(PY) -m ruff check dcssdae tests benchmarks

clean:
	rm -rf .pytest_cache $(RUNS) lightning_logs
