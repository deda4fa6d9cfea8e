"""train.py end to end on tiny synthetic data, run as the user runs it: a subprocess."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
import speed
import train as train_module
from conftest import ROOT, TEST_PER_CLASS, TINY, record, run_env, tiny_model, train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_data):
    tmp_path = tmp_path_factory.mktemp("run")
    train(tmp_path, synthetic_data, "--epochs", "4", "--batch-size", "16", "--lr", "0.1", "--val-split", "0.2",
          "--name", "full", switches=("--no-compile",))  # amp and layout on auto
    return tmp_path, record(tmp_path, "full")


def test_run_writes_a_complete_consistent_record(finished_run):
    _, run = finished_run
    assert run["schema_version"] == 1 and run["status"] == "finished"
    assert run["started_at"] <= run["ended_at"]
    for key in ("python", "torch", "torchvision", "ffcv", "numpy", "device_name", "threads", "git_commit"):
        assert key in run["env"]
    assert run["model"]["params"] == 269_722 and run["model"]["flops_per_image"] > 0
    assert run["factors"] == {  # what was trained: no seed, no run control, no derived value not given
        "arch": "resnet20", "pool": "avg", "opt": "sgd", "stem": "cifar", "pretrained": False, "pool_norm": False,
        "fraction": 1.0, "epochs": 4, "batch_size": 16, "val_split": 0.2, "aug": "none", "tta": False, "lr": 0.1,
        "gamma": 0.1, "label_smoothing": 0.1, "sync_bn": False, "early_stop": None}
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
    # chance is 0.1 (the label is written in the red channel): 25 of the 100 test images right is far beyond it
    # (binomial p = 1.3e-5); bf16 autocast, which auto takes where it is faster, learns slower in 44 steps
    assert run["final"]["test_acc"] >= 0.25


def test_from_reproduces_the_config(finished_run, synthetic_data):
    tmp_path, run = finished_run
    command = [sys.executable, str(ROOT / "train.py"), "--from", str(tmp_path / "results" / "full.json"),
               "--name", "again", "--epochs", "1"]
    assert subprocess.run(command, capture_output=True, env=run_env(), timeout=600).returncode == 0
    again = record(tmp_path, "again")
    differing = {k for k in run["config"] if run["config"][k] != again["config"][k]}
    # what was given on the command line, and the warm-up derived from the new --epochs
    assert differing == {"name", "epochs", "warmup_epochs"}
    assert again["config"]["warmup_epochs"] == pytest.approx(0.2) and again["given"]["lr"] == 0.1


def test_compiled_run_does_not_recompile_after_warm_up(tmp_path, synthetic_data):
    result = train(tmp_path, synthetic_data, "--arch", "cnn", "--compile", "--epochs", "2", "--val-split", "0.1",
                   "--name", "compiled")
    run = record(tmp_path, "compiled")
    assert run["status"] == "finished", result.stdout
    assert run["final"]["recompiles"] == 0
    assert run["run"]["compile_time_s"] > 0 and run["run"]["compile"] is True


def test_auto_switches_on_cpu_take_the_fastest_probe_and_record_it(finished_run):
    _, run = finished_run
    assert (run["config"]["amp"], run["config"]["channels_last"], run["config"]["compile"]) == ("auto", None, False)
    probes = run["run"]["probe_img_per_s"]
    assert set(probes) == {"fp32 NCHW", "fp32 channels-last", "bf16 NCHW", "bf16 channels-last"}
    assert all(rate > 0 for rate in probes.values())
    chosen = f"{run['run']['amp']} {'channels-last' if run['run']['channels_last'] else 'NCHW'}"
    fastest = max(probes.values())
    assert probes[chosen] == fastest if fastest >= 1.05 * probes["fp32 NCHW"] else chosen == "fp32 NCHW"
    assert run["run"]["amp_reason"].startswith("auto on CPU") and run["run"]["compile_reason"] == "asked"
    assert run["run"]["compile"] is False


def test_a_config_run_twice_reuses_the_cpu_decision_and_trains_identically(tmp_path, synthetic_data, monkeypatch):
    """The default augmentation, on the device and seeded, and the switches decided once: the second
    run of a config and seed has the same losses, step for step. A switch given still decides alone."""
    monkeypatch.setenv("CIFAR_SWITCH_CACHE", str(tmp_path / "switches.json"))
    flags = ("--epochs", "1", "--aug", "flip,translate", "--no-compile")
    for name in ("first", "second"):
        train(tmp_path, synthetic_data, *flags, "--name", name, switches=())
    first, second = record(tmp_path, "first"), record(tmp_path, "second")
    assert first["run"]["decision"] == "measured" and first["run"]["startup_s"]["probes"] > 0
    assert second["run"]["decision"].startswith("reused from") and second["run"]["startup_s"]["probes"] == 0
    assert second["run"]["probe_img_per_s"] == first["run"]["probe_img_per_s"]
    for key in ("first_step_loss", "train_loss", "test_loss"):
        assert second["history"][0][key] == first["history"][0][key], key
    train(tmp_path, synthetic_data, *flags, "--amp", "fp32", "--channels-last", "--name", "given", switches=())
    given = record(tmp_path, "given")["run"]
    assert given["decision"] == "given" and given["probe_img_per_s"] == {} and given["amp"] == "fp32"
    startup = first["run"]["startup_s"]
    assert set(startup) == {"imports", "setup", "data_checks", "loaders", "model", "probes", "compile", "record",
                            "total"}
    assert startup["total"] == pytest.approx(sum(v for k, v in startup.items() if k != "total"))
    assert startup["imports"] > 0.1 and startup["compile"] == 0


def test_a_reused_cpu_decision_compiles_only_if_this_run_repays_the_compile(tmp_path, synthetic_data, monkeypatch):
    """The cache holds a decision that compiled (a long run repaid it); a 1-epoch run of the same network
    weighs it again against its own length and stays eager, saying why."""
    cache = tmp_path / "switches.json"
    monkeypatch.setenv("CIFAR_SWITCH_CACHE", str(cache))
    flags = ("--epochs", "1", "--channels-last")  # amp left to auto: the run has a key
    train(tmp_path, synthetic_data, *flags, "--no-compile", "--name", "measured", switches=())
    (key, decision), = json.loads(cache.read_text()).items()
    auto_key = json.dumps({**json.loads(key), "compile": None}, sort_keys=True)  # the key with compile on auto
    rates = {"compiled": 2000, "eager": 1000}  # 1/2000 s saved per image
    cache.write_text(json.dumps({auto_key: {**decision, "compile": True, "compile_probe_img_per_s": rates,
                                            "probe_compile_s": 30.0}}))
    train(tmp_path, synthetic_data, *flags, "--name", "short", switches=())
    run = record(tmp_path, "short")["run"]
    images = run["steps_per_epoch"] * 32  # one epoch of whole batches of 32
    assert run["decision"].startswith("reused from") and run["compile"] is False and run["compile_time_s"] == 0
    assert f"save the run's {images:,} training images more time than compiling took " \
           f"({images / 2000:.1f} s against 30.0 s)" in run["compile_reason"]


def test_compile_auto_on_cpu_is_kept_only_if_faster_by_the_margin_and_repaid_by_the_run():
    switches = {"compile_probe_img_per_s": {"compiled": 1500, "eager": 1000}, "probe_compile_s": 30.0}
    for images, kept in ((10_000, False), (89_000, False), (91_000, True), (None, True)):  # 90,000 save 30 s
        speed.decide_compile(switches, images)
        assert switches["compile"] is kept, images
    switches["compile_probe_img_per_s"] = {"compiled": 1040, "eager": 1000}  # faster, within the noise
    speed.decide_compile(switches, 10**9)
    assert switches["compile"] is False


@pytest.mark.parametrize("rates, chosen", [
    ({("fp32", False): 100, ("fp32", True): 104, ("bf16", False): 90, ("bf16", True): 103},
     ("fp32", False)),  # nothing beats fp32 NCHW by 5%: within the noise, keep the plain step
    ({("fp32", False): 100, ("fp32", True): 120, ("bf16", False): 90, ("bf16", True): 150},
     ("bf16", True)),
    ({("fp32", False): 100, ("fp32", True): 110, ("bf16", False): 50, ("bf16", True): 60},
     ("fp32", True)),
])
def test_auto_on_cpu_takes_a_switch_only_if_it_pays_by_the_margin_timing_the_modes_in_turns(monkeypatch, rates,
                                                                                            chosen):
    calls = []

    def fake_rate(model, raw_model, amp, batch_size, device, memory):  # a burst of load halves calls 3 to 5
        calls.append((amp, memory == torch.channels_last))
        return rates[calls[-1]] / (2 if 3 <= len(calls) - 1 <= 5 else 1)
    monkeypatch.setattr(speed, "step_rate", fake_rate)
    args = train_module.parse_config([])
    args.batch_size_per_rank = 512
    switches = speed.choose_switches(args, tiny_model(), torch.device("cpu"))
    assert calls == list(rates) * speed.PROBE_ROUNDS  # every mode once per round: the burst decides nothing
    assert (switches["amp"], switches["channels_last"]) == chosen and switches["compile"] is None
    assert list(switches["probe_img_per_s"].values()) == list(rates.values())
    for compiled, kept in ((104, False), (120, True)):
        monkeypatch.setattr(speed, "step_rate",
                            lambda model, *rest, rate=compiled: rate if model == "compiled" else 100)
        speed.keep_compile_if_faster(switches, "compiled", "eager", tiny_model(), torch.device("cpu"), 512)
        assert switches["compile"] is kept and switches["compile_probe_img_per_s"] == {"compiled": compiled,
                                                                                       "eager": 100}


class Slow(torch.nn.Module):
    """Stands in for a compiled model that loses to eager: the same weights, a slower forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        time.sleep(0.05)
        return self.model(x)


def test_compile_auto_on_cpu_keeps_eager_when_compiled_steps_are_slower_and_leaves_the_model_as_it_was():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    switches = {"amp": "fp32", "channels_last": True, "compile": None}
    speed.keep_compile_if_faster(switches, Slow(model), model, model, torch.device("cpu"), batch_size=8)
    assert switches["compile"] is False
    rates = switches["compile_probe_img_per_s"]
    assert rates["compiled"] < rates["eager"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN statistics
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_asked_switches_are_not_probed_and_cuda_auto_turns_all_on(monkeypatch):
    args = train_module.parse_config(["--amp", "bf16", "--no-channels-last", "--compile"])
    args.batch_size_per_rank = 8
    switches = speed.choose_switches(args, tiny_model(), torch.device("cpu"))
    assert (switches["amp"], switches["channels_last"], switches["compile"]) == ("bf16", False, True)
    assert switches["probe_img_per_s"] == {} and switches["amp_reason"] == "asked"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    auto = train_module.parse_config([])
    auto.batch_size_per_rank = 8
    switches = speed.choose_switches(auto, tiny_model(), torch.device("cuda"))  # nothing runs on it
    assert (switches["amp"], switches["channels_last"], switches["compile"]) == ("fp16", True, True)


def test_preflight_runs_the_real_path_in_a_temporary_folder_and_says_ok(tmp_path, synthetic_data):
    result = train(tmp_path, synthetic_data, "--preflight", "--compile", "--arch", "cnn", "--val-split", "0.2",
                   "--epochs", "30", "--name", "pre")
    assert "preflight ok: pre" in result.stdout
    assert not (tmp_path / "results").exists()  # nothing of the real run's folder is touched
    broken = train(tmp_path, synthetic_data, "--preflight", "--arch", "resnet_custom", "--blocks", "3,4",
                   "--channels", "32", check=False)
    assert broken.returncode == 1 and broken.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in broken.stderr


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_default_workers_run_on_a_single_allowed_cpu(tmp_path, synthetic_data):
    """Slurm --cpus-per-task=1, taskset or a container cpuset: numba refuses more threads than the
    CPUs the process may use, so the default workers must follow the affinity, not os.cpu_count()."""
    command = ["taskset", "-c", "0", sys.executable, str(ROOT / "train.py"), *TINY, "--epochs", "1",
               "--data-dir", str(synthetic_data), "--out", str(tmp_path / "results"), "--name", "one-cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=run_env(), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert record(tmp_path, "one-cpu")["status"] == "finished"


def test_amp_off_is_a_spelling_of_fp32_and_autocast_takes_the_one_vocabulary():
    assert train_module.parse_config(["--amp", "off"]).amp == "fp32"
    with speed.autocast(torch.device("cpu"), "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with speed.autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
