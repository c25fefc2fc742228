# dcssdae developer commands. On a fresh clone `make quickstart` or `make test` is the whole set-up: each creates
# the environment (.venv) first when it is missing; `make install` (re)creates it alone.
PYTHON  ?= python3
VENV    ?= .venv
PY      ?= $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

# Runs of the training recipes (override on the command line, e.g. make distill PHASE3_CKPT=...); ARGS are
# extra `dcssdae fit` options for the training targets, e.g. make distill ARGS="--trainer.max_steps 5000".
RUNS        ?= runs
PHASE3_CKPT ?= $(RUNS)/phase3/checkpoints/last.ckpt
ARGS        ?=

.PHONY: install env test test-all bench bench-quality quickstart cpu-recipe cpu-recipe-test cpu-distill distill rehearsal lint clean

INSTALL = $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q --no-cache-dir -e '.[dev]'
install:
	$(INSTALL)

# The environment, made only when it is missing (its `dcssdae` entry point is written last by the install); a PY
# given on the command line is used as it is.
ENV := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/bin/dcssdae)
env: $(ENV)
$(VENV)/bin/dcssdae:
	@echo "no environment in $(VENV): creating it first (as make install: ~2 min, ~6 GB)"
	$(INSTALL)

# One BLAS/OpenMP thread per test process: the suite's tensors are tiny and several tests start subprocesses
# (DDP, CLI); two threads each oversubscribe 2 cores. `make test` leaves out the tests marked slow (multi-process
# and multi-node runs, torch.compile, full-size networks: about 4 more minutes on 2 cores); `make test-all` runs them.
test: $(ENV)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

test-all: $(ENV)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: $(ENV)
	$(PY) benchmarks/bench_networks.py
	$(PY) benchmarks/bench_samplers.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_encode.py
	$(PY) benchmarks/bench_checkpointing.py
	$(PY) benchmarks/bench_startup.py

bench-quality: $(ENV)   # EqM vs FM at equal budget on the default photos (~30 min on 2 cores); PNGs in runs/bench_quality
	$(PY) benchmarks/bench_quality.py train --steps 500 --evals 4 --out $(RUNS)/bench_quality
	$(PY) benchmarks/bench_quality.py evaluate --runs $(RUNS)/bench_quality --crops 4 --nfe-crops 1

# Train the CPU quick-start (~10 min on 2 cores), then score its checkpoint on the held-out photos.
QUICKSTART_CKPT ?= $(RUNS)/quickstart/checkpoints/last.ckpt
quickstart: $(ENV)
	$(PY) -m dcssdae.cli fit --config configs/quickstart.yaml --trainer.default_root_dir $(RUNS)/quickstart $(ARGS)
	$(PY) -m dcssdae.cli validate --config configs/quickstart.yaml --trainer.default_root_dir $(RUNS)/quickstart \
		--ckpt_path $(QUICKSTART_CKPT)

# The whole recipe on a CPU (~27 min on 2 idle cores): phase 1 = the quick-start, phase 2 at twice the resolution,
# phase 3, one-step distillation, export; then every stage and bicubic scored on the dev photos.
CPU_RUNS ?= $(RUNS)/cpu
CPU_PHASE3_CKPT ?= $(CPU_RUNS)/phase3/checkpoints/last.ckpt
CPU_DISTILL = $(PY) -m dcssdae.cli fit --config configs/cpu/distill.yaml --trainer.default_root_dir $(CPU_RUNS)/distill \
	--model.init_from $(CPU_PHASE3_CKPT)
CPU_STAGES = $(PY) benchmarks/compare_models.py \
	--model "phase 1 (the quick-start), 16 steps=$(CPU_RUNS)/phase1/checkpoints/last.ckpt@16" \
	--model "phase 1, 1 step=$(CPU_RUNS)/phase1/checkpoints/last.ckpt@1" \
	--model "phase 2=$(CPU_RUNS)/phase2/checkpoints/last.ckpt" \
	--model "phase 3 (teacher), 16 steps=$(CPU_RUNS)/phase3/checkpoints/last.ckpt@16" \
	--model "phase 3, 1 step=$(CPU_RUNS)/phase3/checkpoints/last.ckpt@1" \
	--model "distilled (export), 1 step=$(CPU_RUNS)/export@1"
cpu-recipe: $(ENV)
	$(PY) -m dcssdae.cli fit --config configs/quickstart.yaml --trainer.default_root_dir $(CPU_RUNS)/phase1
	$(PY) -m dcssdae.cli fit --config configs/cpu/phase2.yaml --trainer.default_root_dir $(CPU_RUNS)/phase2 \
		--model.init_from $(CPU_RUNS)/phase1/checkpoints/last.ckpt
	$(PY) -m dcssdae.cli fit --config configs/cpu/phase3.yaml --trainer.default_root_dir $(CPU_RUNS)/phase3 \
		--model.init_from $(CPU_RUNS)/phase2/checkpoints/last.ckpt
	$(CPU_DISTILL)
	$(PY) -m dcssdae.cli export $(CPU_RUNS)/distill/checkpoints/last.ckpt $(CPU_RUNS)/export
	$(CPU_STAGES) --out $(CPU_RUNS)/stages
	$(PY) benchmarks/compare_models.py --out $(CPU_RUNS)/distill_crops --val-shards default:crops --size 128 \
		--batch 24 --picture-rows 4 \
		--model "teacher, 16 steps=$(CPU_RUNS)/phase3/checkpoints/last.ckpt@16" \
		--model "student, 1 step=$(CPU_RUNS)/export@1" \
		--model "undistilled, 1 step=$(CPU_RUNS)/phase3/checkpoints/last.ckpt@1"

# The CPU recipe's stages on the test photos (reported once; settings are chosen on dev, which cpu-recipe scores).
cpu-recipe-test: $(ENV)
	$(CPU_STAGES) --out $(CPU_RUNS)/stages_test --val-shards default:test

# One-step distillation of the phase-3 model (GPU recipe), e.g. make distill PHASE3_CKPT=... ARGS="--trainer.devices 4"
distill: $(ENV)
	$(PY) -m dcssdae.cli fit --config configs/distill.yaml --model.init_from $(PHASE3_CKPT) $(ARGS)

# The CPU recipe's distillation alone (~6 min on 2 cores), from the CPU recipe's phase 3 (make cpu-recipe), e.g.
# make cpu-distill CPU_PHASE3_CKPT=... ARGS="--trainer.max_steps 400"
cpu-distill: $(ENV)
	$(CPU_DISTILL) $(ARGS)

# The GPU recipe (phases 1-3, make distill, export, validate, latent statistics) at full network size and resolution,
# a few steps each on the CPU, with random stand-ins for the LPIPS / DINOv2 weights: mechanics, memory and FLOPs per
# phase, projected to the GPU batch, in $(RUNS)/rehearsal/report.json (6 min on 2 idle cores, 9.5 GiB; docs/training.md).
rehearsal: $(ENV)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) benchmarks/rehearsal.py --out $(RUNS)/rehearsal

lint:
	$(PY) -m ruff check dcssdae tests benchmarks

clean:
	rm -rf .pytest_cache $(RUNS) lightning_logs
