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


def test_record_is_complete_named_after_the_host_and_the_date_and_printed(tiny_run):
    path, record, stdout = tiny_run
    assert path.name == f"{platform.node()}-{datetime.date.today():%Y-%m-%d}.json"
    assert not list(path.parent.glob(".*tmp*"))  # the atomic write left no temporary file
    for key in TOP_LEVEL:
        assert key in record, key
    assert record["quick"] is True and record["batch_size"] == 8 and record["device"] == "cpu"
    assert set(record["train_step"]) == set(record["flops_per_image"]) == {"resnet20"}
    assert set(record["train_step"]["resnet20"]) == set(MODES)
    assert set(record["peak_flops"]) == {"fp32", "bf16"}
    # a compile time exists where a timed mode compiled: `default` compiles only if it won its probe here
    compiled = any(mode["compile"] for mode in record["archs"]["resnet20"]["modes"].values())
    assert set(record["compile_time_s"]) == ({"resnet20"} if compiled else set())
    for text in ("train step, images/s", "speedup", "loader overhead", "peak", "resnet20",
                 "start-up of train.py's default mode, resnet20: imports "):
        assert text in stdout, text
    startup = record["startup_s"]
    assert set(startup) == {"arch", "imports", "data_checks", "loaders", "jit", "probes", "compile"}
    assert startup["probes"] == record["archs"]["resnet20"]["default_switches"]["probe_time_s"] > 0


def test_every_figure_is_positive_and_finite(tiny_run):
    _, record, _ = tiny_run
    found = dict(numbers_in(record))
    assert "record.loader_ratio" in found and "record.train_step.resnet20.default" in found
    for where, number in found.items():
        assert math.isfinite(number) and number >= 0, f"{where} = {number}"
        # 0: an idle machine's load, and what the default mode did not pay (no compile, a JIT in the noise)
        zero_ok = ("record.load_average", "record.startup_s.compile", "record.startup_s.jit", "record.loader.jit_s")
        assert number > 0 or where.startswith(zero_ok), f"{where} = {number}"


def test_derived_figures_are_the_ratios_they_name(tiny_run):
    import models
    _, record, _ = tiny_run
    steps, loader, epoch = record["train_step"]["resnet20"], record["loader"], record["epoch"]
    assert record["speedup"]["resnet20"] == pytest.approx(steps["default"] / steps["eager_fp32"])
    assert record["loader_ratio"] == pytest.approx(loader["ours_img_per_s"] / loader["torchvision_img_per_s"], abs=0.01)
    assert record["loader_overhead"] == pytest.approx(epoch["loader_s"] / epoch["in_memory_s"])
    assert epoch["arch"] == "resnet20" and epoch["batches"] == 6  # 50 images (5 per class) in batches of 8
    flops = record["flops_per_image"]["resnet20"]
    assert 2.5 <= flops / models.forward_flops(models.build_model("resnet20")) <= 3.5  # forward + backward
    assert record["peak_fraction"]["resnet20"]["amp_bf16"] == pytest.approx(
        flops * steps["amp_bf16"] / record["peak_flops"]["bf16"])


def test_default_mode_is_what_train_py_auto_chose_for_the_arch_here(tiny_run):
    _, record, _ = tiny_run
    details = record["archs"]["resnet20"]
    switches, default = details["default_switches"], details["modes"]["default"]
    keys = ("channels_last", "amp", "compile")  # one vocabulary: speed.choose_switches's
    assert len(switches["probe_img_per_s"]) == 4 and set(switches["compile_probe_img_per_s"]) == {"compiled", "eager"}
    assert {k: default[k] for k in keys} == {k: switches[k] for k in keys}
    assert record["modes"]["default"] == dict.fromkeys(keys, "auto")


@pytest.mark.parametrize("flags, problem", [(["--archs", "resnet20-imagenet"], "stem"),
                                            (["--batch-size", "1"], "--batch-size: must be at least 2"),
                                            (["--modes", "eager_fp32,fast"], "--modes fast: choose from"),
                                            (["--epoch-fraction", "0"], "--epoch-fraction: must be in (0, 1]")])
def test_bad_flags_are_refused_before_any_work(tmp_path, synthetic_data, capsys, flags, problem):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*flags, "--device", "cpu", "--data-dir", str(synthetic_data), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and problem in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_quick_gives_its_values_unless_a_flag_is_given_and_help_says_them(capsys):
    args, _, _ = bench.parse_args(["--quick", "--reps", "2", "--device", "cpu"])
    assert (args.batch_size, args.reps, args.steps_per_rep, args.archs) == (64, 2, 2, ("resnet20", "resnet18-imagenet"))
    assert args.loader_batch_size == bench.BATCH_SIZE  # the loader part keeps the full run's batch
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for text in ("batch 64", "3 reps", "resnet20, resnet18-imagenet", "10% of the train set",
                 "batch 512 unless --batch-size"):
        assert text in help_text, text


# --- the loader part: a fair comparison (issue 12 item 11) ------------------------------------------

def test_timing_synchronises_the_benchmarks_device_only(monkeypatch):
    synchronised = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronised.append(device))
    batches = [(torch.zeros(4, 3, 32, 32), torch.zeros(4))] * 3
    assert bench.images_per_s(batches, torch.device("cpu")) > 0
    assert synchronised == []
    assert bench.timed(lambda: 7, torch.device("cuda", 1))[1] == 7
    assert synchronised == [torch.device("cuda", 1)] * 2  # at both ends


def test_torchvision_way_pins_memory_for_cuda_only():
    images, labels = np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64)
    def loader(device):
        return bench.torchvision_way(images, labels, [0.5] * 3, [0.25] * 3, 0, 2, torch.device(device))
    assert loader("cuda").pin_memory and not loader("cpu").pin_memory
    assert loader("cpu").batch_size == 2


def test_loader_only_gives_torchvision_our_workers_batch_size_and_device(tmp_path, synthetic_data, capsys,
                                                                         monkeypatch):
    asked, real_way = {}, bench.torchvision_way
    def torchvision_way(images, labels, mean, std, workers, batch_size, device):
        asked.update(workers=workers, batch_size=batch_size, device=device)
        return real_way(images, labels, mean, std, workers, batch_size, device)
    monkeypatch.setattr(bench, "torchvision_way", torchvision_way)
    assert bench.main(["--loader-only", "--data-dir", str(synthetic_data), "--out", str(tmp_path), "--device", "cpu",
                       "--batch-size", "16", "--workers", "1", "--aug", "none"]) == 0
    assert asked == {"workers": 1, "batch_size": 16, "device": torch.device("cpu")}
    [path] = (tmp_path / "loader").glob("*.json")
    record = json.loads(path.read_text())
    assert set(record) == {"created_at", "host", "device", "device_name", "threads", "load_average", "env",
                           "command", "loader"}
    assert record["loader"]["batch_size"] == 16 and record["loader"]["workers"] == 1
    assert record["loader"]["ratio"] == pytest.approx(
        record["loader"]["ours_img_per_s"] / record["loader"]["torchvision_img_per_s"], abs=0.01)
    assert "torchvision DataLoader" in capsys.readouterr().out
