"""train.py under torchrun: 2 processes on CPU with gloo, against 1 process."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, TEST_PER_CLASS, run_env

FLAGS = ["--arch", "resnet20", "--batch-size", "32", "--epochs", "1", "--aug", "none", "--no-compile", "--quiet",
         "--device", "cpu", "--lr", "0.05", "--amp", "fp32",
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
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def runs(folder, synthetic_data):
    return run(folder, synthetic_data, 1), run(folder, synthetic_data, 2)


def test_two_process_run_counts_every_test_image_once(runs):
    _, two = runs
    assert two["status"] == "finished"
    assert two["run"]["world_size"] == 2 and two["run"]["backend"] == "gloo"
    assert sum(map(sum, two["final"]["confusion"])) == 10 * TEST_PER_CLASS
    assert [sum(row) for row in two["final"]["confusion"]] == [TEST_PER_CLASS] * 10
    assert len(two["final"]["predictions"]["labels"]) == 64
    # The test beton is written class by class, so image i's label is i // TEST_PER_CLASS; the kept sample
    # is class-balanced: one image of each class in turn.
    sample = two["final"]["predictions"]
    assert sample["labels"] == [i // TEST_PER_CLASS for i in sample["indices"]]
    assert sample["labels"][:10] == list(range(10))


def test_two_processes_match_one_process(runs):
    """The same global batches (the sharded order), so the first-step losses agree closely.

    Not exactly: BatchNorm normalises with statistics of each rank's half batch, not the whole
    batch, and the gradient all-reduce sums in another order."""
    one, two = runs
    assert two["history"][0]["first_step_loss"] == pytest.approx(one["history"][0]["first_step_loss"], rel=0.02)
    assert two["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=0.05)
    assert abs(two["history"][0]["test_acc"] - one["history"][0]["test_acc"]) <= 0.15


def test_the_two_process_record_is_the_kept_weights_evaluation(runs, folder, synthetic_data):
    """Each rank's BatchNorm statistics differ after the last step (DDP broadcasts rank 0's before
    each forward, not after): the record must evaluate the model that is kept, rank 0's."""
    _, two = runs
    command = [sys.executable, str(ROOT / "train.py"), "--eval-only", "--from", str(folder / "world2.json"),
               "--data-dir", str(synthetic_data), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=run_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    correct = sum(two["final"]["confusion"][i][i] for i in range(10))
    assert f"({correct}/{10 * TEST_PER_CLASS})" in result.stdout.splitlines()[1]
    # The same model: the loss differs at most by float32 sums over other batches (ranks' against one)
    off = re.search(r"loss off by (\S+)$", result.stdout, re.M)
    assert "identical" in result.stdout or off and abs(float(off[1])) < 1e-5, result.stdout


def test_three_ranks_with_a_rank_whose_last_eval_batch_is_all_padding(tmp_path, synthetic_data):
    """World 3, global batch 99: each rank evaluates 33 images a batch; the 100 test images are dealt
    34/33/33, so ranks 1 and 2 end on a batch that is all padding and run one forward fewer than
    rank 0. The bare module is evaluated (no DDP collective in its forward), the results meet in one
    all-gather: every test and val image is counted once, and predictions come back in test order."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
               str(ROOT / "train.py"), *FLAGS, "--batch-size", "99", "--val-split", "0.2",
               "--data-dir", str(synthetic_data), "--out", str(tmp_path), "--name", "world3"]
    env = run_env()
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run = json.loads((tmp_path / "world3.json").read_text())
    final = run["final"]
    assert run["run"]["world_size"] == 3 and sum(map(sum, final["confusion"])) == 10 * TEST_PER_CLASS
    assert final["test_labels"] == "".join(str(i // TEST_PER_CLASS) for i in range(10 * TEST_PER_CLASS))
    assert len(final["test_preds"]) == 10 * TEST_PER_CLASS
    accuracy = sum(p == t for p, t in zip(final["test_preds"], final["test_labels"], strict=True)) / 100
    assert final["test_acc"] == pytest.approx(accuracy)
    val = run["history"][0]["val_acc"]
    assert round(val * 50) == pytest.approx(val * 50, abs=1e-9)  # a whole number of the 50 val images (5 a class)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_on_loopback_make_one_record_in_the_two_process_order(runs, tmp_path, synthetic_data):
    """Scale-out on the engine itself: two launches of torchrun --nnodes=2 (c10d rendezvous on
    127.0.0.1), one process each, train one config as the 2-process run does: one JSON, the same
    global batches (so the same first-step loss), every test image counted once."""
    _, two = runs
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=nodes",
               str(ROOT / "train.py"), *FLAGS, "--data-dir", str(synthetic_data), "--out", str(tmp_path),
               "--name", "nodes"]
    env = run_env()
    env["OMP_NUM_THREADS"] = "1"
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert [p.name for p in tmp_path.glob("*.json")] == ["nodes.json"]
    run = json.loads((tmp_path / "nodes.json").read_text())
    assert run["status"] == "finished" and run["run"]["world_size"] == 2
    assert sum(map(sum, run["final"]["confusion"])) == 10 * TEST_PER_CLASS
    assert run["history"][0]["first_step_loss"] == pytest.approx(two["history"][0]["first_step_loss"], rel=1e-5)
