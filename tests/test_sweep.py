"""Specification of sweep.sh: its grids and run names, seeds, GPUs, shards, the preflight, the line per
ended run, Ctrl-C and resuming; and of the Makefile's locks around set-up and data (the tasks of a Slurm
array run them at once).

The fast tests need no train.py: they read `--dry-run` output or run sweeps with a fake PYTHON that
records each call and acts as told (see FAKE_PYTHON). The `test_real_*` tests at the end train tiny
configs with the real train.py on the synthetic data set; to run only the fast ones:
    python -m pytest -q tests/test_sweep.py -k "not real"
"""

import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_env

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "sweep.sh"
SETTINGS = ("GRID", "OUT", "SEEDS", "EPOCHS", "EXTRA", "PYTHON", "GPUS", "NPROC", "SHARD", "PREFLIGHT")
FLAGS_WITHOUT_VALUE = {"--pretrained", "--pool-norm", "--resume", "--quiet", "--no-compile", "--preflight"}
R18_34_50 = ["resnet18", "resnet34", "resnet50"]
# Each named grid: the flags that tell its configs apart, and their values config by config, in order.
GRIDS = {
    "default": (("arch", "pool", "opt"), itertools.product(R18_34_50, ["avg", "max"], ["sgd", "adam"])),
    "quick": (("arch", "pool", "opt", "epochs", "fraction", "batch-size"),
              itertools.product(["resnet20"], ["avg", "max"], ["sgd", "adam"], ["2"], ["0.1"], ["128"])),
    "datasize": (("arch", "fraction", "pretrained", "stem", "pool", "opt"),
                 itertools.product(["resnet18", "resnet50"], ["0.0625", "0.5", "1"], [None, True], ["imagenet"],
                                   ["avg"], ["sgd"])),
    "cifar-resnets": (("arch", "pool", "opt"), itertools.product([f"resnet{n}" for n in (20, 32, 44, 56, 110)],
                                                                  ["avg"], ["sgd"])),
    "augment": (("aug", "arch"), [(aug, "resnet18") for aug in ["none", "translate", "translate,flip",
                                  "translate,flip,rotate", "translate,flip,rotate,cutout",
                                  "translate,flip,rotate,cutout,jitter"]]),
    "optim": (("opt", "lr", "wd"), itertools.chain(itertools.product(["sgd"], ["0.1", "0.4"], ["5e-4", "5e-5"]),
                                                   itertools.product(["adam"], ["1e-3", "3e-4"], ["0", "5e-4"]),
                                                   itertools.product(["adamw"], ["1e-3", "3e-4"], ["0.05", "5e-4"]))),
    # no --lr: train.py scales sgd's lr with the batch (0.4 at 512)
    "batch": (("batch-size", "opt", "lr"), itertools.product(["64", "128", "256", "512", "1024"], ["sgd"], [None])),
    "stem": (("arch", "stem"), itertools.product(R18_34_50, ["cifar", "imagenet"])),
    "pool-head": (("arch", "pool", "pool-norm", "opt"), itertools.product(["resnet20"], ["avg", "max"], [None, True],
                                                                          ["sgd"])),
}
GRIDS = {name: (keys, list(cells)) for name, (keys, cells) in GRIDS.items()}


def sweep(*args: str, cwd: Path, timeout: float = 60, **settings) -> subprocess.CompletedProcess:
    """Run `bash sweep.sh ARGS` in cwd with exactly the given settings (GRID=..., SEEDS=...)."""
    return subprocess.run(["bash", str(SWEEP), *args], cwd=cwd, env=sweep_env(settings), capture_output=True,
                          text=True, timeout=timeout)


def sweep_env(settings: dict) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    return {**env, "PYTHON": sys.executable, **{key: str(value) for key, value in settings.items()}}


def parse_command(line: str) -> dict:
    """'CUDA_VISIBLE_DEVICES=0 python train.py --arch resnet18 --pretrained'
    -> {'gpus': '0', 'arch': 'resnet18', 'pretrained': True}"""
    words = shlex.split(line)
    train = next(i for i, word in enumerate(words) if word.endswith("train.py"))
    flags, rest = {}, words[train + 1 :]
    if words[0].startswith("CUDA_VISIBLE_DEVICES="):
        flags["gpus"] = words[0].split("=", 1)[1]
    flags["torchrun"] = "torch.distributed.run" in words[:train]
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--"), f"not a flag: {flag!r} in {line!r}"
        flags[flag[2:]] = True if flag in FLAGS_WITHOUT_VALUE else rest.pop(0)
    return flags


def dry_run(cwd: Path, *args: str, **settings) -> list[dict]:
    """The calls `sweep.sh --dry-run` prints, parsed; stdout must hold nothing else."""
    result = sweep("--dry-run", *args, cwd=cwd, **settings)
    assert result.returncode == 0, result.stderr
    return [parse_command(line) for line in result.stdout.splitlines()]


FAKE_PYTHON = r"""
# A stand-in for PYTHON. A train.py call (under torchrun or not) is appended to calls.jsonl, then acts
# as behaviour.json says for its config: {"CONFIG": {"end": "finished" | "diverged" | "crash" | "busy"
# | "interrupted", "sleep": seconds, "then": [lines printed last]}} ("finished" if not said). A finished
# record (NAME.json) makes --resume say so and end. SIGINT or SIGTERM end it as train.py does (exit 130),
# after 0.3 s. A plot.py call prints what it was given.
import json, os, signal, sys, time
from pathlib import Path

here, argv, started = Path(__file__).parent, sys.argv[1:], time.time()
if argv[0].endswith("plot.py"):
    sys.exit(print("plot.py", *argv[1:]))
torchrun = argv[:2] == ["-m", "torch.distributed.run"]
args = argv[next(i for i, word in enumerate(argv) if word.endswith("train.py")) + 1 :]
value = {flag: args[i + 1] for i, flag in enumerate(args[:-1]) if flag.startswith("--")}
name, out = value["--name"], Path(value["--out"])
call = {"name": name, "args": args, "torchrun": torchrun, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "start": started}


def end(code, *lines):
    for line in lines:
        print(line, flush=True)
    if torchrun and code:  # torchrun's own report, as torch 2.x prints it after the ranks' output
        print(f"E1123 08:37:49.667000 11127 torch/distributed/elastic/multiprocessing/api.py:1002] failed "
              f"(exitcode: {code}) local_rank: 0 (pid: 11222) of binary: {sys.executable}\nTraceback (most "
              "recent call last):\n  File \"torch/distributed/run.py\", line 1142, in <module>\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n" + "=" * 60, flush=True)
        code = 1
    with open(here / "calls.jsonl", "a") as calls:
        calls.write(json.dumps({**call, "end": time.time(), "exit": code}) + "\n")
    os._exit(code)


def stop(signum, frame):
    time.sleep(0.3)  # saving: the sweep must wait for it
    end(130, f"{name}: interrupted after epoch 0 by {signal.Signals(signum).name}")


signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
config = name.rsplit("-s", 1)[0]
behaviour = json.loads((here / "behaviour.json").read_text()).get(config, {})
if "--preflight" in args:
    if "--bogus-flag" in args:  # as argparse says it
        end(2, "usage: train.py [-h] [--arch ARCH] ...", "train.py: error: unrecognized arguments: --bogus-flag")
    end(0, f"preflight ok: {name}")
record = out / f"{name}.json"
if "--resume" in args and record.exists():
    end(0, f"{name}: already finished ({record}); nothing to resume")
time.sleep(behaviour.get("sleep", 0))
ending = behaviour.get("end", "finished")
if ending == "finished":
    record.write_text(json.dumps({"status": "finished"}))
    end(0, f"{name}: finished: test acc 50.00%, mean epoch 1.0 s, 100 img/s -> {record}")
if ending == "diverged":
    end(3, f"{name}: diverged in epoch 1 (non-finite training loss): lower --lr")
if ending == "busy":
    end(1, f"error: {name} is being trained by another process right now ({out}/checkpoints/{name}.lock is "
           "locked): wait for it, or give this run another --name", *behaviour.get("then", []))
if ending == "interrupted":
    end(130, f"{name}: interrupted after epoch 0")
end(1, "a line before the error", "error: boom")
"""


@pytest.fixture
def fake(tmp_path) -> Path:
    """A folder holding the fake PYTHON (`fake / "python"`), its behaviour.json and calls.jsonl."""
    folder = tmp_path / "fake"
    folder.mkdir()
    python = folder / "python"
    python.write_text(f"#!{sys.executable}" + FAKE_PYTHON)
    python.chmod(0o755)
    (folder / "behaviour.json").write_text("{}")
    return folder


def behave(fake: Path, **configs: dict) -> None:
    """Tell the fake train.py how each config's run goes, e.g. behave(fake, a={"end": "diverged"})."""
    (fake / "behaviour.json").write_text(json.dumps(configs))


def calls(fake: Path, preflight: bool | None = None) -> list[dict]:
    """The train.py calls the fake received, in the order they ended (all, or only the preflights or runs)."""
    path = fake / "calls.jsonl"
    ended = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [call for call in ended if preflight is None or ("--preflight" in call["args"]) == preflight]


def write_grid(folder: Path, *lines: str, name: str = "mine.txt") -> str:
    (folder / name).write_text("".join(f"{line}\n" for line in lines))
    return name


def write_finished(out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"status": "finished"}))


THREE_CONFIGS = ("a --arch cnn --opt sgd", "b --arch cnn --opt adam", "c --arch cnn --opt adamw")


# --- Grids and names ---------------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
def test_each_named_grid_is_its_configs_at_seed_0_resumed_into_its_own_folder(tmp_path, grid):
    runs = dry_run(tmp_path, GRID=grid)

    keys, cells = GRIDS[grid]
    assert [tuple(run.get(key) for key in keys) for run in runs] == cells
    assert len({run["name"] for run in runs}) == len(runs)
    for run in runs:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+,=-]*-s0", run["name"]), run["name"]
        assert (run["seed"], run["quiet"], run["resume"]) == ("0", True, True)
        assert run["out"] == ("results" if grid == "default" else f"results/{grid}")
    assert grid != "augment" or runs[2]["name"] == "resnet18-aug-translate+flip-s0"
    assert list(tmp_path.iterdir()) == [], "a dry run must not touch the disk"


# A grid file as editors save it, each of the same two configs.
EDITED_GRIDS = {
    "comments-and-blank-lines": "# two\n\nsmall  --arch cnn --opt sgd\ndeep --arch resnet20 --lr 0.1  # a comment\n",
    "crlf": "small --arch cnn --opt sgd\r\n# a comment\r\n\r\ndeep --arch resnet20 --lr 0.1\r\n",
    "bom": "\ufeffsmall --arch cnn --opt sgd\ndeep --arch resnet20 --lr 0.1\n",
    "tabs-and-trailing-spaces": "small\t--arch cnn\t--opt sgd  \n\t\ndeep --arch\tresnet20 --lr 0.1\t \n",
    "no-newline-at-the-end": "small --arch cnn --opt sgd\ndeep --arch resnet20 --lr 0.1",
    "all-at-once": "\ufeffsmall\t--arch cnn --opt sgd \t\r\n\t# a comment\r\ndeep --arch resnet20 --lr 0.1  # fast\r\n",
}


@pytest.mark.parametrize("text", EDITED_GRIDS.values(), ids=EDITED_GRIDS.keys())
def test_grid_file_from_any_editor_gives_each_config_exactly_its_arguments(tmp_path, text):
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "mine.grid").write_bytes(text.encode("utf-8"))

    result = sweep("--dry-run", cwd=tmp_path, GRID="studies/mine.grid")

    assert result.returncode == 0, result.stderr
    tail = ["--out", "results/mine", "--quiet", "--resume"]
    assert [shlex.split(line)[2:] for line in result.stdout.splitlines()] == [
        ["--arch", "cnn", "--opt", "sgd", "--seed", "0", "--name", "small-s0", *tail],
        ["--arch", "resnet20", "--lr", "0.1", "--seed", "0", "--name", "deep-s0", *tail],
    ]


BAD_SETTINGS = {
    "unknown-grid": ({"GRID": "nope"}, ["nope", *GRIDS]),
    "name-twice": ({"GRID": "twice.txt"}, ["'a'", "twice"]),
    "unsafe-name": ({"GRID": "unsafe.txt"}, ["'a/b'", "filename-safe"]),
    "empty-grid": ({"GRID": "empty.txt"}, ["no configs"]),
    "gpus-not-split-by-nproc": ({"GPUS": "0,1,2", "NPROC": 2}, ["GPUS", "NPROC"]),
    "gpus": ({"GPUS": "0,,1"}, ["GPUS"]),
    "seeds": ({"SEEDS": "0"}, ["SEEDS"]),
    "epochs": ({"EPOCHS": "two"}, ["EPOCHS"]),
    "nproc": ({"NPROC": "-1"}, ["NPROC"]),
    "preflight": ({"PREFLIGHT": "yes"}, ["PREFLIGHT"]),
    "python": ({"PYTHON": "/no/python"}, ["PYTHON", "/no/python"]),
    **{f"shard-{shard}": ({"SHARD": shard}, ["SHARD"]) for shard in ["3/3", "0/0", "1", "a/b", "-1/2", "0/2/4"]},
}


@pytest.mark.parametrize("settings, words", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_settings_fail_in_one_line_naming_them_and_write_nothing(tmp_path, settings, words):
    write_grid(tmp_path, "a --arch cnn", "a --arch resnet20", name="twice.txt")
    write_grid(tmp_path, "a/b --arch cnn", name="unsafe.txt")
    write_grid(tmp_path, "# nothing yet", name="empty.txt")

    result = sweep(cwd=tmp_path, **settings)

    assert (result.returncode, result.stdout) == (2, "")
    assert len(result.stderr.splitlines()) == 1 and all(word in result.stderr for word in words), result.stderr
    assert not (tmp_path / "results").exists()


def test_unknown_argument_fails_in_one_line(tmp_path):
    result = sweep("--bogus", cwd=tmp_path)

    assert (result.returncode, result.stdout, len(result.stderr.splitlines())) == (2, "", 1)
    assert "--bogus" in result.stderr


# --- Seeds, flags for every run, GPUs, torchrun, shards -----------------------------------------


def test_seeds_epochs_and_extra_reach_every_run_seed_0_of_each_config_first(tmp_path):
    runs = dry_run(tmp_path, SEEDS=3, EPOCHS=3, EXTRA="--data-dir /data/c10 --no-compile")

    assert [run["seed"] for run in runs] == ["0"] * 12 + ["1"] * 12 + ["2"] * 12
    assert len({run["name"] for run in runs}) == 36
    for run in runs:
        assert run["name"].endswith(f"-s{run['seed']}")
        assert (run["epochs"], run["data-dir"], run["no-compile"]) == ("3", "/data/c10", True)


@pytest.mark.parametrize("gpus, nproc, lanes", [("0,1", None, ["0", "1"]), ("0,1,2,3", 2, ["0,1", "2,3"]),
                                                (None, 2, [None])])
def test_gpus_deal_the_runs_out_in_turn_and_nproc_runs_each_under_torchrun(tmp_path, gpus, nproc, lanes):
    settings = {key: value for key, value in {"GPUS": gpus, "NPROC": nproc}.items() if value}
    runs = dry_run(tmp_path, **settings)

    assert [run.get("gpus") for run in runs] == lanes * (12 // len(lanes))
    assert all(run["torchrun"] == bool(nproc) for run in runs)


def test_shards_are_disjoint_and_cover_the_grid(tmp_path):
    everything = [run["name"] for run in dry_run(tmp_path, SEEDS=2)]
    shards = [[run["name"] for run in dry_run(tmp_path, SEEDS=2, SHARD=f"{i}/3")] for i in range(3)]

    for i, shard in enumerate(shards):
        assert shard == everything[i::3], "shard i holds the runs whose index % n == i"


# --- How a run ended: one line each -------------------------------------------------------------

BUSY = ("busy: a-s0 is being trained by another process right now (results/mine/checkpoints/a-s0.lock is locked): "
        "wait for it, or give this run another --name")
OUTCOMES = {  # behaviour, NPROC, the run's line after its name, the sweep's exit code
    "finished": ({}, None, "finished: test acc 50.00%, mean epoch 1.0 s, 100 img/s", 0),
    "already-finished": ({"planted": True}, None, "already finished (results/mine/a-s0.json); nothing to resume", 0),
    "diverged": ({"end": "diverged"}, None, "diverged in epoch 1 (non-finite training loss): lower --lr", 0),
    "diverged-torchrun": ({"end": "diverged"}, 2, "diverged in epoch 1 (non-finite training loss): lower --lr", 0),
    "crashed": ({"end": "crash"}, None, "failed (exit 1): error: boom", 1),
    "crashed-torchrun": ({"end": "crash"}, 2, "failed (exit 1): error: boom", 1),  # the rank's line, not torchrun's
    "trained-elsewhere": ({"end": "busy"}, None, BUSY, 0),
    # the log is shared: the process that trains the run writes there after this one's refusal
    "trained-elsewhere-which-logs-after": ({"end": "busy", "then": ["a-s0: diverged in epoch 1"]}, None, BUSY, 0),
    "interrupted": ({"end": "interrupted"}, None, "interrupted after epoch 0 (the same command resumes it)", 130),
    "interrupted-torchrun": ({"end": "interrupted"}, 2, "interrupted after epoch 0 (the same command resumes it)", 130),
}


@pytest.mark.parametrize("behaviour, nproc, line, exit_code", OUTCOMES.values(), ids=OUTCOMES.keys())
def test_each_ended_run_gets_a_line_with_train_pys_word_on_it(tmp_path, fake, behaviour, nproc, line, exit_code):
    grid = write_grid(tmp_path, "a --arch cnn")
    behave(fake, a=behaviour)
    if behaviour.get("planted"):
        write_finished(tmp_path / "results" / "mine", "a-s0")
    settings = {"NPROC": nproc} if nproc else {}

    result = sweep(cwd=tmp_path, GRID=grid, PYTHON=fake / "python", PREFLIGHT=0, **settings)

    assert result.returncode == exit_code, result.stdout + result.stderr
    assert re.fullmatch(rf"\[1/1\] a-s0  {re.escape(line)}  \d+s", result.stdout.strip()), result.stdout
    failed = re.search(r"^failed  a-s0 exit 1 results/mine/logs/a-s0\.log$", result.stderr, re.M)
    assert bool(failed) == line.startswith("failed"), result.stderr


def test_run_lines_count_the_runs_and_give_an_eta_from_the_runs_trained_so_far(tmp_path, fake):
    grid = write_grid(tmp_path, *THREE_CONFIGS)
    write_finished(tmp_path / "results" / "mine", "a-s0")  # skipped: no measure of a run's time
    behave(fake, b={"sleep": 1.2})

    result = sweep(cwd=tmp_path, GRID=grid, PYTHON=fake / "python", PREFLIGHT=0)

    assert result.returncode == 0, result.stderr
    a, b, c = result.stdout.splitlines()
    assert re.fullmatch(r"\[1/3\] a-s0  already finished \(.*\); nothing to resume  \d+s  ETA \?", a)
    took, eta = re.fullmatch(r"\[2/3\] b-s0  finished: .*  (\d+)s  ETA (\d+)s", b).groups()
    assert int(took) >= 1 and eta == took, "one run left, as long as the one trained"
    assert re.fullmatch(r"\[3/3\] c-s0  finished: .*  \d+s", c)
    assert re.search(r"^sweep of results/mine ended: 3 of 3 in \d+s: 2 finished, 1 skipped$", result.stderr, re.M)


def test_each_gpu_trains_its_share_of_the_runs_one_at_a_time(tmp_path, fake):
    grid = write_grid(tmp_path, *THREE_CONFIGS, "d --arch cnn")
    behave(fake, **{config: {"sleep": 0.5} for config in "abcd"})

    result = sweep(cwd=tmp_path, GRID=grid, GPUS="0,1", PYTHON=fake / "python", PREFLIGHT=0)

    assert result.returncode == 0, result.stderr
    runs = {call["name"]: call for call in calls(fake)}
    assert {name: run["gpus"] for name, run in runs.items()} == {"a-s0": "0", "b-s0": "1", "c-s0": "0", "d-s0": "1"}
    assert runs["c-s0"]["start"] >= runs["a-s0"]["end"] and runs["d-s0"]["start"] >= runs["b-s0"]["end"]
    assert runs["b-s0"]["start"] < runs["a-s0"]["end"], "the GPUs train at once"
    assert re.search(r"^\[2/2 GPU 1\] d-s0  finished", result.stdout, re.M), result.stdout


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-the-sweep"])
def test_ctrl_c_stops_every_running_run_and_waits_for_each_to_save(tmp_path, fake, how):
    grid = write_grid(tmp_path, *THREE_CONFIGS, "d --arch cnn")
    behave(fake, **{config: {"sleep": 60} for config in "abcd"})
    out = tmp_path / "results" / "mine"
    process = subprocess.Popen(["bash", str(SWEEP)], cwd=tmp_path, start_new_session=True, text=True,
                               env=sweep_env({"GRID": grid, "GPUS": "0,1", "PYTHON": fake / "python"}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not all((out / "logs" / f"{name}-s0.log").exists() for name in "ab"):  # both GPUs train
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # until the fakes have set their handlers, as train.py does once imported
    if how == "ctrl-c":  # a terminal's Ctrl-C: SIGINT to the whole foreground process group
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)

    assert process.returncode == 130, stdout + stderr
    runs = calls(fake, preflight=False)
    assert sorted(run["name"] for run in runs) == ["a-s0", "b-s0"], "no run starts after the signal"
    assert {run["exit"] for run in runs} == {130}
    assert sorted(re.findall(r"\] (\S+)  interrupted", stdout)) == ["a-s0", "b-s0"], stdout
    assert "sweep: stopping every run" in stderr


def test_status_is_plot_pys_status_of_the_results_folder(tmp_path, fake):
    result = sweep("--status", cwd=tmp_path, GRID="quick", PYTHON=fake / "python")

    assert (result.returncode, result.stdout) == (0, "plot.py --status results/quick\n"), result.stderr


# --- Preflight ----------------------------------------------------------------------------------


def test_preflight_checks_each_config_of_its_runs_once_at_seed_0_with_epochs_and_extra(tmp_path):
    (tmp_path / "results" / "models").mkdir(parents=True)
    (tmp_path / "results" / "models" / "resnet18-avg-sgd-s0.pt").touch()  # --preflight checks it all the same

    checks = dry_run(tmp_path, "--preflight", SEEDS=3, EPOCHS=2, EXTRA="--data-dir /d --no-compile")

    assert len(checks) == 12, "one check per config, not per seed"
    for check in checks:
        assert check["preflight"] is True and "resume" not in check
        assert (check["seed"], check["epochs"], check["data-dir"], check["no-compile"]) == ("0", "2", "/d", True)
    configs_of_shard = {run["name"].rsplit("-s", 1)[0] for run in dry_run(tmp_path, SEEDS=2, SHARD="1/5")}
    shard_checks = dry_run(tmp_path, "--preflight", SEEDS=2, SHARD="1/5")
    assert [check["name"] for check in shard_checks] == [
        name for name in (check["name"] for check in checks) if name.removesuffix("-s0") in configs_of_shard]


def test_preflight_names_the_config_whose_grid_line_has_an_unknown_flag(tmp_path, fake):
    grid = write_grid(tmp_path, "good --arch cnn", "typo --arch cnn --bogus-flag", "fine --arch resnet20")

    result = sweep("--preflight", cwd=tmp_path, GRID=grid, PYTHON=fake / "python")

    assert result.returncode == 1
    good, typo, fine = result.stdout.splitlines()
    assert re.fullmatch(r"preflight \[1/3\] good  ok  \d+s", good) and re.search(r"\] fine  ok  \d+s$", fine)
    assert re.fullmatch(r"preflight \[2/3\] typo  failed \(exit 2\): train.py: error: unrecognized arguments: "
                        r"--bogus-flag  \d+s", typo), typo
    assert re.search(r"^preflight ended: 3 of 3 in \d+s: 1 failed, 2 ok$", result.stderr, re.M), result.stderr
    assert "failed  typo exit 2 results/mine/logs/preflight/typo.log" in result.stderr
    assert "--bogus-flag" in (tmp_path / "results/mine/logs/preflight/typo.log").read_text()
    assert len(calls(fake, preflight=True)) == len(calls(fake)) == 3


def test_sweep_starts_no_run_when_the_preflight_fails(tmp_path, fake):
    grid = write_grid(tmp_path, "good --arch cnn", "typo --arch cnn --bogus-flag")

    result = sweep(cwd=tmp_path, GRID=grid, SEEDS=2, PYTHON=fake / "python")

    assert (result.returncode, result.stdout) == (1, ""), "no run ended"
    assert "typo" in result.stderr and "PREFLIGHT=0" in result.stderr
    assert sorted(call["name"] for call in calls(fake, preflight=True)) == ["good-s0", "typo-s0"]
    assert calls(fake, preflight=False) == [], "no training run started"


def test_sweep_preflights_the_configs_to_run_before_its_first_run_and_preflight_0_skips_it(tmp_path, fake):
    grid = write_grid(tmp_path, *THREE_CONFIGS, "d --arch cnn")
    (tmp_path / "results" / "mine" / "models").mkdir(parents=True)
    for finished in ("a-s0", "a-s1", "b-s0"):  # their weights kept: a has no run left to train
        (tmp_path / "results" / "mine" / "models" / f"{finished}.pt").touch()

    result = sweep(cwd=tmp_path, GRID=grid, SEEDS=2, PYTHON=fake / "python")

    assert result.returncode == 0, result.stderr
    assert [call["name"] for call in calls(fake, preflight=True)] == ["b-s0", "c-s0", "d-s0"]
    assert [call["name"] for call in calls(fake)][3:] == [f"{config}-s{seed}" for seed in "01" for config in "abcd"]
    assert len(result.stdout.splitlines()) == 8, "the terminal's stdout: one line per run"
    (fake / "calls.jsonl").unlink()
    assert sweep(cwd=tmp_path, GRID=write_grid(tmp_path, "d --arch cnn --bogus-flag", name="typo.txt"),
                 PYTHON=fake / "python", PREFLIGHT=0).returncode == 0
    assert [call["args"][-1] for call in calls(fake)] == ["--resume"]


def test_shards_keep_their_preflight_logs_apart(tmp_path, fake):
    grid = write_grid(tmp_path, "typo --arch cnn --bogus-flag")

    for shard in ("0/2", "1/2"):  # seed 0 of typo in shard 0, seed 1 in shard 1: both check typo
        assert sweep(cwd=tmp_path, GRID=grid, SEEDS=2, SHARD=shard, PYTHON=fake / "python").returncode == 1

    for shard in ("0-of-2", "1-of-2"):
        assert "--bogus-flag" in (tmp_path / f"results/mine/logs/preflight-shard-{shard}/typo.log").read_text()


def test_preflight_runs_under_torchrun_on_the_gpus_and_reports_the_ranks_error(tmp_path, fake):
    grid = write_grid(tmp_path, "typo --arch cnn --bogus-flag", *THREE_CONFIGS)

    result = sweep("--preflight", cwd=tmp_path, GRID=grid, GPUS="0,1,2,3", NPROC=2, PYTHON=fake / "python")

    assert result.returncode == 1
    assert all(call["torchrun"] for call in calls(fake))
    assert {call["name"]: call["gpus"] for call in calls(fake)} == {"typo-s0": "0,1", "a-s0": "2,3", "b-s0": "0,1",
                                                                    "c-s0": "2,3"}
    [line] = [line for line in result.stdout.splitlines() if " typo " in line]
    assert re.search(r"failed \(exit 1\): train.py: error: unrecognized arguments: --bogus-flag  \d+s$", line), line


# --- Makefile: set-up and data under a lock (a Slurm array's tasks all run them at once) ----------

RECORDING_COMMAND = r"""#!/bin/sh
# Stands in for python3 / .venv/bin/python: records its call and whether $LOCK was held meanwhile.
if flock -n "$LOCK" true; then held=no; else held=yes; fi
echo "$(basename "$0") $* lock-held=$held" >>"$CALLS"
case "$*" in *"-m venv .venv"*) mkdir -p .venv ;; esac
"""


def hold_lock(path: Path):
    """Take an exclusive flock on path, as another task would; close to release."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def waiting_on(lock: Path) -> int:
    """How many processes wait for a flock on this file (/proc/locks marks them '->')."""
    inode = f":{lock.stat().st_ino}"
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if " -> " in line and any(field.endswith(inode) for field in line.split()))


def start_concurrent_makes(folder: Path, lock: Path, *args: str, fake: Path, env: dict) -> list[subprocess.Popen]:
    """Two `make ARGS` at once while the test holds LOCK; returns when both wait for it."""
    makes = [subprocess.Popen(["make", "-s", *args, f"PYTHON={fake}"], cwd=folder, env=env) for _ in range(2)]
    deadline = time.monotonic() + 30
    while waiting_on(lock) < 2:
        assert all(make.poll() is None for make in makes), "a make ended without waiting for the lock"
        assert time.monotonic() < deadline, "the makes never waited for the lock"
        time.sleep(0.05)
    return makes


@pytest.fixture
def make_folder(tmp_path) -> tuple[Path, Path, dict]:
    """A folder with the Makefile and a requirements.txt; a recording python3 (on PATH) and PYTHON."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "requirements.txt").write_text("torch\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3", "python"):
        (bin_dir / name).write_text(RECORDING_COMMAND)
        (bin_dir / name).chmod(0o755)
    env = make_env(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"))
    return tmp_path, bin_dir / "python", env


def recorded(folder: Path) -> list[str]:
    path = folder / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_concurrent_setups_build_the_venv_once_under_a_lock(make_folder):
    folder, fake, env = make_folder
    lock = folder / ".venv.lock"
    env["LOCK"] = str(lock)

    with hold_lock(lock):
        makes = start_concurrent_makes(folder, lock, ".venv/.installed-pypi", fake=fake, env=env)
        assert recorded(folder) == [], "nothing runs while another task holds the lock"
    assert [make.wait(timeout=60) for make in makes] == [0, 0]

    assert recorded(folder) == [
        "python3 -m venv .venv lock-held=yes",
        "python -m pip install -q --upgrade pip lock-held=yes",
        "python -m pip install -q -r /dev/stdin lock-held=yes",
    ], "one task installs under the lock; the other then finds .venv up to date"


def test_concurrent_make_data_calls_convert_one_at_a_time(make_folder):
    folder, fake, env = make_folder
    lock = folder / "data" / ".lock"
    env["LOCK"] = str(lock)

    with hold_lock(lock):
        # -o setup: the venv and system libraries are not this test's business
        makes = start_concurrent_makes(folder, lock, "-o", "setup", "data", "DATA_DIR=data", fake=fake, env=env)
        assert recorded(folder) == []
    assert [make.wait(timeout=60) for make in makes] == [0, 0]

    assert recorded(folder) == ["python data.py --data-dir data lock-held=yes"] * 2


@pytest.mark.parametrize("grid, out", [("", "results"), ("default", "results"), ("quick", "results/quick"),
                                       ("studies/my.txt", "results/my")])
def test_make_sweep_gives_sweep_sh_the_grids_results_folder_and_plots_it(make_folder, grid, out):
    folder, fake, env = make_folder

    result = subprocess.run(["make", "-n", "-o", "data", "sweep", f"GRID={grid}", f"PYTHON={fake}"], cwd=folder,
                            env=env, capture_output=True, text=True, timeout=60)

    assert f'GRID="{grid}"' in result.stdout and f'OUT="{out}"' in result.stdout, result.stdout + result.stderr
    assert f"plot.py {out} --out {out.replace('results', 'figures')}" in result.stdout


# --- Real sweeps: train tiny configs with train.py (slow; last) ---------------------------------

def tiny_settings(data_dir: Path) -> dict:
    return {
        "GRID": "tiny.txt",
        "EXTRA": f"--data-dir {data_dir} --no-compile --amp off --channels-last --aug none --batch-size 32",
        # These tests are about runs (a broken config must fail as a run, not be stopped by the
        # preflight); the fast tests cover the preflight with a fake train.py.
        "PREFLIGHT": 0,
    }


def record(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_real_sweep_line_per_run_ctrl_c_keeps_the_checkpoint_and_the_same_command_resumes(synthetic_data, tmp_path):
    write_grid(tmp_path, "a --arch cnn --epochs 1", "b --arch cnn --pool max --epochs 3", name="tiny.txt")
    out, settings = tmp_path / "results" / "tiny", tiny_settings(synthetic_data)
    process = subprocess.Popen(["bash", str(SWEEP)], cwd=tmp_path, env=sweep_env(settings), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "b-s0.pt").exists():  # b trains its second epoch
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stdout + stderr
    a_line, b_line = stdout.splitlines()
    assert re.fullmatch(r"\[1/2\] a-s0  finished: test acc \d+\.\d\d%, mean epoch .*  \d+s  ETA \d+s", a_line), a_line
    assert re.match(r"\[2/2\] b-s0  interrupted", b_line) and (out / "checkpoints" / "b-s0.pt").exists()
    assert record(out, "a-s0")["status"] == "finished" and 0 <= record(out, "a-s0")["final"]["test_acc"] <= 1
    assert record(out, "b-s0")["status"] == "running"
    assert "--name a-s0 " in (out / "logs" / "a-s0.log").read_text()
    a_finished_at = (out / "a-s0.json").stat().st_mtime_ns

    result = sweep(cwd=tmp_path, timeout=600, **settings)

    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\] a-s0  already finished", result.stdout), result.stdout
    assert (out / "a-s0.json").stat().st_mtime_ns == a_finished_at
    assert "b-s0: resuming after epoch" in (out / "logs" / "b-s0.log").read_text()
    assert [row["epoch"] for row in record(out, "b-s0")["history"]] == [1, 2, 3]


def test_real_failing_config_does_not_stop_the_sweep_and_a_locked_run_is_left_alone(synthetic_data, tmp_path):
    write_grid(tmp_path, "broken --arch nope", "boom --arch cnn --lr 1e12 --epochs 1", "locked --arch cnn",
               name="tiny.txt")
    out = tmp_path / "results" / "tiny"

    with hold_lock(out / "checkpoints" / "locked-s0.lock"):  # another sweep trains it
        result = sweep(cwd=tmp_path, timeout=600, **tiny_settings(synthetic_data))

    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^failed  broken-s0 exit 2 results/tiny/logs/broken-s0\.log$", result.stderr, re.M)
    assert re.search(r"\] locked-s0  busy: locked-s0 is being trained by another process", result.stdout)
    assert not (out / "locked-s0.json").exists()
    assert record(out, "boom-s0")["status"] == "diverged"  # after a failed config: the sweep goes on
