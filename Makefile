# dcssdae developer commands. `make install` then `make test` is the whole set-up.
PY      ?= .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

# Runs of the training recipes (override on the command line, e.g. make distill PHASE3_CKPT=...).
RUNS        ?= runs
PHASE3_CKPT ?= $(RUNS)/phase3/checkpoints/last.ckpt
# more `dcssdae fit` arguments for make distill, e.g. ARGS="--trainer.max_steps 100"
ARGS        ?=

.PHONY: install test test-fast bench bench-quality quickstart cpu-recipe distill rehearsal lint clean

install:
	python3 -m venv .venv && .venv/bin/pip install -q --no-cache-dir -e '.[dev]'

# One BLAS/OpenMP thread per test process: the suite's tensors are tiny and several tests start subprocesses
# (DDP, CLI); two threads each oversubscribe 2 cores.
test:
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast:
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

bench:
	$(PY) benchmarks/bench_networks.py
	$(PY) benchmarks/bench_samplers.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_encode.py
	$(PY) benchmarks/bench_checkpointing.py

bench-quality:   # EqM vs FM at equal budget on the default photos (~30 min on 2 cores); PNGs in runs/bench_quality
	$(PY) benchmarks/bench_quality.py train --steps 500 --evals 4 --out $(RUNS)/bench_quality
	$(PY) benchmarks/bench_quality.py evaluate --runs $(RUNS)/bench_quality --crops 4 --nfe-crops 1

quickstart:
	$(PY) -m dcssdae.cli fit --config configs/quickstart.yaml

# The whole recipe on a CPU (~27 min on 2 idle cores): phase 1 = the quick-start, phase 2 at twice the resolution,
# phase 3, one-step distillation, export; then every stage and bicubic scored on the dev photos.
CPU_RUNS ?= $(RUNS)/cpu
cpu-recipe:
	$(PY) -m dcssdae.cli fit --config configs/quickstart.yaml --trainer.default_root_dir $(CPU_RUNS)/phase1
	$(PY) -m dcssdae.cli fit --config configs/cpu/phase2.yaml --trainer.default_root_dir $(CPU_RUNS)/phase2 \
		--model.init_from $(CPU_RUNS)/phase1/checkpoints/last.ckpt
	$(PY) -m dcssdae.cli fit --config configs/cpu/phase3.yaml --trainer.default_root_dir $(CPU_RUNS)/phase3 \
		--model.init_from $(CPU_RUNS)/phase2/checkpoints/last.ckpt
	$(PY) -m dcssdae.cli fit --config configs/cpu/distill.yaml --trainer.default_root_dir $(CPU_RUNS)/distill \
		--model.init_from $(CPU_RUNS)/phase3/checkpoints/last.ckpt
	$(PY) -m dcssdae.cli export $(CPU_RUNS)/distill/checkpoints/last.ckpt $(CPU_RUNS)/export
	$(PY) benchmarks/compare_models.py --out $(CPU_RUNS)/stages \
		--model "phase 1 (the quick-start), 16 steps=$(CPU_RUNS)/phase1/checkpoints/last.ckpt@16" \
		--model "phase 1, 1 step=$(CPU_RUNS)/phase1/checkpoints/last.ckpt@1" \
		--model "phase 2=$(CPU_RUNS)/phase2/checkpoints/last.ckpt" \
		--model "phase 3 (teacher), 16 steps=$(CPU_RUNS)/phase3/checkpoints/last.ckpt@16" \
		--model "phase 3, 1 step=$(CPU_RUNS)/phase3/checkpoints/last.ckpt@1" \
		--model "distilled (export), 1 step=$(CPU_RUNS)/export@1"
	$(PY) benchmarks/compare_models.py --out $(CPU_RUNS)/distill_crops --val-shards default:crops --size 128 \
		--batch 24 --picture-rows 4 \
		--model "teacher, 16 steps=$(CPU_RUNS)/phase3/checkpoints/last.ckpt@16" \
		--model "student, 1 step=$(CPU_RUNS)/export@1" \
		--model "undistilled, 1 step=$(CPU_RUNS)/phase3/checkpoints/last.ckpt@1"

distill:
	$(PY) -m dcssdae.cli fit --config configs/distill.yaml --model.init_from $(PHASE3_CKPT) $(ARGS)

# The GPU recipe (phases 1-3, make distill, export, validate, latent statistics) at full network size and resolution,
# a few steps each on the CPU, with random stand-ins for the LPIPS / DINOv2 weights: mechanics, memory and FLOPs per
# phase, projected to the GPU batch, in $(RUNS)/rehearsal/report.json (900 CPU seconds, 9.5 GiB; docs/training.md).
rehearsal:
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) benchmarks/rehearsal.py --out $(RUNS)/rehearsal

lint:
	$(PY) -m ruff check dcssdae tests benchmarks

clean:
	rm -rf .pytest_cache $(RUNS) lightning_logs
