"""train.py end to end on tiny synthetic data, run as the user runs it: a subprocess."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, TEST_PER_CLASS, record, run_env, train

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_data):
    tmp_path = tmp_path_factory.mktemp("run")
    train(tmp_path, synthetic_data, "--epochs", "4", "--batch-size", "16", "--lr", "0.1", "--val-split", "0.2",
          "--amp", "auto", "--name", "full")
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


def test_compiled_run_does_not_recompile_after_warm_up(tmp_path, synthetic_data):
    result = train(tmp_path, synthetic_data, "--arch", "cnn", "--compile", "--epochs", "2", "--val-split", "0.1",
                   "--name", "compiled")
    run = record(tmp_path, "compiled")
    assert run["status"] == "finished", result.stdout
    assert run["final"]["recompiles"] == 0
    assert run["run"]["compile_time_s"] > 0 and run["run"]["compile"] is True


def test_amp_auto_on_cpu_measures_both_dtypes_and_records_its_choice(finished_run):
    _, run = finished_run
    assert run["config"]["amp"] == "auto"
    assert run["run"]["amp"] in ("bfloat16", "off")
    assert "img/s in bf16 against" in run["run"]["amp_reason"]
