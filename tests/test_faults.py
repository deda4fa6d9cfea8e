"""Faults injected into the real scripts, run as subprocesses: each case checks the exit code, the
one-line message naming the fix, and the state of the files afterwards (issue: nothing lost)."""
from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, record, run_env, train


def start_train(tmp_path, data_dir, *flags) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "--data-dir", str(data_dir),
               "--out", str(tmp_path / "results"), *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())


def wait_until(predicate, process, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError):
            pass  # a file not there yet
        assert process.poll() is None, "the process ended before the fault could be injected"
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the process")


def epochs_done(path) -> int:
    return len(json.loads(path.read_text())["history"])


# --- train.py -------------------------------------------------------------------------------------

RESUME_FLAGS = ["--epochs", "4", "--aug", "none"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_data) -> dict:
    tmp_path = tmp_path_factory.mktemp("straight")
    train(tmp_path, synthetic_data, *RESUME_FLAGS, "--name", "straight")
    return record(tmp_path, "straight")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_history_as_an_uninterrupted_one(tmp_path, synthetic_data, how,
                                                                            uninterrupted):
    flags = RESUME_FLAGS
    process = start_train(tmp_path, synthetic_data, *flags, "--name", "cut")
    wait_until(lambda: epochs_done(tmp_path / "results" / "cut.json") >= 2, process)
    process.send_signal(how)
    if how == signal.SIGINT:
        process.send_signal(signal.SIGTERM)  # a second signal while stopping (a sweep's TERM after Ctrl-C) is ignored
    out, err = process.communicate(timeout=300)
    interrupted = record(tmp_path, "cut")  # parses: written atomically
    assert interrupted["status"] == "running" and len(interrupted["history"]) >= 2
    if how == signal.SIGINT:
        assert process.returncode == 130 and "--resume" in out and "Traceback" not in err, err
        assert (tmp_path / "results" / "checkpoints" / "cut.pt").exists()
        return  # resumable; resuming is checked after SIGKILL, the harder case
    train(tmp_path, synthetic_data, *flags, "--name", "cut", "--resume")
    resumed, straight = record(tmp_path, "cut"), uninterrupted
    assert resumed["status"] == "finished"
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]  # none repeated, none skipped
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)


def test_truncated_or_foreign_checkpoint_is_refused_without_a_trace(tmp_path, synthetic_data):
    ckpt = tmp_path / "results" / "checkpoints" / "x.pt"
    process = start_train(tmp_path, synthetic_data, "--epochs", "3", "--name", "x")
    wait_until(lambda: epochs_done(tmp_path / "results" / "x.json") >= 1, process)
    process.kill()
    process.communicate()
    result = train(tmp_path, synthetic_data, "--epochs", "3", "--name", "x", "--lr", "0.01", "--resume", check=False)
    assert result.returncode == 1
    assert "another config" in result.stderr and "lr" in result.stderr and "Traceback" not in result.stderr
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    result = train(tmp_path, synthetic_data, "--epochs", "3", "--name", "x", "--resume", check=False)
    assert result.returncode == 1 and "unreadable" in result.stderr and "Traceback" not in result.stderr


def test_non_finite_loss_ends_diverged_with_a_non_zero_exit(tmp_path, synthetic_data):
    result = train(tmp_path, synthetic_data, "--epochs", "3", "--lr", "1e12", "--name", "boom", check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    run = record(tmp_path, "boom")
    assert run["status"] == "diverged" and run["diverged_epoch"] == 1
    assert "lower --lr" in result.stdout


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


def test_corrupted_beton_is_never_trained_on(tmp_path, fresh_data):
    beton = fresh_data / "train.beton"
    content = bytearray(beton.read_bytes())
    content[-100] ^= 0xFF  # same size, one pixel changed
    beton.write_bytes(bytes(content))
    result = train(tmp_path, fresh_data, "--epochs", "1", check=False)
    assert result.returncode == 1 and "sha256" in result.stderr and "rebuild" in result.stderr
    assert not list((tmp_path / "results").glob("*.json"))


def limit_file_size(max_bytes: int):
    """A full disk, as the process sees it: writes past max_bytes fail with EFBIG (an OSError);
    Python ignores SIGXFSZ, so the write raises instead of killing the process."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def test_full_disk_while_checkpointing_keeps_the_previous_json_and_checkpoint(tmp_path, synthetic_data):
    process = start_train(tmp_path, synthetic_data, "--epochs", "3", "--name", "disk")
    wait_until(lambda: epochs_done(tmp_path / "results" / "disk.json") >= 1, process)
    process.kill()
    process.communicate()
    ckpt, json_path = tmp_path / "results" / "checkpoints" / "disk.pt", tmp_path / "results" / "disk.json"
    before = ckpt.read_bytes(), json_path.read_bytes()
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "--data-dir", str(synthetic_data),
               "--out", str(tmp_path / "results"), "--epochs", "3", "--name", "disk", "--resume"]
    limit = len(before[0]) // 2  # the JSON fits, the checkpoint does not
    result = subprocess.run(command, capture_output=True, text=True, env=run_env(), timeout=600,
                            preexec_fn=limit_file_size(limit))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "could not write" in result.stderr and "--resume" in result.stderr and "Traceback" not in result.stderr
    assert ckpt.read_bytes() == before[0]
    assert json.loads(json_path.read_text())["status"] == "running"
    assert not [p for p in (tmp_path / "results").rglob("*") if ".tmp-" in p.name]


# --- data.py --------------------------------------------------------------------------------------

def test_killed_conversion_leaves_nothing_taken_for_complete(tmp_path, image_folder):
    import data
    out = tmp_path / "d"
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_FINALIZE, "--source", str(image_folder), "--data-dir",
                             str(out)], capture_output=True, text=True, env=dict(run_env(), PYTHONPATH=str(ROOT)),
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL and any(".tmp-" in p.name for p in out.iterdir())  # mid-write
    assert not (out / "meta.json").exists()
    with pytest.raises(data.DataError, match="make data"):
        data.ensure_valid(out)
    result = subprocess.run([sys.executable, str(ROOT / "data.py"), "--source", str(image_folder), "--data-dir",
                             str(out)], capture_output=True, text=True, env=run_env(), timeout=600)
    assert result.returncode == 0 and "wrote" in result.stdout
    assert data.ensure_valid(out)["counts"]["train"] == 240


# The last write of FFCV's writer to a beton, its allocation table: a kill there, or a full disk.
FAULT_AT_FINALIZE = """
import errno, os, signal
import data
data.import_ffcv()
from ffcv.writer import DatasetWriter
def finalize(self, allocations):
    {}
DatasetWriter.finalize = finalize
data.main()
"""
KILLED_AT_FINALIZE = FAULT_AT_FINALIZE.format("os.kill(os.getpid(), signal.SIGKILL)")
FULL_DISK_AT_FINALIZE = FAULT_AT_FINALIZE.format("raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))")


def rebuild(data_dir, source, max_bytes: int | None = None, program: str | None = None) -> subprocess.CompletedProcess:
    """`data.py --force` (or `program`, which runs data.main()), under a file-size limit if given."""
    script = ["-c", program] if program else [str(ROOT / "data.py")]
    command = [sys.executable, *script, "--source", str(source), "--data-dir", str(data_dir), "--force"]
    return subprocess.run(command, capture_output=True, text=True, env=dict(run_env(), PYTHONPATH=str(ROOT)),
                          timeout=120, preexec_fn=limit_file_size(max_bytes) if max_bytes else None)


def contents(folder) -> dict[str, str]:
    import data
    return {p.name: data.sha256_of(p) for p in sorted(folder.iterdir())}


# Where the rebuild's first failed write is, in the order a beton is written: its header (2 KiB), its
# first page of images (64 KiB), or its last write, the allocation table.
@pytest.mark.parametrize("limit, program", [(1 << 10, None), (64 << 10, None), (None, FULL_DISK_AT_FINALIZE)],
                         ids=["header", "first-page", "last-write"])
def test_failed_force_rebuild_keeps_the_previous_data_valid(fresh_data, image_folder, limit, program):
    import data
    before = contents(fresh_data)
    result = rebuild(fresh_data, image_folder, limit, program)
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write") and "free some space" in last, result.stderr
    assert "Traceback" not in result.stderr and "resource_tracker" not in result.stderr, result.stderr
    assert contents(fresh_data) == before  # the same meta.json, betons and preview; no temporary file
    assert data.ensure_valid(fresh_data)["counts"] == {"train": 240, "test": 100}  # what training checks


# --- sweep.sh -------------------------------------------------------------------------------------

def sweep_env(tmp_path, data_dir, grid_lines: str, epochs: int) -> tuple[dict, object]:
    """The environment of a sweep over a grid file of cnn configs, and its results folder."""
    grid, out = tmp_path / "g.grid", tmp_path / "out"
    grid.write_text(grid_lines)
    env = dict(run_env(), GRID=str(grid), OUT=str(out), EPOCHS=str(epochs), PYTHON=sys.executable,
               EXTRA=f"--data-dir {data_dir} --no-compile --amp off --channels-last --aug none --batch-size 32",
               PREFLIGHT="0")  # the runs are what this test kills; tests/test_sweep.py covers the preflight
    return env, out


def test_killed_sweep_resumes_without_retraining_finished_configs(tmp_path, synthetic_data):
    grid = "a --arch cnn\nb --arch cnn --pool max\n"
    env, out = sweep_env(tmp_path, synthetic_data, grid, epochs=2)
    command = ["bash", str(ROOT / "sweep.sh")]
    # Its own session, so the kill can take the sweep and its running train.py, as a dying job would.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
                               start_new_session=True)
    wait_until(lambda: json.loads((out / "a-s0.json").read_text())["status"] == "finished"
               and epochs_done(out / "b-s0.json") >= 1, process, timeout=600)
    # The whole session: the sweep, its lanes and their train.py.
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)])
    process.communicate()
    while subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True).returncode == 0:
        time.sleep(0.05)  # until the killed train.py is gone, and with it the run's lock
    finished_at = (out / "a-s0.json").stat().st_mtime_ns
    assert json.loads((out / "b-s0.json").read_text())["status"] == "running"
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "a-s0.json").stat().st_mtime_ns == finished_at  # not retrained
    assert "--resume" in (out / "logs" / "b-s0.log").read_text() or "resum" in result.stdout + result.stderr
    for name in ("a", "b"):
        run = json.loads((out / f"{name}-s0.json").read_text())
        assert run["status"] == "finished" and [h["epoch"] for h in run["history"]] == [1, 2]

# A diverging config within a sweep: tests/test_sweep.py::test_real_failing_config_does_not_stop_the_sweep
