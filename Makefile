# ResNets on CIFAR-10: `make sweep` trains and plots the comparison; `make test` runs the tests.
# Every target that needs Python depends on `setup`, so a fresh machine needs nothing else typed.

PYTHON   := .venv/bin/python
DATA_DIR ?= data
SOURCE   ?=
GRID     ?=
EPOCHS   ?=
SEEDS    ?= 1
EXTRA    ?=
GPUS     ?=
NPROC    ?=
SHARD    ?=
PREFLIGHT ?= 1
QUICK    ?=
# Results and figures of a named grid go to their own folders, so studies are plotted apart.
GRID_NAME := $(basename $(notdir $(GRID)))
OUT      ?= results$(if $(GRID),/$(GRID_NAME))
FIGURES  ?= figures$(if $(GRID),/$(GRID_NAME))
# What FFCV's C extension builds against.
SYSTEM_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev

.PHONY: setup system-deps data sweep plot bench test lint clean distclean

setup: system-deps .venv/.installed

# Quick when everything is there; as root installs what is missing, otherwise names the command.
system-deps:
	@if ! (command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg); then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing FFCV's system libraries: $(SYSTEM_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  else \
	    echo "error: FFCV needs system libraries: run 'sudo apt-get install -y $(SYSTEM_PACKAGES)', then make again"; \
	    exit 1; \
	  fi; \
	fi

# The stamp is rebuilt only when requirements.txt changes. The tasks of a Slurm array all start here
# at once: under the lock one task builds .venv while the others wait, and then their inner make
# finds the stamp up to date.
ifndef VENV_LOCKED
.venv/.installed: requirements.txt
	flock .venv.lock $(MAKE) --no-print-directory VENV_LOCKED=1 $@
else
.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@
endif

# One conversion at a time per data folder; data.py does nothing when valid betons are there.
data: setup
	mkdir -p $(DATA_DIR)
	flock $(DATA_DIR)/.lock $(PYTHON) data.py --data-dir $(DATA_DIR) $(if $(SOURCE),--source $(SOURCE))

sweep: data
	GRID="$(GRID)" EPOCHS="$(EPOCHS)" SEEDS="$(SEEDS)" GPUS="$(GPUS)" NPROC="$(NPROC)" SHARD="$(SHARD)" \
	PREFLIGHT="$(PREFLIGHT)" OUT="$(OUT)" PYTHON="$(PYTHON)" EXTRA="--data-dir $(DATA_DIR) $(EXTRA)" bash sweep.sh
	$(MAKE) --no-print-directory plot

plot: setup
	$(PYTHON) plot.py $(OUT) --out $(FIGURES)

bench: data
	$(PYTHON) bench.py --data-dir $(DATA_DIR) $(if $(QUICK),--quick)

# One worker per CPU (tests sharing a module's fixture stay together); the slowest 15 tests at the end.
test: setup
	$(PYTHON) -m pytest -q -n auto --dist loadgroup --durations=15 tests

lint: setup
	$(PYTHON) -m pip install -q ruff && .venv/bin/ruff check .

# Says what it deletes: results/ holds the trained weights too, which only training again brings back.
clean:
	@echo "removing results/ (every run's JSON record, checkpoint, kept weights results/models/*.pt and"
	@echo "  TensorBoard logs results/tensorboard/), figures/ and the caches .pytest_cache .ruff_cache __pycache__"
	rm -rf results figures .pytest_cache .ruff_cache __pycache__ tests/__pycache__

distclean: clean
	rm -rf .venv .venv.lock data
