# ResNets on CIFAR-10: `make sweep` trains and plots the comparison; `make test` runs the tests.
# Every target that needs Python depends on `setup`, so a fresh machine needs nothing else typed.

# Set-up: the interpreter the venv is made from, and where torch comes from (README, "Install"):
#   plain: torch and torchvision as pinned in requirements.txt, from PyPI (CUDA 13.0 build: driver 580+)
#   TORCH_CUDA=cu126: the same versions from PyTorch's own index for that CUDA (an older driver, a V100)
#   SYSTEM_TORCH=1: keep the torch and torchvision that PYTHON_BASE already has (containers, clusters)
PYTHON_BASE ?= python3
TORCH_CUDA  ?=
SYSTEM_TORCH ?=
TORCH_INDEX ?= https://download.pytorch.org/whl
VENV     ?= .venv
PYTHON   := $(VENV)/bin/python
TORCH_PINS := $(shell grep -E '^torch(vision)?==' requirements.txt)
# The stamp names the way torch was installed: asking for another way rebuilds the venv.
STAMP    := $(VENV)/.installed-$(if $(SYSTEM_TORCH),system-torch,$(or $(TORCH_CUDA),pypi))
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
# Results and figures of a grid other than the default go to their own folders (as sweep.sh chooses),
# so studies are plotted apart: GRID=quick or GRID=path/quick.txt -> results/quick, figures/quick.
GRID_NAME := $(basename $(notdir $(GRID)))
OUT      ?= results$(if $(filter-out default,$(GRID)),/$(GRID_NAME))
FIGURES  ?= figures$(if $(filter-out default,$(GRID)),/$(GRID_NAME))

.PHONY: setup system-deps data sweep plot bench test lint clean distclean

setup: system-deps $(STAMP)

# A Python in range, and what FFCV's C extension builds against and with: OpenCV and libjpeg-turbo,
# a C++ compiler, Python's headers, and venv's ensurepip (Ubuntu ships python3 without the last two).
# Quick when everything is there; as root installs what is missing, otherwise names the command.
system-deps:
	@$(PYTHON_BASE) -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null || { \
	  echo "error: $(PYTHON_BASE) is $$($(PYTHON_BASE) --version 2>&1 || echo 'not found'); this project needs Python 3.10 to 3.13: pass PYTHON_BASE=python3.12 (or another)"; \
	  exit 1; }
	@missing=""; \
	command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg || missing="pkg-config libopencv-dev libturbojpeg0-dev"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	[ -f "$$($(PYTHON_BASE) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || \
	  missing="$$missing python3-dev"; \
	$(PYTHON_BASE) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	missing=$$(echo $$missing); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing what FFCV's build needs: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "error: FFCV's build needs system packages: run 'sudo apt-get install -y $$missing' (for a python3.X of its own: python3.X-dev python3.X-venv), then make again"; \
	    exit 1; \
	  fi; \
	fi

# The stamp is rebuilt when requirements.txt changes. The tasks of a Slurm array all start here
# at once: under the lock one task builds the venv while the others wait, and then their inner make
# finds the stamp up to date.
ifndef VENV_LOCKED
$(STAMP): requirements.txt
	flock $(VENV).lock $(MAKE) --no-print-directory VENV_LOCKED=1 $@
else
$(STAMP): requirements.txt
	@for stamp in $(VENV)/.installed*; do \
	  if [ -e "$$stamp" ] && [ "$$stamp" != "$(STAMP)" ]; then \
	    echo "$(VENV) holds torch installed another way ($$stamp): making it anew"; rm -rf $(VENV); break; \
	  fi; \
	done
	$(PYTHON_BASE) -m venv $(VENV)
ifdef SYSTEM_TORCH
	@# The base's site dirs come after the venv's own, with their .pth files run (setuptools' distutils
	@# shim, on 3.12+): a .pth of ours rather than --system-site-packages, so a venv works as base too.
	$(PYTHON_BASE) -c 'import site; print("\n".join("import site; site.addsitedir(%r)" % d for d in site.getsitepackages()))' > \
	  "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/base-packages.pth"
	@$(PYTHON) -c 'import torch, torchvision' 2>/dev/null || { \
	  echo "error: SYSTEM_TORCH=1 but $(PYTHON_BASE) has no torch and torchvision to keep: pass PYTHON_BASE=<the python that has them>, or leave SYSTEM_TORCH unset"; \
	  exit 1; }
else ifdef TORCH_CUDA
	$(PYTHON) -m pip install -q $(TORCH_PINS) --index-url $(TORCH_INDEX)/$(TORCH_CUDA) || { \
	  echo "error: no $(TORCH_PINS) build for TORCH_CUDA=$(TORCH_CUDA) at $(TORCH_INDEX)/$(TORCH_CUDA): use a CUDA tag PyTorch publishes for these versions (cu126, cu128, cu130), or SYSTEM_TORCH=1"; \
	  exit 1; }
endif
	$(PYTHON) -m pip install -q --upgrade pip
	grep -vE '^torch(vision)?==' requirements.txt | \
	  $(PYTHON) -m pip install -q -r /dev/stdin $(if $(SYSTEM_TORCH)$(TORCH_CUDA),,$(TORCH_PINS))
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
	$(PYTHON) -m pip install -q ruff && $(VENV)/bin/ruff check .

# Says what it deletes: results/ holds the trained weights too, which only training again brings back.
clean:
	@echo "removing results/ (every run's JSON record, checkpoint, kept weights results/models/*.pt and"
	@echo "  TensorBoard logs results/tensorboard/), figures/ and the caches .pytest_cache .ruff_cache __pycache__"
	rm -rf results figures .pytest_cache .ruff_cache __pycache__ tests/__pycache__

distclean: clean
	rm -rf $(VENV) $(VENV).lock data
