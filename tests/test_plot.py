"""plot.py on hand-made run records: which figures it writes, the summary table, and what it skips.

plot.py runs as a script in a temp dir beside a stub data.py that holds only data.py's own atomic writer
(its source, copied), so the tests need neither ffcv nor the CIFAR-10 beton."""

import base64
import csv
import inspect
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import data
import plot

PLOT = Path(__file__).resolve().parents[1] / "plot.py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FINAL_FIGURES = ["accuracy.png", "per_class.png", "confusion.png", "predictions.png", "datasize.png",
                 "speed.png", "accuracy_vs_params.png", "accuracy_vs_time.png"]

# config -> (config overrides, test accuracy of each seed); the sweep has 3 seeds for some configs,
# a train-fraction sweep from scratch and pretrained, and a val split on one config
SWEEP = {
    "resnet18-avg-sgd": ({"val_split": 0.1}, [0.83, 0.84, 0.80]),
    "resnet18-max-sgd": ({"pool": "max"}, [0.82, 0.815, 0.83]),
    "resnet18-avg-sgd-f0.5": ({"fraction": 0.5}, [0.75, 0.76]),
    "resnet18-avg-sgd-f0.25": ({"fraction": 0.25}, [0.65]),
    "resnet18-pre-sgd": ({"pretrained": True, "stem": "imagenet"}, [0.90]),
    "resnet18-pre-sgd-f0.5": ({"pretrained": True, "stem": "imagenet", "fraction": 0.5}, [0.87]),
    "resnet18-pre-sgd-f0.25": ({"pretrained": True, "stem": "imagenet", "fraction": 0.25}, [0.83]),
    "resnet50-avg-adamw": ({"arch": "resnet50", "opt": "adamw"}, [0.86]),
}
# plot.py uses nothing of data.py but its one atomic writer
STUB_DATA_PY = "import os\nfrom pathlib import Path\n\n" + "\n\n".join(
    inspect.getsource(f) for f in (data.temporary_name, data.write_atomically))
PREVIEW = "previews/0123456789ab.npz"  # where train.py keeps the preview images, relative to the records


def write_preview(results: Path) -> np.ndarray:
    """A preview file as train.py keeps it, its 64 indices in shuffled order; returns the images by index."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    order = rng.permutation(64)
    (results / "previews").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(results / PREVIEW, indices=order, labels=order % 10, images=images[order])
    return images


def make_record(name: str, test_acc: float | None, status: str = "finished", epochs: int = 4, **config) -> dict:
    """A run record shaped like train.py's (schema_version 1); final only when the run finished. Its factors
    are what train.py writes: the config less the seed, run control and the optimiser values it derived."""
    factors = {"arch": "resnet18", "pool": "avg", "stem": "cifar", "pretrained": False, "opt": "sgd",
               "batch_size": 512, "epochs": epochs, "fraction": 1.0, "val_split": 0.0, "aug": "flip,translate"} | config
    cfg = factors | {"lr": 0.4, "wd": 5e-4, "seed": int(name.rsplit("-s", 1)[1]), "data_dir": "cifar-data"}
    has_val = cfg["val_split"] > 0
    history, speed = [], 2.0 - (test_acc or 0.8)  # better configs learn faster, so the curves differ
    for e in range(1, epochs + 1):
        h = {"epoch": e, "train_loss": 2.3 / (1 + speed * (e - 1)) ** 2, "train_acc": 0.3 + 0.15 * e,
             "test_loss": 1.8 / e, "test_acc": 0.25 + 0.15 * e, "lr": 0.1, "epoch_time_s": 30.0,
             "train_img_per_s": 1650.0, "eval_time_s": 3.0}
        if has_val:
            h |= {"val_loss": 1.9 / e, "val_acc": 0.2 + 0.15 * e}
        history.append(h)
    record = {"schema_version": 1, "name": name, "status": status, "started_at": "2026-11-21T23:00:00Z",
              "ended_at": None, "config": cfg, "factors": factors,
              "run": {"device": "cpu", "train_images": round(50_000 * (1 - cfg["val_split"]) * cfg["fraction"]),
                      "amp": "off", "compile": False, "channels_last": True, "world_size": 1},
              "env": {"torch": "2.14.1", "device_name": "Test CPU"},  # where train.py puts the device's model
              "model": {"params": 23_520_842 if cfg["arch"] == "resnet50" else 11_173_962,
                        "flops_per_image": 1_111_111_111},
              "classes": CLASSES, "history": history}
    if status == "finished":
        labels = [i % 10 for i in range(64)]
        record["final"] = {
            "test_loss": 0.6, "test_acc": test_acc,
            "per_class_acc": {c: min(1.0, test_acc + 0.01 * (i - 5)) for i, c in enumerate(CLASSES)},
            "confusion": [[int(1000 * test_acc) if i == j else int(1000 * (1 - test_acc) / 9) for j in range(10)]
                          for i in range(10)],
            "val_acc": 0.8 if has_val else None, "best_val_acc": 0.8 if has_val else None,
            "best_val_epoch": epochs if has_val else None,
            "predictions": {"indices": list(range(64)), "labels": labels, "images": PREVIEW,
                            "preds": [p if i % 7 else (p + 1) % 10 for i, p in enumerate(labels)]},
            "compile_time_s": 0.0, "mean_epoch_time_s": 30.0 if cfg["arch"] == "resnet18" else 80.0,
            "train_time_s": 30.0 * epochs, "train_img_per_s": 1650.0, "peak_memory_mb": 2100.0, "recompiles": 0}
    return record


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def run_plot(project: Path, *args: str) -> subprocess.CompletedProcess:
    shutil.copy(PLOT, project / "plot.py")
    if not (project / "data.py").exists():
        (project / "data.py").write_text(STUB_DATA_PY)
    return subprocess.run([sys.executable, "plot.py", *args], cwd=project, capture_output=True, text=True,
                          timeout=120)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The full sweep; a malformed, a foreign, another schema's, a running and a diverged file; a bench record."""
    project = tmp_path_factory.mktemp("sweep")
    results = project / "results"
    for config, (overrides, accs) in SWEEP.items():
        for seed, acc in enumerate(accs):
            write_json(results / f"{config}-s{seed}.json", make_record(f"{config}-s{seed}", acc, **overrides))
    write_json(results / "resnet50-avg-sgd-s0.json",
               make_record("resnet50-avg-sgd-s0", None, status="running", arch="resnet50"))
    diverged = make_record("resnet34-avg-sgd-s0", None, status="diverged", arch="resnet34")
    diverged["history"][-1]["train_loss"] = float("nan")  # json writes NaN, as train.py's json.dump would
    write_json(results / "resnet34-avg-sgd-s0.json", diverged)
    (results / "bad.json").write_text('{"schema_version": 1, "name": ')
    write_json(results / "foreign.json", {"foo": 1})
    write_json(results / "schema2.json", make_record("resnet18-avg-sgd-s9", 0.9) | {"schema_version": 2})
    write_json(results / "bench" / "bench-1.json",
               {"loader_ratio": 0.9, "speedup": {"resnet18": 1.8},  # as bench.py writes it when its epoch failed
                "train_step": {"resnet18": {"eager_fp32": 900.0, "channels_last": 1000.0, "compile": 1600.0},
                               "resnet50": {"eager_fp32": 300.0, "channels_last": 350.0, "compile": 450.0}}})
    write_preview(results)
    (project / "data.py").write_text(STUB_DATA_PY)
    proc = run_plot(project)
    return project, proc


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    """One seed per config, full training set, no val split, no bench and no preview file; a stale datasize.png."""
    project = tmp_path_factory.mktemp("one_seed")
    for config, acc in [("resnet18-avg-sgd", 0.83), ("resnet18-max-sgd", 0.81)]:
        write_json(project / "results" / f"{config}-s0.json",
                   make_record(f"{config}-s0", acc, pool=config.split("-")[1]))
    (project / "figs").mkdir()
    (project / "figs" / "datasize.png").write_bytes(b"left from an earlier sweep")
    proc = run_plot(project, "results", "--out", "figs")
    return project, proc


def test_sweep_exits_0_and_writes_every_figure_that_applies(sweep):
    project, proc = sweep
    assert proc.returncode == 0, proc.stderr
    out = project / "figures"
    for name in ["loss_curves.png", *FINAL_FIGURES, "bench.png"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    assert "skipped figures" not in proc.stdout
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # the atomic writer leaves no temp file


def test_each_config_gets_its_own_curves_including_unfinished_ones(sweep):
    project, _ = sweep
    expected = set(SWEEP) | {"resnet50-avg-sgd", "resnet34-avg-sgd"}
    assert {p.stem for p in (project / "figures" / "curves").glob("*.png")} == expected


def test_summary_csv_has_a_row_per_finished_config_with_its_factors_mean_and_sample_std(sweep):
    """Std is the sample std (ddof=1), as the column name says; blank for a single seed."""
    project, _ = sweep
    rows = read_csv(project / "figures" / "summary.csv")
    assert [r["config"] for r in rows] == sorted(SWEEP, key=lambda c: -statistics.fmean(SWEEP[c][1]))
    for row in rows:
        accs = SWEEP[row["config"]][1]
        assert int(row["n_seeds"]) == len(accs)
        assert float(row["test_acc_mean"]) == pytest.approx(statistics.fmean(accs))
        if len(accs) >= 2:
            assert float(row["test_acc_std_ddof1"]) == pytest.approx(statistics.stdev(accs))
        else:
            assert row["test_acc_std_ddof1"] == ""
    rows = {r["config"]: r for r in rows}
    pre = rows["resnet18-pre-sgd-f0.5"]
    assert (pre["arch"], pre["pretrained"], pre["stem"], pre["fraction"]) == ("resnet18", "True", "imagenet", "0.5")
    assert float(rows["resnet18-avg-sgd"]["best_val_acc"]) == pytest.approx(0.8)
    assert rows["resnet18-max-sgd"]["best_val_acc"] == ""  # no val split
    assert int(rows["resnet50-avg-adamw"]["params"]) == 23_520_842
    assert rows["resnet50-avg-adamw"]["device"] == "Test CPU"


def test_summary_md_shows_percent_mean_interval_std_and_n_and_is_printed(sweep):
    project, proc = sweep
    # resnet18-avg-sgd: 83, 84, 80 -> mean 82.333, sd = sqrt((0.667² + 1.667² + 2.333²) / 2) = sqrt(4.3333) = 2.0817;
    # 95 % CI: t(0.975, 2 df) = 4.3027 (printed t table) × 2.0817 / sqrt(3) = 5.171
    md = (project / "figures" / "summary.md").read_text()
    assert "| 82.33 | ± 5.17 | 2.08 | 3 |" in md
    # resnet18-pre-sgd, one seed at 90 %: the fixture's confusion rows hold 900 + 9 × 11 = 999 images, so N = 9,990;
    # SE = sqrt(0.9 × 0.1 / 9990) = 0.0030015, × 1.96 = 0.59 points, marked † (test-set sampling only)
    assert "| 90.00 | ± 0.59 † |  | 1 |" in md
    assert "seed-to-seed spread is not measured" in md
    assert md.strip() in proc.stdout


def test_summary_md_first_line_names_the_best_and_the_configs_tied_with_it(sweep):
    project, proc = sweep
    md = (project / "figures" / "summary.md").read_text()
    # best: resnet18-pre-sgd, one run at 90 %. resnet18-avg-sgd (3 seeds, 82.33 ± sd 2.08) against it:
    # t = (90 - 82.333) / (2.0817 × sqrt(1 + 1/3)) = 3.190 on 2 df -> p = 1 - t / sqrt(2 + t²) = 0.086.
    # resnet18-max-sgd (81.5, 83, 82 -> 82.17, sd 0.764): t = 7.833 / (0.764 × 1.1547) = 8.88 -> p = 0.012.
    # Holm over the 7 tests: the 4 two-proportion p < 0.001 come first, then 0.012 × 3 = 0.037 (worse),
    # f0.5's 0.038 × 2 = 0.076 and 0.086 × 1 (both tied, though f0.5 alone would be under 5 %)
    first = ("best: resnet18-pre-sgd (90.00 ± 0.59); statistically tied with: resnet18-avg-sgd, "
             "resnet18-avg-sgd-f0.5\n")
    assert md.startswith(first)
    for verdict in ["tied (1 run vs seeds t, p = 0.086, Holm = 0.086)",
                    "worse (1 run vs seeds t, p = 0.012, Holm = 0.037)",
                    "tied (1 run vs seeds t, p = 0.038, Holm = 0.076)",
                    "worse (two-proportion z, p < 0.001, Holm < 0.001)"]:
        assert f"| {verdict} |" in md
    assert first in proc.stdout
    rows = {r["config"]: r for r in read_csv(project / "figures" / "summary.csv")}
    assert rows["resnet18-avg-sgd"]["vs_best"] == "tied" and rows["resnet18-max-sgd"]["vs_best"] == "worse"
    assert float(rows["resnet18-avg-sgd"]["test_acc_ci95"]) == pytest.approx(0.05171, abs=1e-5)
    assert {r["ranked_by"] for r in rows.values()} == {"test"}  # val split in only one config


def test_summary_md_and_factors_csv_have_the_factor_model_and_name_what_it_cannot_estimate(sweep):
    project, _ = sweep
    md = (project / "figures" / "summary.md").read_text()
    factors = {(r["factor"], r["level"]): r for r in read_csv(project / "figures" / "factors.csv")}
    # 13 finished runs, a design of rank 7 (intercept, pool, 2 fractions, val_split, and two confounded
    # groups: arch with opt, stem with pretrained): 6 residual df
    assert {r["residual_df"] for r in factors.values()} == {"6"}
    fraction = factors["fraction", "0.5"]
    assert f"| fraction | 0.5 vs 0.25 | {float(fraction['effect']):+.2f} | ± {float(fraction['ci95']):.2f} | 6 |" in md
    # arch, stem, pretrained and opt never change apart from one another in this sweep
    assert factors["arch", "resnet50"]["effect"] == "" and "| arch | resnet50 vs resnet18 | not estimable |" in md
    [line] = [ln for ln in md.splitlines() if ln.startswith("Not estimable")]
    assert "arch resnet50 vs resnet18" in line and "stem" in line and "fraction" not in line


@pytest.mark.parametrize("file, why", [("bad.json", "malformed JSON"), ("foreign.json", "not a train.py run record"),
                                       ("schema2.json", "schema_version 2 but plot.py reads 1")])
def test_an_unusable_json_is_skipped_in_one_line_that_says_why(sweep, file, why):
    _, proc = sweep
    assert proc.returncode == 0
    [line] = [ln for ln in proc.stdout.splitlines() if file in ln]
    assert line.startswith("skipped ") and why in line


def test_running_and_diverged_runs_are_reported_and_left_out_of_the_table(sweep):
    project, proc = sweep
    for name, status in [("resnet50-avg-sgd-s0.json", "running"), ("resnet34-avg-sgd-s0.json", "diverged")]:
        [line] = [ln for ln in proc.stdout.splitlines() if name in ln]
        assert status in line
    configs = {r["config"] for r in read_csv(project / "figures" / "summary.csv")}
    assert not configs & {"resnet50-avg-sgd", "resnet34-avg-sgd"}


def test_predictions_show_the_preview_images_kept_beside_the_records(sweep, tmp_path):
    project, _ = sweep
    assert (project / "figures" / "predictions.png").read_bytes().startswith(b"\x89PNG")
    images = write_preview(tmp_path)
    run = {"_file": tmp_path / "run.json", "final": {"predictions": {"images": PREVIEW}}}
    np.testing.assert_array_equal(plot.preview_images(run, [5, 0, 63]), images[[5, 0, 63]])
    del run["final"]["predictions"]["images"]  # train.py could not keep them
    assert "names no preview images" in plot.preview_images(run, [0])


def test_one_seed_without_fraction_sweep_or_preview_skips_those_figures_and_says_why(one_seed):
    project, proc = one_seed
    assert proc.returncode == 0, proc.stderr
    out = project / "figs"
    assert not (out / "datasize.png").exists()  # the stale one is removed too
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("skipped figures")]
    assert "datasize.png (train fraction not varied)" in line
    assert "bench.png" in line
    for name in ["loss_curves.png", "accuracy.png", "per_class.png", "confusion.png", "speed.png"]:
        assert (out / name).exists(), name
    assert "one seed per config" in proc.stdout
    assert "no val split" in proc.stdout
    assert "run SEEDS=3" in (out / "summary.md").read_text()
    assert not (project / "figs" / "predictions.png").exists()  # no preview file
    assert "predictions.png (preview images unavailable (FileNotFoundError" in line


def test_report_html_is_self_contained_with_every_figure_written_and_every_table_row(sweep):
    project, _ = sweep
    out = project / "figures"
    page = (out / "report.html").read_text()
    written = sorted(p for p in out.rglob("*.png"))
    assert len(written) == len(FINAL_FIGURES) + 2 + len(SWEEP) + 2  # + loss curves, bench, one curve per config
    for png in written:
        name = png.relative_to(out).as_posix()
        assert f'alt="{name}"' in page, name
        assert base64.b64encode(png.read_bytes()).decode() in page, name
    for row in read_csv(out / "summary.csv"):
        assert f">{row['config']}</td>" in page
    assert "best: resnet18-pre-sgd (90.00 ± 0.59); statistically tied with: resnet18-avg-sgd" in page
    assert ">fraction</td>" in page and ">0.5 vs 0.25</td>" in page
    assert ">Test CPU</td>" in page and ">2.14.1</td>" in page  # env.device_name and env.torch
    links = re.findall(r"""(?:src|href)=["']([^"']*)""", page)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 could spell anything
    assert "http" not in text and "url(" not in text and "<link" not in text and "<script" not in text


VAL_SWEEP = {  # config -> (val accs, test accs) per seed: val ranks resnet18-avg-sgd first, test would not
    "resnet18-avg-sgd": ([0.88, 0.89], [0.85, 0.84]),
    "resnet18-max-sgd": ([0.86, 0.87], [0.86, 0.87]),
    "resnet34-avg-sgd": ([0.80, 0.81], [0.80, 0.81]),
}


@pytest.fixture(scope="module")
def val_sweep(tmp_path_factory):
    project = tmp_path_factory.mktemp("val_sweep")
    for config, (vals, tests) in VAL_SWEEP.items():
        arch, pool, _ = config.split("-")
        for seed, (val, test) in enumerate(zip(vals, tests, strict=True)):
            record = make_record(f"{config}-s{seed}", test, arch=arch, pool=pool, val_split=0.1)
            record["final"]["val_acc"] = val  # the reported model's val accuracy, as train.py now writes it
            write_json(project / "results" / f"{config}-s{seed}.json", record)
    return project, run_plot(project)


def test_a_val_split_ranks_and_chooses_by_val_reports_test_and_shows_the_best_val_seed(val_sweep):
    project, proc = val_sweep
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(project / "figures" / "summary.csv")
    assert [r["config"] for r in rows] == list(VAL_SWEEP)  # by val; by test resnet18-max-sgd would lead
    assert {r["ranked_by"] for r in rows} == {"val"}
    # ties on val, Welch: avg 88.5 vs max 86.5, each sd 0.707 (2 seeds): se = sqrt(0.00005/2 × 2) = 0.00707,
    # t = 0.02 / 0.00707 = 2.828, df = 2 -> p = 1 - t / sqrt(2 + t²) = 1 - 2.828 / 3.162 = 0.106: tied.
    # resnet34: t = 0.08 / 0.00707 = 11.31 -> p = 1 - 11.31 / sqrt(130) = 0.0077: worse.
    assert [r["vs_best"] for r in rows] == ["best", "tied", "worse"]
    assert float(rows[1]["vs_best_p"]) == pytest.approx(1 - 2 * math.sqrt(2) / math.sqrt(10), abs=1e-6)
    # every interval: t(0.975, 1 df) = 12.706 × sd 0.00707 / sqrt(2) = 6.35 points
    md = (project / "figures" / "summary.md").read_text()
    assert md.startswith("Ranked and chosen by val accuracy; test accuracy is reported")
    assert ("best: resnet18-avg-sgd (val 88.50 ± 6.35, test 84.50 ± 6.35); statistically tied with: "
            "resnet18-max-sgd (val 86.50 ± 6.35, test 86.50 ± 6.35)") in md
    assert "Sorted by mean val accuracy (the val split chooses, the test set reports)" in md
    # the figures show resnet18-avg-sgd's s1: the better val acc (89 vs 88) and the worse test acc (84 vs 85)
    assert "confusion.png and predictions.png show resnet18-avg-sgd-s1 (its best val acc)" in proc.stdout


def test_missing_results_dir_names_the_fix(tmp_path):
    with pytest.raises(SystemExit) as exit_:  # sys.exit(message): exit code 1, the message on stderr
        plot.main([str(tmp_path / "nowhere")])
    assert "nowhere not found: run train.py" in str(exit_.value.code)


class FigureThatFailsMidWrite(Figure):
    """Writes half a file, then fails, as a full disk or a kill would."""

    def savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")


@pytest.mark.parametrize("name, content, error", [
    ("accuracy.png", FigureThatFailsMidWrite(), OSError),
    ("summary.md", "new table \ud800", UnicodeEncodeError),  # a lone surrogate cannot be encoded
])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, name, content, error):
    (tmp_path / name).write_text("old")
    with pytest.raises(error):
        plot.save(tmp_path / name, content)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_text() == "old"


def test_status_prints_a_line_per_run_record_and_a_total(sweep, capsys):
    project, _ = sweep
    plot.main(["--status", str(project / "results"), str(project / "not-made-yet")])  # returns: exit 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("skipped ")}
    assert lines["resnet18-pre-sgd-s0"].split() == ["resnet18-pre-sgd-s0", "finished", "4/4", "epochs", "test",
                                                    "90.00", "%", "30.0", "s/epoch"]
    assert lines["resnet50-avg-sgd-s0"].split()[1:3] == ["running", "4/4"]
    assert lines["resnet34-avg-sgd-s0"].split()[1] == "diverged"
    n_runs = sum(len(accs) for _, accs in SWEEP.values()) + 2
    total = lines["total:"]
    assert total.startswith(f"total: {n_runs} runs (") and f"; {4 * n_runs}/{4 * n_runs} epochs" in total
    assert all(f"{n} {status}" in total for n, status in [(n_runs - 2, "finished"), (1, "running"), (1, "diverged")])
    assert len(lines) == n_runs + 1 and not (project / "not-made-yet").exists()
