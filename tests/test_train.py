"""train.py end to end on tiny synthetic data, run as the user runs it: a subprocess."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TEST_PER_CLASS, run_env

# resnet20 on 240 images: a few seconds per epoch; eager unless a test is about compiling.
TINY = ["--arch", "resnet20", "--batch-size", "32", "--no-compile", "--quiet"]


def train(tmp_path, data_dir, *flags, check=True, timeout=600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "--data-dir", str(data_dir),
               "--out", str(tmp_path / "results"), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=run_env(), timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def record(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "results" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_data):
    tmp_path = tmp_path_factory.mktemp("run")
    train(tmp_path, synthetic_data, "--epochs", "4", "--batch-size", "16", "--lr", "0.1", "--val-split", "0.2",
          "--name", "full")
    return tmp_path, record(tmp_path, "full")


def test_run_writes_a_complete_consistent_record(finished_run):
    _, run = finished_run
    assert run["schema_version"] == 1 and run["status"] == "finished"
    assert run["started_at"] <= run["ended_at"]
    for key in ("python", "torch", "torchvision", "ffcv", "numpy", "device_name", "threads", "git_commit"):
        assert key in run["env"]
    assert run["model"]["params"] == 269_722 and run["model"]["flops_per_image"] > 0
    assert [row["epoch"] for row in run["history"]] == [1, 2, 3, 4]
    for row in run["history"]:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
                    "epoch_time_s", "train_img_per_s", "eval_time_s"):
            assert key in row, key
        assert all(0 <= row[k] <= 1 for k in ("train_acc", "val_acc", "test_acc"))
    final = run["final"]
    confusion = final["confusion"]
    assert sum(map(sum, confusion)) == 10 * TEST_PER_CLASS
    for i, name in enumerate(run["classes"]):
        assert final["per_class_acc"][name] == pytest.approx(confusion[i][i] / sum(confusion[i]))
    assert final["test_acc"] == pytest.approx(sum(confusion[i][i] for i in range(10)) / 100)
    assert final["test_acc"] == run["history"][-1]["test_acc"]
    assert final["best_val_epoch"] in (1, 2, 3, 4) and 0 <= final["best_val_acc"] <= 1
    assert len(final["predictions"]["preds"]) == len(final["predictions"]["labels"]) == 64
    for key in ("compile_time_s", "mean_epoch_time_s", "peak_memory_mb", "recompiles", "train_img_per_s"):
        assert key in final
    later = [row["epoch_time_s"] for row in run["history"][1:]]
    assert final["mean_epoch_time_s"] == pytest.approx(sum(later) / len(later))  # the first pays JIT time


def test_training_learns_the_synthetic_task(finished_run):
    _, run = finished_run
    assert run["history"][-1]["train_loss"] < run["history"][0]["train_loss"]
    assert run["final"]["test_acc"] > 0.3  # chance is 0.1; the label is written in the red channel


def test_from_reproduces_the_config(finished_run, synthetic_data):
    tmp_path, run = finished_run
    command = [sys.executable, str(ROOT / "train.py"), "--from", str(tmp_path / "results" / "full.json"),
               "--name", "again", "--epochs", "1"]
    assert subprocess.run(command, capture_output=True, env=run_env(), timeout=600).returncode == 0
    again = record(tmp_path, "again")
    differing = {k for k in run["config"] if run["config"][k] != again["config"][k]}
    assert differing == {"name", "epochs"}  # only what was given on the command line


def wait_for_epochs(path, epochs: int, process, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if len(json.loads(path.read_text())["history"]) >= epochs:
                return
        except (OSError, ValueError):
            pass
        assert process.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("no epoch finished in time")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, synthetic_data, how):
    flags = ["--epochs", "4", "--aug", "none"]
    train(tmp_path, synthetic_data, *flags, "--name", "straight")
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "--data-dir", str(synthetic_data),
               "--out", str(tmp_path / "results"), *flags, "--name", "cut"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
    wait_for_epochs(tmp_path / "results" / "cut.json", 2, process)
    process.send_signal(how)
    out, err = process.communicate(timeout=300)
    interrupted = record(tmp_path, "cut")
    assert interrupted["status"] == "running" and len(interrupted["history"]) >= 2
    if how == signal.SIGINT:
        assert process.returncode == 130 and "--resume" in out
    train(tmp_path, synthetic_data, *flags, "--name", "cut", "--resume")
    resumed, straight = record(tmp_path, "cut"), record(tmp_path, "straight")
    assert resumed["status"] == "finished"
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)


def test_checkpoint_of_another_config_is_refused(tmp_path, synthetic_data):
    ckpt = tmp_path / "results" / "checkpoints" / "x.pt"
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "--data-dir", str(synthetic_data),
               "--out", str(tmp_path / "results"), "--epochs", "3", "--name", "x"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
    wait_for_epochs(tmp_path / "results" / "x.json", 1, process)
    process.kill()
    process.communicate()
    assert ckpt.exists()
    result = train(tmp_path, synthetic_data, "--epochs", "3", "--name", "x", "--lr", "0.01", "--resume", check=False)
    assert result.returncode == 1
    assert "another config" in result.stderr and "lr" in result.stderr and "Traceback" not in result.stderr
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    result = train(tmp_path, synthetic_data, "--epochs", "3", "--name", "x", "--resume", check=False)
    assert result.returncode == 1 and "unreadable" in result.stderr and "Traceback" not in result.stderr


def test_huge_learning_rate_ends_diverged(tmp_path, synthetic_data):
    result = train(tmp_path, synthetic_data, "--epochs", "3", "--lr", "1e12", "--name", "boom", check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    run = record(tmp_path, "boom")
    assert run["status"] == "diverged" and run["diverged_epoch"] == 1
    assert "lower --lr" in result.stdout


def test_compiled_run_does_not_recompile_after_warm_up(tmp_path, synthetic_data):
    result = train(tmp_path, synthetic_data, "--arch", "cnn", "--compile", "--epochs", "2", "--val-split", "0.1",
                   "--name", "compiled")
    run = record(tmp_path, "compiled")
    assert run["status"] == "finished", result.stdout
    assert run["final"]["recompiles"] == 0
    assert run["run"]["compile_time_s"] > 0 and run["run"]["compile"] is True


@pytest.mark.parametrize("flags, message", [
    (["--arch", "resnet19"], "invalid choice: 'resnet19'"),
    (["--pool", "min"], "invalid choice: 'min'"),
    (["--opt", "lion"], "invalid choice: 'lion'"),
    (["--stem", "tiny"], "invalid choice: 'tiny'"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--val-split", "1"], "--val-split must be in [0, 1)"),
    (["--aug", "blur"], "unknown augmentation 'blur'"),
    (["--early-stop", "3"], "add --val-split"),
])
def test_bad_arguments_get_a_one_line_error_before_any_work(tmp_path, synthetic_data, flags, message):
    result = train(tmp_path, synthetic_data, *flags, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def test_batch_larger_than_the_data_is_a_one_line_error(tmp_path, synthetic_data):
    result = train(tmp_path, synthetic_data, "--batch-size", "4096", check=False)
    assert result.returncode == 1
    assert "lower --batch-size" in result.stderr and result.stderr.strip().count("\n") == 0


def test_missing_data_names_make_data(tmp_path):
    result = train(tmp_path, tmp_path / "no-data", check=False)
    assert result.returncode == 1 and "make data" in result.stderr and "Traceback" not in result.stderr
