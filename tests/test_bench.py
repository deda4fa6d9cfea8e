"""bench.py end to end on tiny synthetic data, run as `make bench` runs it: a subprocess.

The record must be complete and self-consistent; no test ever asserts a speed."""
from __future__ import annotations

import datetime
import json
import math
import platform
import subprocess
import sys

import bench
import numpy as np
import pytest
import torch
from conftest import ROOT, run_env

# One small arch, one repetition, the epoch part on a fifth of the 240 synthetic images (6 batches), and
# every mode but `compile`: `default` is compiled too, and one compile of resnet20 is ~30 s of the budget.
# Unaugmented: numba compiles FFCV's flip/translate pipeline for ~20 s per loader.
MODES = ("eager_fp32", "amp_bf16", "default")
TINY = ["--quick", "--archs", "resnet20", "--batch-size", "8", "--reps", "1", "--epoch-fraction", "0.2",
        "--modes", ",".join(MODES), "--device", "cpu", "--aug", "none"]
TOP_LEVEL = ("loader_ratio", "loader_overhead", "speedup", "train_step", "compile_time_s", "flops_per_image",
             "peak_flops", "device", "device_name", "threads", "batch_size", "quick")


def run_bench(*flags) -> subprocess.CompletedProcess:
    # One torch thread: on a shared machine, a second thread waiting for a busy core makes every step
    # ten times slower, and this test checks the record, not the speed.
    env = {**run_env(), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *flags], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic_data):
    out = tmp_path_factory.mktemp("bench")
    result = run_bench(*TINY, "--data-dir", str(synthetic_data), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text()), result.stdout


def numbers_in(value, where="record"):
    """(where, number) for every number in a JSON value, booleans excepted."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers_in(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers_in(item, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


def test_record_is_named_after_the_host_and_the_date(tiny_run):
    path, _, _ = tiny_run
    assert path.name == f"{platform.node()}-{datetime.date.today():%Y-%m-%d}.json"
    assert not list(path.parent.glob(".*tmp*"))  # the atomic write left no temporary file


def test_record_holds_every_top_level_figure(tiny_run):
    _, record, _ = tiny_run
    for key in TOP_LEVEL:
        assert key in record, key
    assert record["quick"] is True and record["batch_size"] == 8 and record["device"] == "cpu"
    assert set(record["train_step"]) == {"resnet20"}
    assert set(record["train_step"]["resnet20"]) == set(MODES)
    assert set(record["peak_flops"]) == {"fp32", "bf16"}
    assert set(record["flops_per_image"]) == {"resnet20"}
    # a compile time exists where a timed mode compiled: `default` compiles only if it won its probe here
    compiled = any(mode["compile"] for mode in record["archs"]["resnet20"]["modes"].values())
    assert set(record["compile_time_s"]) == ({"resnet20"} if compiled else set())


def test_every_figure_is_positive_and_finite(tiny_run):
    _, record, _ = tiny_run
    found = dict(numbers_in(record))
    assert "record.loader_ratio" in found and "record.train_step.resnet20.default" in found
    for where, number in found.items():
        assert math.isfinite(number) and number >= 0, f"{where} = {number}"
        assert number > 0 or where.startswith("record.load_average"), f"{where} = {number}"  # an idle machine: 0


def test_speedup_is_default_over_eager_fp32(tiny_run):
    _, record, _ = tiny_run
    steps = record["train_step"]["resnet20"]
    assert record["speedup"]["resnet20"] == pytest.approx(steps["default"] / steps["eager_fp32"])


def test_default_mode_is_what_train_py_auto_chose_for_the_arch_here(tiny_run):
    _, record, _ = tiny_run
    details = record["archs"]["resnet20"]
    switches, default = details["default_switches"], details["modes"]["default"]
    probes = switches["probe_img_per_s"]
    assert len(probes) == 4 and set(switches["compile_probe_img_per_s"]) == {"compiled", "eager"}
    assert (default["channels_last"], default["compile"]) == (switches["channels_last"], switches["compile"])
    assert default["dtype"] == switches["amp"]  # one vocabulary of dtypes
    assert record["modes"]["default"] == {"channels_last": "auto", "dtype": "auto", "compile": "auto"}


def test_loader_figures_are_the_ratios_they_name(tiny_run):
    _, record, _ = tiny_run
    loader, epoch = record["loader"], record["epoch"]
    assert record["loader_ratio"] == pytest.approx(loader["ours_img_per_s"] / loader["torchvision_img_per_s"], abs=0.01)
    assert record["loader_overhead"] == pytest.approx(epoch["loader_s"] / epoch["in_memory_s"])
    assert epoch["arch"] == "resnet20" and epoch["batches"] == 6  # 50 images (5 per class) in batches of 8


def test_training_flops_are_about_three_forward_passes(tiny_run):
    import models
    _, record, _ = tiny_run
    forward = models.forward_flops(models.build_model("resnet20"))
    assert 2.5 * forward <= record["flops_per_image"]["resnet20"] <= 3.5 * forward


def test_table_is_printed(tiny_run):
    _, _, stdout = tiny_run
    for text in ("train step, images/s", "speedup", "loader overhead", "peak", "resnet20"):
        assert text in stdout, text


def test_unknown_arch_label_is_refused_before_any_work(tmp_path, synthetic_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--archs", "resnet20-imagenet", "--data-dir", str(synthetic_data), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "resnet20-imagenet" in error and "stem" in error
    assert not list(tmp_path.iterdir())


def test_help_says_what_quick_changes():
    help_text = " ".join(bench.build_parser().format_help().split())
    for text in ("batch 64", "3 reps", "resnet20, resnet18-imagenet", "10% of the train set",
                 "batch 512 unless --batch-size"):
        assert text in help_text, text


# --- the loader part: a fair comparison (issue 12 item 11) ------------------------------------------

def test_time_epoch_synchronises_the_benchmarks_device_only(monkeypatch):
    synchronised = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronised.append(device))
    batches = [(torch.zeros(4, 3, 32, 32), torch.zeros(4))] * 3
    assert bench.time_epoch(batches, torch.device("cpu")) > 0
    assert synchronised == []
    bench.time_epoch(batches, torch.device("cuda", 1))
    assert synchronised == [torch.device("cuda", 1)]


def test_torchvision_way_pins_memory_for_cuda_only():
    images, labels = np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64)
    def loader(device):
        return bench.torchvision_way(images, labels, [0.5] * 3, [0.25] * 3, 0, 2, torch.device(device))
    assert loader("cuda").pin_memory and not loader("cpu").pin_memory
    assert loader("cpu").batch_size == 2


def test_benchmark_gives_torchvision_our_workers_batch_size_and_device(synthetic_data, monkeypatch):
    asked, moved = {}, []
    real_way, real_moved_to = bench.torchvision_way, bench.moved_to

    def torchvision_way(images, labels, mean, std, workers, batch_size, device):
        asked.update(workers=workers, batch_size=batch_size, device=device)
        return real_way(images, labels, mean, std, workers, batch_size, device)

    def moved_to(batches, device):
        moved.append(device)
        return real_moved_to(batches, device)
    monkeypatch.setattr(bench, "torchvision_way", torchvision_way)
    monkeypatch.setattr(bench, "moved_to", moved_to)
    result = bench.benchmark_loader(synthetic_data, torch.device("cpu"), batch_size=16, workers=1, aug="none")
    assert asked == {"workers": 1, "batch_size": 16, "device": torch.device("cpu")}
    assert len(moved) == 1 + bench.LOADER_REPS and set(moved) == {torch.device("cpu")}  # every pass pays the copy
    assert result["workers"] == 1 and result["batch_size"] == 16


def test_loader_only_times_the_loaders_alone(tmp_path, synthetic_data, capsys):
    assert bench.main(["--loader-only", "--data-dir", str(synthetic_data), "--out", str(tmp_path), "--device", "cpu",
                       "--batch-size", "16", "--workers", "1", "--aug", "none"]) == 0
    [path] = (tmp_path / "loader").glob("*.json")
    record = json.loads(path.read_text())
    assert set(record) == set(bench.LOADER_ONLY_KEYS) and record["loader"]["batch_size"] == 16
    assert record["loader"]["ratio"] == pytest.approx(
        record["loader"]["ours_img_per_s"] / record["loader"]["torchvision_img_per_s"], abs=0.01)
    assert "torchvision DataLoader" in capsys.readouterr().out
