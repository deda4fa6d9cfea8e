"""Specification of sweep.sh: its grids and run names, seeds, shards, locking and resuming, and of
the Makefile's locks around set-up and data (the tasks of a Slurm array run them at once).

The fast tests need no train.py: they read `--dry-run` output, plant result JSONs, or run sweeps
with a fake PYTHON that records each train.py call and acts as told (see FAKE_TRAIN). The
`test_real_*` tests at the end train tiny configs with the real train.py on the synthetic data
set; to run only the fast ones:  python -m pytest -q tests/test_sweep.py -k "not real"
"""

import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_env

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "sweep.sh"
SETTINGS = ("GRID", "OUT", "SEEDS", "EPOCHS", "EXTRA", "PYTHON", "GPUS", "NPROC", "SHARD", "PREFLIGHT")
GRID_SIZES = {
    "default": 12,
    "quick": 4,
    "datasize": 12,
    "cifar-resnets": 5,
    "augment": 6,
    "optim": 12,
    "batch": 5,
    "stem": 6,
}
FLAGS_WITHOUT_VALUE = {"--pretrained", "--resume", "--quiet", "--no-compile", "--preflight"}


def sweep(*args: str, cwd: Path, timeout: float = 60, **settings) -> subprocess.CompletedProcess:
    """Run `bash sweep.sh ARGS` in cwd with exactly the given settings (GRID=..., SEEDS=...)."""
    env = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    env["PYTHON"] = sys.executable
    env.update({key: str(value) for key, value in settings.items()})
    return subprocess.run(
        ["bash", str(SWEEP), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_command(line: str) -> dict:
    """'python train.py --arch resnet18 --pretrained' -> {'arch': 'resnet18', 'pretrained': True}"""
    words = shlex.split(line)
    train = next(i for i, word in enumerate(words) if word.endswith("train.py"))
    flags, rest = {}, words[train + 1 :]
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--"), f"not a flag: {flag!r} in {line!r}"
        flags[flag[2:]] = True if flag in FLAGS_WITHOUT_VALUE else rest.pop(0)
    return flags


def dry_run(cwd: Path, **settings) -> list[dict]:
    """The runs `sweep.sh --dry-run` would start, parsed; stdout must hold nothing else."""
    result = sweep("--dry-run", cwd=cwd, **settings)
    assert result.returncode == 0, result.stderr
    return [parse_command(line) for line in result.stdout.splitlines()]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr


def write_result(out: Path, name: str, status: str, test_acc: float = 0.5) -> Path:
    """Plant OUT/NAME.json as train.py would leave it."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"status": status}
    if status == "finished":
        record["final"] = {"test_acc": test_acc, "mean_epoch_time_s": 1.0}
    path = out / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


def hold_lock(path: Path, mode: int):
    """Take a flock on path (LOCK_EX or LOCK_SH), as a running sweep would; close to release."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "w")
    fcntl.flock(handle, mode | fcntl.LOCK_NB)
    return handle


FAKE_TRAIN = r"""
# A stand-in for PYTHON: `-c` goes to the real interpreter (sweep.sh reads JSONs so); a train.py
# call, under torchrun or not, is recorded in calls.jsonl, then acts as behaviour.json says for its
# config, e.g. {"CONFIG": {"status": "diverged", "exit": 1, "epoch_time_s": 60, "done": 1}}
# (status "none": write no JSON; done: epochs in its history; wait_for: a file to wait for before
# ending; touch: a file to create when ending).
import json, os, sys, time
from pathlib import Path

here = Path(__file__).parent
argv = sys.argv[1:]
if argv[:1] == ["-c"]:
    os.execv(sys.executable, [sys.executable, *argv])
torchrun = argv[:2] == ["-m", "torch.distributed.run"]
args = argv[next(i for i, word in enumerate(argv) if word.endswith("train.py")) + 1 :]
with open(here / "calls.jsonl", "a") as calls:
    calls.write(json.dumps({"args": args, "torchrun": torchrun, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
value = {flag: args[i + 1] for i, flag in enumerate(args[:-1]) if flag.startswith("--")}
config = value["--name"].rsplit("-s", 1)[0]
behaviour = json.loads((here / "behaviour.json").read_text()).get(config, {})

if "--preflight" in args:
    if "--bogus-flag" in args:  # as argparse says it
        print("usage: train.py [-h] [--arch ARCH] ...", file=sys.stderr)
        print("train.py: error: unrecognized arguments: --bogus-flag", file=sys.stderr)
        code = 2
    else:
        print("preflight: 2 steps and 1 eval batch ok")
        code = 0
else:
    status = behaviour.get("status", "finished")
    code = behaviour.get("exit", {"finished": 0, "diverged": 3}.get(status, 1))
    epochs, epoch_time = int(value.get("--epochs", 2)), behaviour.get("epoch_time_s", 1.0)
    history = [{"epoch": e + 1, "epoch_time_s": epoch_time} for e in range(behaviour.get("done", epochs))]
    record = {"status": status, "config": {"epochs": epochs}, "history": history}
    if status == "finished":
        record["final"] = {"test_acc": 0.5, "mean_epoch_time_s": epoch_time}
    deadline = time.monotonic() + 30
    while "wait_for" in behaviour and not Path(behaviour["wait_for"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if status != "none":
        Path(value["--out"], value["--name"] + ".json").write_text(json.dumps(record))
    if "touch" in behaviour:
        Path(behaviour["touch"]).touch()
    print(f"{value['--name']}: {status}")
if torchrun and code != 0:  # torchrun's own report, as torch 2.x prints it after the ranks' output
    print("E1123 08:37:49.667000 11127 torch/distributed/elastic/multiprocessing/api.py:1002] "
          f"failed (exitcode: {code}) local_rank: 0 (pid: 11222) of binary: {sys.executable}", file=sys.stderr)
    print("Traceback (most recent call last):", file=sys.stderr)
    print('  File "torch/distributed/run.py", line 1142, in <module>', file=sys.stderr)
    print("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", file=sys.stderr)
    print("=" * 60, file=sys.stderr)
    code = 1
sys.exit(code)
"""


@pytest.fixture
def fake(tmp_path) -> Path:
    """A folder holding the fake PYTHON (`fake / "python"`), its behaviour.json and calls.jsonl."""
    folder = tmp_path / "fake"
    folder.mkdir()
    python = folder / "python"
    python.write_text(f"#!{sys.executable}" + FAKE_TRAIN)
    python.chmod(0o755)
    (folder / "behaviour.json").write_text("{}")
    return folder


def behave(fake: Path, **configs: dict) -> None:
    """Tell the fake train.py how each config's run ends, e.g. behave(fake, a={"status": "diverged"})."""
    (fake / "behaviour.json").write_text(json.dumps(configs))


def calls(fake: Path) -> list[dict]:
    """The train.py calls the fake received, in order: {"args": [...], "torchrun": bool, "gpus": str | None}."""
    path = fake / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def is_preflight(call: dict) -> bool:
    return "--preflight" in call["args"]


def name_of(call: dict) -> str:
    return call["args"][call["args"].index("--name") + 1]


def write_grid(folder: Path, *lines: str, name: str = "mine.grid") -> str:
    (folder / name).write_text("".join(f"{line}\n" for line in lines))
    return name


THREE_CONFIGS = ("a --arch cnn --opt sgd", "b --arch cnn --opt adam", "c --arch cnn --opt adamw")


# --- Grids and names ---------------------------------------------------------------------------


def test_default_grid_is_the_original_12_config_comparison(tmp_path):
    runs = dry_run(tmp_path)

    expected = itertools.product(["resnet18", "resnet34", "resnet50"], ["avg", "max"], ["sgd", "adam"])
    assert sorted((r["arch"], r["pool"], r["opt"]) for r in runs) == sorted(expected)
    for run in runs:
        assert run["name"] == f"{run['arch']}-{run['pool']}-{run['opt']}-s0"
        assert (run["seed"], run["out"], run["quiet"]) == ("0", "results", True)
        assert "resume" not in run
    assert not (tmp_path / "results").exists(), "a dry run must not touch the disk"


@pytest.mark.parametrize("grid", GRID_SIZES)
def test_each_named_grid_has_its_size_unique_names_and_own_results_folder(tmp_path, grid):
    runs = dry_run(tmp_path, GRID=grid)

    assert len(runs) == GRID_SIZES[grid]
    assert len({r["name"] for r in runs}) == len(runs)
    assert {r["out"] for r in runs} == {"results" if grid == "default" else f"results/{grid}"}
    for run in runs:
        assert {"arch", "pool", "opt"} <= run.keys()
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+,=-]*-s0", run["name"]), run["name"]


def test_datasize_grid_varies_only_train_fraction_and_pretraining(tmp_path):
    runs = dry_run(tmp_path, GRID="datasize")

    assert {r["stem"] for r in runs} == {"imagenet"}
    cells = Counter((r["arch"], r["fraction"], r.get("pretrained", False)) for r in runs)
    expected = itertools.product(["resnet18", "resnet50"], ["0.0625", "0.5", "1"], [False, True])
    assert cells == Counter(expected)
    assert "resnet18-f0.0625-pretrained-s0" in {r["name"] for r in runs}


def test_cifar_resnets_grid_covers_the_five_depths(tmp_path):
    runs = dry_run(tmp_path, GRID="cifar-resnets")

    assert [r["arch"] for r in runs] == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    assert {(r["pool"], r["opt"]) for r in runs} == {("avg", "sgd")}


def test_augment_grid_adds_one_augmentation_at_a_time(tmp_path):
    runs = dry_run(tmp_path, GRID="augment")

    augs = [r["aug"] for r in runs]
    assert augs[0] == "none"
    assert augs[1:] == [
        "translate",
        "translate,flip",
        "translate,flip,rotate",
        "translate,flip,rotate,cutout",
        "translate,flip,rotate,cutout,jitter",
    ]
    assert runs[2]["name"] == "resnet18-aug-translate+flip-s0"


def test_optim_grid_crosses_learning_rates_and_weight_decays_per_optimizer(tmp_path):
    runs = dry_run(tmp_path, GRID="optim")

    cells = {(r["opt"], r["lr"], r["wd"]) for r in runs}
    assert cells == {
        *itertools.product(["sgd"], ["0.1", "0.4"], ["5e-4", "5e-5"]),
        *itertools.product(["adam"], ["1e-3", "3e-4"], ["0", "5e-4"]),
        *itertools.product(["adamw"], ["1e-3", "3e-4"], ["0.05", "5e-4"]),
    }


def test_batch_grid_varies_batch_size_and_leaves_lr_to_train_pys_linear_scaling(tmp_path):
    runs = dry_run(tmp_path, GRID="batch")

    assert [int(r["batch-size"]) for r in runs] == [64, 128, 256, 512, 1024]
    assert {r["opt"] for r in runs} == {"sgd"}
    assert not any("lr" in r for r in runs), "train.py scales sgd's lr: 0.4 at batch 512"


def test_stem_grid_pairs_cifar_and_imagenet_stems_per_depth(tmp_path):
    runs = dry_run(tmp_path, GRID="stem")

    expected = itertools.product(["resnet18", "resnet34", "resnet50"], ["cifar", "imagenet"])
    assert sorted((r["arch"], r["stem"]) for r in runs) == sorted(expected)


def test_grid_file_gives_one_run_per_config_line(tmp_path):
    grid = tmp_path / "grids" / "mine.grid"
    grid.parent.mkdir()
    grid.write_text(
        "# two configs\n"
        "\n"
        "small  --arch cnn --pool avg --opt sgd\n"
        "deep --arch resnet110 --pool max --opt adam --lr 1e-3  # a comment\n"
    )
    runs = dry_run(tmp_path, GRID="grids/mine.grid")

    assert [r["name"] for r in runs] == ["small-s0", "deep-s0"]
    assert (runs[1]["arch"], runs[1]["pool"], runs[1]["opt"], runs[1]["lr"]) == (
        "resnet110",
        "max",
        "adam",
        "1e-3",
    )
    assert {r["out"] for r in runs} == {"results/mine"}


# A grid file as other editors save it, each from the same two configs.
EDITED_GRIDS = {
    "crlf": "small --arch cnn --opt sgd\r\n# a comment\r\n\r\ndeep --arch resnet20 --lr 0.1\r\n",
    "bom": "\ufeffsmall --arch cnn --opt sgd\ndeep --arch resnet20 --lr 0.1\n",
    "tabs-and-trailing-spaces": "small\t--arch cnn\t--opt sgd  \n\t\ndeep --arch\tresnet20 --lr 0.1\t \n",
    "all-at-once": "\ufeffsmall\t--arch cnn --opt sgd \t\r\n\t# a comment\r\ndeep --arch resnet20 --lr 0.1  # fast\r\n",
}


@pytest.mark.parametrize("text", EDITED_GRIDS.values(), ids=EDITED_GRIDS.keys())
def test_grid_file_from_any_editor_runs_its_configs_with_exactly_their_arguments(tmp_path, fake, text):
    (tmp_path / "mine.grid").write_bytes(text.encode("utf-8"))

    result = sweep(cwd=tmp_path, GRID="mine.grid", PYTHON=fake / "python")

    assert result.returncode == 0, result.stdout + result.stderr
    runs = [call["args"] for call in calls(fake) if not is_preflight(call)]
    tail = ["--out", "results/mine", "--quiet"]
    assert runs == [["--arch", "cnn", "--opt", "sgd", "--seed", "0", "--name", "small-s0", *tail],
                    ["--arch", "resnet20", "--lr", "0.1", "--seed", "0", "--name", "deep-s0", *tail]]


def test_grid_file_with_a_repeated_name_is_refused(tmp_path):
    (tmp_path / "twice.grid").write_text("a --arch cnn\na --arch resnet20\n")

    assert "'a'" in one_line_error(sweep("--dry-run", cwd=tmp_path, GRID="twice.grid"))


def test_unknown_grid_fails_with_a_one_line_message_listing_the_grids(tmp_path):
    message = one_line_error(sweep("--dry-run", cwd=tmp_path, GRID="nope"))

    assert "nope" in message
    for grid in GRID_SIZES:
        assert grid in message


# --- Seeds, flags for every run, torchrun -------------------------------------------------------


def test_seeds_run_every_config_with_seeds_0_to_n_minus_1(tmp_path):
    runs = dry_run(tmp_path, SEEDS=3)

    assert len(runs) == 36
    assert Counter(r["seed"] for r in runs) == {"0": 12, "1": 12, "2": 12}
    assert all(r["name"].endswith(f"-s{r['seed']}") for r in runs)
    assert len({r["name"] for r in runs}) == 36


def test_epochs_and_extra_reach_every_run(tmp_path):
    runs = dry_run(tmp_path, GRID="stem", EPOCHS=3, EXTRA="--data-dir /data/c10 --no-compile")

    for run in runs:
        assert (run["epochs"], run["data-dir"], run["no-compile"]) == ("3", "/data/c10", True)


def test_nproc_runs_each_config_under_torchrun(tmp_path):
    result = sweep("--dry-run", cwd=tmp_path, NPROC=2, GPUS="0,1,2,3")

    lines = result.stdout.splitlines()
    assert len(lines) == 12
    for line in lines:
        assert "-m torch.distributed.run --standalone --nproc_per_node=2 " in line


def test_gpus_must_split_evenly_into_groups_of_nproc(tmp_path):
    assert "GPUS" in one_line_error(sweep("--dry-run", cwd=tmp_path, NPROC=2, GPUS="0,1,2"))


# --- Shards -------------------------------------------------------------------------------------


def test_shards_are_disjoint_and_cover_the_grid(tmp_path):
    everything = [r["name"] for r in dry_run(tmp_path, SEEDS=2)]
    shards = [[r["name"] for r in dry_run(tmp_path, SEEDS=2, SHARD=f"{i}/3")] for i in range(3)]

    assert sorted(itertools.chain(*shards)) == sorted(everything)
    for i, shard in enumerate(shards):
        assert shard == everything[i::3], "shard i holds the runs whose index % n == i"


@pytest.mark.parametrize("shard", ["3/3", "0/0", "1", "a/b", "-1/2", "0/2/4"])
def test_invalid_shard_fails_with_a_one_line_message(tmp_path, shard):
    assert "SHARD" in one_line_error(sweep("--dry-run", cwd=tmp_path, SHARD=shard))


# --- Resuming -----------------------------------------------------------------------------------


def test_dry_run_skips_finished_and_diverged_runs_and_resumes_running_ones(tmp_path):
    out = tmp_path / "results"
    write_result(out, "resnet18-avg-sgd-s0", "finished")
    write_result(out, "resnet18-avg-adam-s0", "diverged")
    write_result(out, "resnet18-max-sgd-s0", "running")
    (out / "resnet18-max-adam-s0.json").write_text('{"status": "fini')  # torn: start over

    runs = {r["name"]: r for r in dry_run(tmp_path)}

    assert len(runs) == 10
    assert "resnet18-avg-sgd-s0" not in runs and "resnet18-avg-adam-s0" not in runs
    assert runs["resnet18-max-sgd-s0"].get("resume") is True
    assert [name for name, run in runs.items() if "resume" in run] == ["resnet18-max-sgd-s0"]


def test_sweep_whose_runs_all_finished_trains_nothing(tmp_path):
    for run in dry_run(tmp_path, GRID="stem"):
        write_result(tmp_path / "results" / "stem", run["name"], "finished")

    result = sweep(cwd=tmp_path, GRID="stem")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("skip") == 6
    assert list((tmp_path / "results" / "stem" / "logs").iterdir()) == []


# --- How a run ended ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviour, nproc, outcome, sweep_exit",
    [
        ({"status": "diverged", "exit": 1}, 2, "diverged", 0),  # torchrun turns exit 3 into 1
        ({"status": "diverged"}, None, "diverged", 0),
        ({"status": "finished", "exit": 1}, 2, "finished", 0),  # e.g. a failing teardown after the record
        ({"status": "running", "exit": 1}, 2, "failed (exit 1, status running)", 1),
        ({"status": "none", "exit": 0}, None, "failed (exit 0, status missing)", 1),  # exit 0, no record
        ({"status": "running", "exit": 130}, None, "interrupted", 130),
    ],
    ids=["diverged-torchrun", "diverged", "finished-torchrun", "crashed-torchrun", "no-record", "interrupted"],
)
def test_run_outcome_comes_from_its_json_status_not_its_exit_code(tmp_path, fake, behaviour, nproc, outcome,
                                                                  sweep_exit):
    grid = write_grid(tmp_path, "a --arch cnn")
    behave(fake, a=behaviour)
    settings = {"NPROC": nproc} if nproc else {}

    result = sweep(cwd=tmp_path, GRID=grid, PYTHON=fake / "python", PREFLIGHT=0, **settings)

    assert result.returncode == sweep_exit, result.stdout + result.stderr
    assert re.match(rf"\[1/1\] a-s0  {re.escape(outcome)}  ", result.stdout), result.stdout
    assert ("failed  a-s0" in result.stderr) == outcome.startswith("failed")


# --- Progress and status ------------------------------------------------------------------------


def test_progress_lines_give_each_runs_time_and_the_time_left_from_measured_epochs(tmp_path, fake):
    grid = write_grid(tmp_path, *THREE_CONFIGS)
    behave(fake, **{config: {"epoch_time_s": 100} for config in "abc"})

    result = sweep(cwd=tmp_path, GRID=grid, EPOCHS=2, PYTHON=fake / "python", PREFLIGHT=0)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # one run measured: 100 s per epoch, 2 epochs for each of the 2 runs left, one slot
    assert re.fullmatch(r"\[1/3\] a-s0  finished  test_acc 50\.00%  \d+s  ETA 6m40s", lines[0])
    assert re.fullmatch(r"\[2/3\] b-s0  finished  test_acc 50\.00%  \d+s  ETA 3m20s", lines[1])
    assert re.fullmatch(r"\[3/3\] c-s0  finished  test_acc 50\.00%  \d+s", lines[2])
    assert "start  b-s0  (run 2 of 3)" in result.stderr
    assert re.search(r"3 of 3 runs ended in \d+s, 0 failed", result.stderr)


def test_time_left_counts_the_epochs_left_of_resumed_runs_and_divides_by_the_slots(tmp_path, fake):
    grid = write_grid(tmp_path, *THREE_CONFIGS)
    out = tmp_path / "results" / "mine"
    out.mkdir(parents=True)
    (out / "c-s0.json").write_text(json.dumps({"status": "running", "config": {"epochs": 4},
                                               "history": [{"epoch": 1, "epoch_time_s": 60, "eval_time_s": 40}]}))
    # a ends first: b (on the other GPU) waits until c, which starts after a, has ended
    c_ended = str(tmp_path / "c-ended")
    behave(fake, a={"epoch_time_s": 100}, b={"wait_for": c_ended}, c={"touch": c_ended})

    result = sweep(cwd=tmp_path, GRID=grid, GPUS="0,1", PYTHON=fake / "python", PREFLIGHT=0)

    assert result.returncode == 0, result.stderr
    # measured: a's 2 epochs and c's 1, 100 s each; left: b's 3 (the recorded runs' mean: 2 and 4)
    # and c's 4 - 1; over 2 GPUs: 6 x 100 s / 2
    assert re.fullmatch(r"\[1/3\] a-s0  finished  test_acc 50\.00%  \d+s  ETA 5m00s", result.stdout.splitlines()[0])
    assert "start  c-s0  (run 3 of 3, GPU 0)" in result.stderr


def test_time_left_falls_back_to_the_wall_time_of_ended_runs_when_no_epoch_is_measured(tmp_path, fake):
    grid = write_grid(tmp_path, *THREE_CONFIGS)
    behave(fake, **{config: {"done": 0} for config in "abc"})

    result = sweep(cwd=tmp_path, GRID=grid, PYTHON=fake / "python", PREFLIGHT=0)

    assert re.search(r"  ETA \d+s$", result.stdout.splitlines()[0]), result.stdout


def test_status_tells_finished_diverged_running_interrupted_failed_and_pending_runs(tmp_path, fake):
    out = tmp_path / "results" / "mine"
    # a sweep that ends a, b and f: b's train.py dies after its first epoch
    behave(fake, b={"status": "running", "done": 1, "exit": 1}, f={"status": "diverged", "done": 1})
    sweep(cwd=tmp_path, GRID=write_grid(tmp_path, "a --arch cnn", "b --arch cnn", "f --arch cnn"),
          PYTHON=fake / "python", PREFLIGHT=0)
    # then the grid grows; c runs now (its train.py holds its lock), d was killed, e never started
    grid = write_grid(tmp_path, *THREE_CONFIGS, "d --arch cnn", "e --arch cnn", "f --arch cnn")
    write_result(out, "c-s0", "running")
    write_result(out, "d-s0", "running")

    with hold_lock(out / "checkpoints" / "c-s0.lock", fcntl.LOCK_EX), hold_lock(out / ".sweep.lock", fcntl.LOCK_EX):
        result = sweep("--status", cwd=tmp_path, GRID=grid, PYTHON=fake / "python")

    assert result.returncode == 0, result.stderr
    header, *rows, count = result.stdout.splitlines()
    assert header.split() == ["run", "epochs", "test", "acc", "epoch", "time", "status"]
    table = {row.split()[0]: re.split(r"\s{2,}", row.strip(), maxsplit=4)[1:] for row in rows}
    assert table == {
        "a-s0": ["2/2", "50.00%", "1.0s", "finished"],
        "b-s0": ["1/2", "-", "1.0s", "failed (exit 1, status running)"],
        "c-s0": ["-", "-", "-", "running"],
        "d-s0": ["-", "-", "-", "interrupted (resume with make sweep)"],
        "e-s0": ["-", "-", "-", "pending"],
        "f-s0": ["1/2", "-", "1.0s", "diverged"],
    }
    assert count == "6 runs in results/mine: 1 finished, 1 diverged, 1 running, 1 interrupted, 1 failed, 1 pending"
    assert not (out / "checkpoints" / "d-s0.lock").exists(), "--status only looks"


def test_odd_or_torn_records_stop_neither_the_status_nor_the_sweep(tmp_path, fake):
    grid = write_grid(tmp_path, "a --arch cnn", "odd --arch cnn", "torn --arch cnn", "weird --arch cnn")
    out = tmp_path / "results" / "mine"
    out.mkdir(parents=True)
    (out / "odd-s0.json").write_text(json.dumps({"status": "running", "config": {"epochs": 2.5}, "history": [{}]}))
    (out / "torn-s0.json").write_text('{"status": "runn')
    (out / "weird-s0.json").write_text(json.dumps({"status": "half done"}))

    status = sweep("--status", cwd=tmp_path, GRID=grid)
    result = sweep(cwd=tmp_path, GRID=grid, PYTHON=fake / "python", PREFLIGHT=0)  # ETAs read the records

    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1] == "4 runs in results/mine: 1 interrupted, 3 pending"
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 4


# --- Locking ------------------------------------------------------------------------------------


def test_second_sweep_on_a_locked_out_folder_refuses(tmp_path):
    with hold_lock(tmp_path / "results" / ".sweep.lock", fcntl.LOCK_EX):
        assert "another sweep" in one_line_error(sweep(cwd=tmp_path))
        assert "another sweep" in one_line_error(sweep(cwd=tmp_path, SHARD="1/2"))
        assert list((tmp_path / "results" / "logs").iterdir()) == []


def test_dry_run_takes_no_lock(tmp_path):
    with hold_lock(tmp_path / "results" / ".sweep.lock", fcntl.LOCK_EX):
        assert len(dry_run(tmp_path)) == 12


def test_shards_of_one_sweep_can_share_an_out_folder(tmp_path):
    out = tmp_path / "results"
    for run in dry_run(tmp_path):
        write_result(out, run["name"], "finished")

    # shard 0/2 running: a shared lock on the folder, an exclusive one on its share
    with hold_lock(out / ".sweep.lock", fcntl.LOCK_SH), hold_lock(out / ".sweep.shard-0-of-2.lock", fcntl.LOCK_EX):
        assert sweep(cwd=tmp_path, SHARD="1/2").returncode == 0
        assert "another sweep" in one_line_error(sweep(cwd=tmp_path, SHARD="0/2"))
        assert "another sweep" in one_line_error(sweep(cwd=tmp_path))


# --- Preflight ----------------------------------------------------------------------------------


def test_preflight_checks_each_config_once_at_seed_0_with_epochs_and_extra_and_never_resumes(tmp_path):
    write_result(tmp_path / "results", "resnet18-max-sgd-s0", "running")

    result = sweep("--preflight", "--dry-run", cwd=tmp_path, SEEDS=3, EPOCHS=2, EXTRA="--data-dir /d --no-compile")

    assert result.returncode == 0, result.stderr
    checks = [parse_command(line) for line in result.stdout.splitlines()]
    assert len(checks) == 12, "one check per config, not per seed"
    for check in checks:
        assert check["preflight"] is True and "resume" not in check
        assert (check["seed"], check["epochs"], check["data-dir"], check["no-compile"]) == ("0", "2", "/d", True)


def test_preflight_of_a_shard_checks_the_configs_of_its_runs(tmp_path):
    names = {r["name"].removesuffix("-s0") for r in dry_run(tmp_path, SHARD="1/5")}

    result = sweep("--preflight", "--dry-run", cwd=tmp_path, SHARD="1/5")

    assert {parse_command(line)["name"].removesuffix("-s0") for line in result.stdout.splitlines()} == names


def test_preflight_names_the_config_whose_grid_line_has_an_unknown_flag(tmp_path, fake):
    grid = write_grid(tmp_path, "good --arch cnn", "typo --arch cnn --bogus-flag", "fine --arch resnet20")

    result = sweep("--preflight", cwd=tmp_path, GRID=grid, PYTHON=fake / "python")

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert re.search(r"\bgood\b.*\bok$", lines[0]) and re.search(r"\bfine\b.*\bok$", lines[2])
    assert re.search(r"\btypo\b.*failed \(exit 2\): train.py: error: unrecognized arguments: --bogus-flag$", lines[1])
    assert "1 failed" in result.stderr
    assert re.search(r"failed\s+typo\s+exit 2\s+results/mine/logs/preflight/typo\.log", result.stderr)
    assert "--bogus-flag" in (tmp_path / "results/mine/logs/preflight/typo.log").read_text()
    assert all(is_preflight(call) for call in calls(fake)) and len(calls(fake)) == 3


def test_sweep_starts_no_run_when_the_preflight_fails(tmp_path, fake):
    grid = write_grid(tmp_path, "good --arch cnn", "typo --arch cnn --bogus-flag")

    result = sweep(cwd=tmp_path, GRID=grid, SEEDS=2, PYTHON=fake / "python")

    assert result.returncode == 1
    assert result.stdout == "", "no run ended"
    assert "typo" in result.stderr and "PREFLIGHT=0" in result.stderr
    assert [name_of(call) for call in calls(fake)] == ["good-s0", "typo-s0"]
    assert all(is_preflight(call) for call in calls(fake)), "no training run started"
    assert list((tmp_path / "results" / "mine").glob("*.json")) == []


def test_sweep_preflights_the_configs_it_will_run_before_its_first_run(tmp_path, fake):
    grid = write_grid(tmp_path, *THREE_CONFIGS)
    write_result(tmp_path / "results" / "mine", "a-s0", "finished")

    result = sweep(cwd=tmp_path, GRID=grid, PYTHON=fake / "python")

    assert result.returncode == 0, result.stderr
    names = [(name_of(call), is_preflight(call)) for call in calls(fake)]
    assert names == [("b-s0", True), ("c-s0", True), ("b-s0", False), ("c-s0", False)]
    assert len(result.stdout.splitlines()) == 2, "the terminal's stdout: one line per run"


def test_preflight_0_skips_the_check(tmp_path, fake):
    grid = write_grid(tmp_path, "typo --arch cnn --bogus-flag")

    result = sweep(cwd=tmp_path, GRID=grid, PYTHON=fake / "python", PREFLIGHT=0)

    assert result.returncode == 0, result.stderr
    assert [is_preflight(call) for call in calls(fake)] == [False]


def test_shards_keep_their_preflight_logs_apart(tmp_path, fake):
    grid = write_grid(tmp_path, "typo --arch cnn --bogus-flag")

    for shard in ("0/2", "1/2"):  # seed 0 of typo in shard 0, seed 1 in shard 1: both check typo
        assert sweep(cwd=tmp_path, GRID=grid, SEEDS=2, SHARD=shard, PYTHON=fake / "python").returncode == 1

    for shard in ("0-of-2", "1-of-2"):
        assert "--bogus-flag" in (tmp_path / f"results/mine/logs/preflight-shard-{shard}/typo.log").read_text()


def test_preflight_runs_under_torchrun_on_the_gpu_slots_and_reports_the_ranks_error(tmp_path, fake):
    grid = write_grid(tmp_path, "typo --arch cnn --bogus-flag", *THREE_CONFIGS)

    result = sweep("--preflight", cwd=tmp_path, GRID=grid, GPUS="0,1,2,3", NPROC=2, PYTHON=fake / "python")

    assert result.returncode == 1
    assert all(call["torchrun"] for call in calls(fake))
    assert {call["gpus"] for call in calls(fake)} <= {"0,1", "2,3"}
    gpus = {name_of(call): call["gpus"] for call in calls(fake)}
    assert {gpus["typo-s0"], gpus["a-s0"]} == {"0,1", "2,3"}, "the first two configs start at once, one per slot"
    # torchrun exits 1 and ends with its own report; the line shown is the rank's
    [line] = [line for line in result.stdout.splitlines() if re.search(r"\btypo\b", line)]  # in the order they end
    assert re.search(r"failed \(exit 1\): train.py: error: unrecognized arguments: --bogus-flag$", line), line


# --- Makefile: set-up and data under a lock (a Slurm array's tasks all run them at once) ----------

RECORDING_COMMAND = r"""#!/bin/sh
# Stands in for python3 / .venv/bin/python: records its call and whether $LOCK was held meanwhile.
if flock -n "$LOCK" true; then held=no; else held=yes; fi
echo "$(basename "$0") $* lock-held=$held" >>"$CALLS"
case "$*" in *"-m venv .venv"*) mkdir -p .venv ;; esac
"""


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

    with hold_lock(lock, fcntl.LOCK_EX):
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

    with hold_lock(lock, fcntl.LOCK_EX):
        # -o setup: the venv and system libraries are not this test's business
        makes = start_concurrent_makes(folder, lock, "-o", "setup", "data", "DATA_DIR=data", fake=fake, env=env)
        assert recorded(folder) == []
    assert [make.wait(timeout=60) for make in makes] == [0, 0]

    assert recorded(folder) == ["python data.py --data-dir data lock-held=yes"] * 2


# --- Real sweeps: train tiny configs with train.py (slow; last) ---------------------------------

TINY_GRID = """\
# three configs that train in seconds on the synthetic data set
cnn-avg-sgd  --arch cnn --pool avg --opt sgd
cnn-max-sgd  --arch cnn --pool max --opt sgd
cnn-avg-adam --arch cnn --pool avg --opt adam
"""
TINY_NAMES = ["cnn-avg-sgd-s0", "cnn-max-sgd-s0", "cnn-avg-adam-s0"]


def tiny_settings(data_dir: Path) -> dict:
    return {
        "GRID": "tiny.grid",
        "EPOCHS": 1,
        "EXTRA": f"--data-dir {data_dir} --no-compile --amp off --channels-last --aug none --batch-size 32",
        # These tests are about runs (a broken config must fail as a run, not be stopped by the
        # preflight); the fast tests cover the preflight with a fake train.py.
        "PREFLIGHT": 0,
    }


def status(out: Path, name: str) -> str:
    return json.loads((out / f"{name}.json").read_text())["status"]


def snapshot(out: Path) -> dict:
    """What a run changes: each JSON's mtime and each log's size."""
    files = [*out.glob("*.json"), *(out / "logs").glob("*.log")]
    return {path.name: (path.stat().st_mtime_ns, path.stat().st_size) for path in files}


@pytest.fixture(scope="module")
def finished_sweep(synthetic_data, tmp_path_factory):
    """A folder with tiny.grid in which a tiny sweep has run to the end once."""
    folder = tmp_path_factory.mktemp("tiny-sweep")
    (folder / "tiny.grid").write_text(TINY_GRID)
    result = sweep(cwd=folder, timeout=900, **tiny_settings(synthetic_data))
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, result


def test_real_sweep_writes_one_finished_json_per_config(finished_sweep):
    folder, result = finished_sweep
    out = folder / "results" / "tiny"

    for name in TINY_NAMES:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["status"] == "finished"
        assert 0 <= record["final"]["test_acc"] <= 1
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
    lines = result.stdout.splitlines()
    assert len(lines) == 3, "one line per run"
    assert all(re.search(r"finished\s+test_acc \d+\.\d\d%", line) for line in lines)


def test_real_second_sweep_trains_nothing(finished_sweep, synthetic_data):
    folder, _ = finished_sweep
    out = folder / "results" / "tiny"
    before = snapshot(out)

    result = sweep(cwd=folder, **tiny_settings(synthetic_data))

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("skip") == 3
    assert snapshot(out) == before


def test_real_interrupted_sweep_resumes_without_rerunning_finished_configs(finished_sweep, synthetic_data, tmp_path):
    folder = shutil.copytree(finished_sweep[0], tmp_path / "copy")
    out = folder / "results" / "tiny"
    interrupted, lost, done = TINY_NAMES
    record = json.loads((out / f"{interrupted}.json").read_text())
    (out / f"{interrupted}.json").write_text(json.dumps({**record, "status": "running"}))
    (out / f"{lost}.json").unlink()
    log_sizes = {name: (out / "logs" / f"{name}.log").stat().st_size for name in TINY_NAMES}
    untouched = snapshot(out)[f"{done}.json"], snapshot(out)[f"{done}.log"]

    result = sweep(cwd=folder, timeout=600, **tiny_settings(synthetic_data))

    assert result.returncode == 0, result.stdout + result.stderr
    assert [status(out, name) for name in TINY_NAMES] == ["finished"] * 3
    new_log = (out / "logs" / f"{interrupted}.log").read_text()[log_sizes[interrupted] :]
    assert "--resume" in new_log
    assert "--resume" not in (out / "logs" / f"{lost}.log").read_text()[log_sizes[lost] :]
    assert (out / "logs" / f"{lost}.log").stat().st_size > log_sizes[lost]
    assert (snapshot(out)[f"{done}.json"], snapshot(out)[f"{done}.log"]) == untouched
    assert len(result.stdout.splitlines()) == 2


def test_real_failing_config_does_not_stop_the_sweep(synthetic_data, tmp_path):
    (tmp_path / "tiny.grid").write_text(
        "broken --arch nope --pool avg --opt sgd\nboom --arch cnn --lr 1e12\n"
        "cnn-avg-sgd --arch cnn --pool avg --opt sgd\n"
    )

    result = sweep(cwd=tmp_path, timeout=600, **tiny_settings(synthetic_data))

    assert result.returncode != 0
    assert re.search(r"broken-s0\s+exit 2\s+results/tiny/logs/broken-s0\.log", result.stderr)
    assert status(tmp_path / "results" / "tiny", "cnn-avg-sgd-s0") == "finished"
    assert status(tmp_path / "results" / "tiny", "boom-s0") == "diverged"  # a diverging config: the sweep goes on
