"""Shared fixtures: a tiny synthetic CIFAR-10 made by the tests themselves.

Each image encodes its label: the red channel is a flat 20 + 20 * label (plus a little noise), so a
test can read the label back from the pixels, and a small network learns the task in one epoch."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# `make test` runs one pytest worker per CPU (pytest-xdist). Each worker and every script it starts
# then computes with one thread: two workers with two threads each on two cores keep torch's
# OpenMP threads waiting for a busy core, and every step runs several times slower. Set before
# torch is first imported (cuda_standin imports it), as torch reads it then.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"

# The CPU's switch decisions (speed.SWITCH_CACHE) in a file of this session's own, for every script
# the tests start too: a test that times the probes must not find them decided by another.
SWITCH_CACHE_DIR = tempfile.TemporaryDirectory(prefix="switch-cache-")  # removed when the session ends
os.environ["CIFAR_SWITCH_CACHE"] = os.path.join(SWITCH_CACHE_DIR.name, "cpu-switches.json")

from cuda_standin import fake_gpu, fake_gpus  # noqa: E402, F401 (fixtures: a strict CUDA stand-in, see cuda_standin.py)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_JPEG = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_PER_CLASS, TEST_PER_CLASS = 24, 10


def label_of_red(red: float) -> int:
    """Inverse of the encoding, from a red value in 0..255."""
    return int(round((red - 20) / 20))


def tiny_model():
    """A network of a few hundred weights, the same every call: what the speed and state tests step."""
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))


def synthetic_images(n: int, label: int, rng: np.random.Generator) -> np.ndarray:
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = np.clip(20 + 20 * label + rng.integers(-3, 4, size=(n, 32, 32)), 0, 255)
    return images


def write_image_folder(root: Path, train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
                       seed: int = 0) -> Path:
    """train/<class>/*.png and test/<class>/*.png, lossless, as a user's image folder would be."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(synthetic_images(per_class, label, rng)):
                Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def make_env(**overrides: str) -> dict:
    """Environment for a make the tests run: without what the `make test` around the suite passes
    down (MAKEFLAGS, and its command-line variables, which make exports), e.g. VENV=... PYTHON_BASE=..."""
    own = set(re.findall(r"^(\w+)\s*\??[:?]?=", (ROOT / "Makefile").read_text(), re.M))
    env = {k: v for k, v in os.environ.items() if k not in own | {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    return {**env, **overrides}


def run_env() -> dict:
    """Environment for subprocesses: quiet, no progress bars, threads as the machine gives."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# resnet20 on 240 images: a few seconds per epoch. Eager, fp32, channels-last and unaugmented unless
# a test is about those: left to auto, the speed switches are decided by timing steps on CPU.
FIXED_SWITCHES = ("--no-compile", "--amp", "fp32", "--channels-last")
TINY_CONFIG = ["--arch", "resnet20", "--batch-size", "32", "--aug", "none", "--quiet"]
TINY = [*TINY_CONFIG, *FIXED_SWITCHES]


def train(tmp_path, data_dir, *flags, switches=FIXED_SWITCHES, check=True, timeout=600) -> subprocess.CompletedProcess:
    """train.py on the tiny config; `switches` replaces FIXED_SWITCHES (() leaves all three on auto)."""
    command = [sys.executable, str(ROOT / "train.py"), *TINY_CONFIG, *switches, "--data-dir", str(data_dir),
               "--out", str(tmp_path / "results"), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=run_env(), timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def record(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "results" / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory, image_folder) -> Path:
    """A converted synthetic data dir (train.beton, test.beton, meta.json), shared by all tests.

    Tests that damage data must copy it first (see fresh_data)."""
    import data
    out = tmp_path_factory.mktemp("data")
    data.prepare(str(image_folder), out)
    return out


@pytest.fixture()
def fresh_data(tmp_path, synthetic_data) -> Path:
    """A private copy of the synthetic data dir, for tests that damage or rebuild it."""
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(synthetic_data, copy)
    return copy


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker with the group's other tests")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Under `pytest -n N --dist loadgroup`, the tests that share a module-scoped fixture (a finished
    run, a real sweep) go to one worker, which makes the fixture once; all others are dealt out one
    by one, so the workers finish together."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = fixtures.name2fixturedefs.values() if fixtures else ()
        if any(d[-1].scope == "module" for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
