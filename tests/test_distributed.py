"""train.py under torchrun: 2 processes on CPU with gloo, against 1 process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TEST_PER_CLASS, run_env

FLAGS = ["--arch", "resnet20", "--batch-size", "32", "--epochs", "1", "--aug", "none", "--no-compile", "--quiet",
         "--device", "cpu", "--lr", "0.05", "--amp", "off",
         "--channels-last"]


def run(tmp_path, data_dir, nproc: int) -> dict:
    name = f"world{nproc}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *FLAGS, "--data-dir", str(data_dir), "--out", str(tmp_path), "--name", name]
    env = run_env()
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores: one thread each, in both runs alike
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("*.json")).count(f"{name}.json") == 1
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data):
    tmp_path = tmp_path_factory.mktemp("dist")
    return run(tmp_path, synthetic_data, 1), run(tmp_path, synthetic_data, 2)


def test_two_process_run_counts_every_test_image_once(runs):
    _, two = runs
    assert two["status"] == "finished"
    assert two["run"]["world_size"] == 2 and two["run"]["backend"] == "gloo"
    assert sum(map(sum, two["final"]["confusion"])) == 10 * TEST_PER_CLASS
    assert [sum(row) for row in two["final"]["confusion"]] == [TEST_PER_CLASS] * 10
    assert len(two["final"]["predictions"]["labels"]) == 64
    # The test beton is written class by class, so the first 64 labels are known.
    assert two["final"]["predictions"]["labels"] == [i // TEST_PER_CLASS for i in range(64)]


def test_two_processes_match_one_process(runs):
    """The same global batches (the sharded order), so the first-step losses agree closely.

    Not exactly: BatchNorm normalises with statistics of each rank's half batch, not the whole
    batch, and the gradient all-reduce sums in another order."""
    one, two = runs
    assert two["history"][0]["first_step_loss"] == pytest.approx(one["history"][0]["first_step_loss"], rel=0.02)
    assert two["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=0.05)
    assert abs(two["history"][0]["test_acc"] - one["history"][0]["test_acc"]) <= 0.15
