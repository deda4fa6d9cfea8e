"""Turn train.py's run records (RESULTS_DIR/*.json) into figures and a summary table.

    python plot.py                                 # results/ -> figures/
    python plot.py results old_results --out figs  # several result dirs into one set of figures

Runs are grouped into configs by name minus the trailing "-s<seed>". Final-accuracy figures and the
table use finished runs only; running or diverged runs are still drawn as curves. The spread over
seeds is the sample standard deviation (ddof=1), so a config with one seed has no std.
A figure that does not apply to the results at hand (e.g. datasize.png when no train fraction was
varied) is not drawn, a stale copy of it in --out is removed, and one line says why.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
# Figure objects rather than pyplot: no GUI backend to pick, no global figures to close
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogFormatter, MaxNLocator, NullLocator

# data.py imports only numpy at the top (torch and FFCV inside the functions that need them)
import data

SCHEMA_VERSION = 1  # the train.py record format this script reads
DPI = 150
COLORS = [f"C{i}" for i in range(10)]
LINE_STYLES = ["-", "--", ":", "-."]  # with 10 colours: 20 distinct lines, and readable in greyscale
N_PREDICTIONS = 32  # 4 rows of 8: the labels stay legible on paper
FINAL_FIGURES = ["accuracy.png", "per_class.png", "confusion.png", "predictions.png", "datasize.png",
                 "speed.png", "accuracy_vs_params.png", "accuracy_vs_time.png"]
TABLE_COLUMNS = ["config", "arch", "pool", "opt", "stem", "pretrained", "fraction", "params", "epochs",
                 "best_val_acc", "test_acc_mean", "test_acc_std_ddof1", "n_seeds", "mean_epoch_time_s",
                 "img_per_s", "device"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dirs", nargs="*", default=["results"], metavar="RESULTS_DIR",
                   help="directories of run JSONs; only the top level is read, plus RESULTS_DIR/bench/*.json "
                        "for bench.png (default: results)")
    p.add_argument("--out", default="figures", help="where the PNGs, summary.md and summary.csv go (default: figures)")
    return p.parse_args(argv)


# ---- reading runs ----

def config_label(run_name: str) -> str:
    return re.sub(r"-s\d+$", "", run_name)


def load_run(path: Path) -> tuple[dict | None, str]:
    """Return (record, "") or (None, why it cannot be used)."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"malformed JSON ({e})"
    if not isinstance(record, dict) or "schema_version" not in record or "history" not in record:
        return None, "not a train.py run record (no schema_version/history)"
    if record["schema_version"] != SCHEMA_VERSION:
        return None, f"schema_version {record['schema_version']} but plot.py reads {SCHEMA_VERSION}: update plot.py"
    if not isinstance(record.get("name"), str) or not isinstance(record.get("config"), dict) \
            or not isinstance(record["history"], list):
        return None, "malformed run record (needs name, config and a history list)"
    return record, ""


def is_finished(run: dict) -> bool:
    final = run.get("final")
    return (run.get("status") == "finished" and isinstance(final, dict)
            and isinstance(final.get("test_acc"), float | int))


def load_runs(dirs: list[Path]) -> list[dict]:
    """Every usable record in the top level of dirs; each unusable or unfinished one is reported in one line."""
    runs, seen = [], {}
    for path in sorted(p for d in dirs for p in d.glob("*.json")):
        run, why = load_run(path)
        if run is None:
            print(f"skipped {path}: {why}")
            continue
        if run["name"] in seen:  # the same run copied into two dirs would count as two seeds
            print(f"skipped {path}: duplicate run name {run['name']!r} (also in {seen[run['name']]})")
            continue
        seen[run["name"]] = path
        if not is_finished(run):
            status = run.get("status") if run.get("status") != "finished" else "finished without final.test_acc"
            print(f"{path}: {status}: drawn as curves, left out of final-accuracy figures and the table")
        runs.append(run)
    return runs


def mean_of(values: list) -> float | None:
    """Mean of the finite numbers among values (None when there are none).

    For example best_val_acc is null without a val split."""
    xs = [v for v in values if isinstance(v, float | int) and math.isfinite(v)]
    return statistics.fmean(xs) if xs else None


def device_name(run: dict) -> str:
    """train.py records the device's model in env.device_name ("NVIDIA A100", the CPU model), its type in run.device."""
    return str(run.get("env", {}).get("device_name") or run.get("run", {}).get("device_name")
               or run.get("run", {}).get("device", "?"))


def summarize(configs: dict[str, list[dict]]) -> list[dict]:
    """One row per config that has finished runs, best mean test accuracy first."""
    rows = []
    for label, runs in configs.items():
        done = [r for r in runs if is_finished(r)]
        if not done:
            continue
        cfg, accs = done[0]["config"], [r["final"]["test_acc"] for r in done]
        rows.append({
            "config": label,
            **{k: cfg.get(k) for k in ("arch", "pool", "opt", "stem", "pretrained", "fraction", "epochs")},
            "params": done[0].get("model", {}).get("params"),
            "best_val_acc": mean_of([r["final"].get("best_val_acc") for r in done]),
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std_ddof1": statistics.stdev(accs) if len(accs) >= 2 else None,
            "n_seeds": len(done),
            "mean_epoch_time_s": mean_of([r["final"].get("mean_epoch_time_s") for r in done]),
            "img_per_s": mean_of([r["final"].get("train_img_per_s") for r in done]),
            "train_time_s": mean_of([r["final"].get("train_time_s") for r in done]),
            "device": " / ".join(sorted({device_name(r) for r in done})),
            "runs": done,
        })
    return sorted(rows, key=lambda row: (-row["test_acc_mean"], row["config"]))


def mean_curve(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch mean of history[key] over runs. Epochs a running run has not reached and non-finite values
    (diverged) are left out rather than cutting the curve short or turning it into NaN."""
    by_epoch = defaultdict(list)
    for run in runs:
        for h in run["history"]:
            v = h.get(key)
            if h.get("epoch") is not None and isinstance(v, float | int) and math.isfinite(v):
                by_epoch[h["epoch"]].append(v)
    epochs = sorted(by_epoch)
    return np.array(epochs), np.array([statistics.fmean(by_epoch[e]) for e in epochs])


# ---- writing ----

def save_figure(fig: Figure, path: Path) -> None:
    """Write atomically (data.py's one atomic writer) so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_atomically(path, lambda tmp: tmp.write_text(text))


# ---- figures: each returns None when drawn, else why it was not ----

def plot_loss_curves(configs: dict[str, list[dict]], path: Path) -> str | None:
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    for i, (label, runs) in enumerate(sorted(configs.items())):
        x, y = mean_curve(runs, "train_loss")
        unfinished = sum(not is_finished(r) for r in runs)
        name = f"{label} (n={len(runs)}" + (f", {unfinished} unfinished)" if unfinished else ")")
        ax.plot(x, y, color=COLORS[i % 10], linestyle=LINE_STYLES[i % 4], marker=".", label=name)
    ax.set(yscale="log", xlabel="epoch", ylabel="training loss (cross-entropy, log scale)",
           title="Training loss per epoch (mean over seeds)")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # "0.1" rather than "10⁻¹"
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small", ncols=1 + len(configs) // 25)
    save_figure(fig, path)


def plot_config_curves(label: str, runs: list[dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    panels = zip(fig.subplots(1, 2), ("loss", "acc"), (1, 100), ("cross-entropy", "%"), strict=True)
    for ax, metric, scale, unit in panels:
        for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
            x, y = mean_curve(runs, f"{split}_{metric}")
            if len(x):
                ax.plot(x, y * scale, linestyle=style, marker=".", label=split)
        ax.set(xlabel="epoch", ylabel=f"{'loss' if metric == 'loss' else 'accuracy'} ({unit})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{label}: mean over {len(runs)} run{'s' * (len(runs) > 1)}")
    save_figure(fig, path)


def plot_accuracy(rows: list[dict], path: Path) -> None:
    rows = rows[::-1]  # barh draws bottom-up: best config on top
    show_std = any(r["n_seeds"] >= 2 for r in rows)
    means = np.array([100 * r["test_acc_mean"] for r in rows])
    stds = np.array([100 * (r["test_acc_std_ddof1"] or 0) for r in rows])
    fig = Figure(figsize=(9, 1.5 + 0.35 * len(rows)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y, means, xerr=stds if show_std else None, capsize=3, color="C0")
    for yi, m, s in zip(y, means, stds, strict=False):
        ax.text(m + s + 0.5, yi, f"{m:.2f}", va="center", fontsize=8)
    ax.set_yticks(y, [f"{r['config']} (n={r['n_seeds']})" for r in rows], fontsize=8)
    ax.set_xlim(0, (means + stds).max() * 1.12)
    ax.set(xlabel="test accuracy (%)",
           title="Final test accuracy" + (" (mean ± sample std over seeds)" if show_std else " (one seed each)"))
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def annotated_heatmap(ax, values: np.ndarray, text: list[list[str]], cmap: str):
    im = ax.imshow(values, cmap=cmap, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        r, g, b, _ = im.cmap(im.norm(v))  # text colour from the cell's brightness: legible on any colormap
        ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7,
                color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    return im


def plot_per_class(rows: list[dict], classes: list[str], path: Path) -> str | None:
    rows = [r for r in rows if all(isinstance(run["final"].get("per_class_acc"), dict) for run in r["runs"])]
    if not rows:
        return "no finished run has final.per_class_acc"
    acc = np.array([[100 * statistics.fmean(run["final"]["per_class_acc"].get(c, math.nan) for run in r["runs"])
                     for c in classes] for r in rows])
    fig = Figure(figsize=(10, 1.8 + 0.4 * len(rows)), layout="constrained")
    ax = fig.subplots()
    im = annotated_heatmap(ax, acc, [[f"{v:.1f}" for v in row] for row in acc], "viridis")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r["config"] for r in rows], fontsize=8)
    ax.set(xlabel="true class", title="Per-class test accuracy (%) (mean over seeds)")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    save_figure(fig, path)


def plot_confusion(run: dict, classes: list[str], path: Path) -> str | None:
    if not run["final"].get("confusion"):
        return f"best run {run['name']} has no final.confusion"
    counts = np.array(run["final"]["confusion"])
    # colour by fraction of each true class, so rare and common classes read on one scale
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    ax = fig.subplots()
    im = annotated_heatmap(ax, frac, [[str(c) for c in row] for row in counts], "Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"Confusion matrix (counts), {run['name']}: test acc {100 * run['final']['test_acc']:.2f}%")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    save_figure(fig, path)


def plot_predictions(run: dict, classes: list[str], path: Path) -> str | None:
    pred = run["final"].get("predictions")
    if not pred:
        return f"best run {run['name']} has no final.predictions"
    n = min(N_PREDICTIONS, len(pred["indices"]))
    try:
        images = data.read_images(run["config"].get("data_dir", "data"), "test", list(pred["indices"][:n]))
    except (ImportError, OSError) as e:
        return f"test images unavailable ({type(e).__name__}: {e})"
    cols = 8
    fig = Figure(figsize=(cols * 1.5, math.ceil(n / cols) * 1.75), layout="constrained")
    for ax in fig.subplots(math.ceil(n / cols), cols, squeeze=False).flat:
        ax.axis("off")
    for k, ax in enumerate(fig.axes[:n]):
        true, guess = classes[pred["labels"][k]], classes[pred["preds"][k]]
        ax.imshow(images[k])
        ax.set_title(f"true: {true}\npred: {guess}", fontsize=7, color="green" if true == guess else "red",
                     fontweight="normal" if true == guess else "bold")  # bold: wrong ones show in greyscale too
    fig.suptitle(f"First {n} test images, {run['name']} (green = right, red bold = wrong)")
    save_figure(fig, path)


def plot_datasize(rows: list[dict], path: Path) -> str | None:
    # one line per (arch, pretrained); pool/stem/opt also split lines, so different designs are never averaged
    keys = ("arch", "pretrained", "pool", "stem", "opt")
    lines = defaultdict(list)
    for r in rows:
        if r["fraction"] is not None:
            lines[tuple(r[k] for k in keys)].append(r)
    lines = {k: v for k, v in lines.items() if len({r["fraction"] for r in v}) >= 2}
    if not lines:
        return "train fraction not varied"
    varying = [i for i in (2, 3, 4) if len({k[i] for k in lines}) > 1]
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for key, group in sorted(lines.items(), key=lambda kv: str(kv[0])):
        by_frac = defaultdict(list)
        for r in group:
            by_frac[r["fraction"]] += [100 * run["final"]["test_acc"] for run in r["runs"]]
        x = sorted(by_frac)
        y = [statistics.fmean(by_frac[f]) for f in x]
        err = [statistics.stdev(by_frac[f]) if len(by_frac[f]) >= 2 else 0 for f in x]
        label = " ".join([key[0], "pretrained" if key[1] else "scratch"] + [f"{keys[i]}={key[i]}" for i in varying])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    fractions = sorted({r["fraction"] for g in lines.values() for r in g})
    ax.set_xscale("log", base=2)
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="fraction of the training set (log₂ scale)", ylabel="test accuracy (%)",
           title="Test accuracy vs training-set size (mean ± sample std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_speed(rows: list[dict], path: Path) -> str | None:
    if all(r["mean_epoch_time_s"] is None and r["img_per_s"] is None for r in rows):
        return "no finished run has final.mean_epoch_time_s or final.train_img_per_s"
    rows = rows[::-1]
    fig = Figure(figsize=(11, 1.5 + 0.35 * len(rows)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(rows))
    panels = (("mean_epoch_time_s", "mean epoch time (s)"), ("img_per_s", "training throughput (images/s)"))
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        ax.barh(y, [math.nan if r[key] is None else r[key] for r in rows], color="C1")
        ax.set(xlabel=xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [r["config"] for r in rows], fontsize=8)
    devices = ", ".join(sorted({r["device"] for r in rows}))
    fig.suptitle(f"Training speed per config (mean over seeds; device: {devices})")
    save_figure(fig, path)


def plot_accuracy_vs(rows: list[dict], key: str, xlabel: str, path: Path, unit: float = 1, log: bool = False
                     ) -> str | None:
    rows = [r for r in rows if r[key] is not None]
    if len(rows) < 2:
        return f"fewer than 2 configs have {key}"
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(rows):
        x, y = r[key] / unit, 100 * r["test_acc_mean"]
        ax.errorbar(x, y, yerr=100 * (r["test_acc_std_ddof1"] or 0), marker="o", capsize=3, color=COLORS[i % 10])
        # rows are sorted by accuracy, so neighbours in y alternate sides and their labels do not collide
        ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(7 if i % 2 else -7, 0), va="center",
                    ha="left" if i % 2 else "right", fontsize=7)
    ax.margins(x=0.25)  # room for the labels beside the outermost points
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"Test accuracy vs {xlabel.split(' (')[0]}")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_bench(dirs: list[Path], path: Path) -> str | None:
    files = [p for d in dirs for p in d.glob("bench/*.json")]
    if not files:
        return "no RESULTS_DIR/bench/*.json"
    newest = max(files, key=lambda p: p.stat().st_mtime)
    try:
        bench = json.loads(newest.read_text())
        steps, speedup = bench["train_step"], bench.get("speedup", {})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return f"{newest} is not a bench record ({type(e).__name__}: {e})"
    archs = list(steps)
    modes = list(dict.fromkeys(m for a in archs for m in steps[a]))  # union, first-seen order
    width = 0.8 / len(modes)
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    for j, mode in enumerate(modes):
        ax.bar(np.arange(len(archs)) + (j - (len(modes) - 1) / 2) * width,
               [steps[a].get(mode, math.nan) for a in archs], width, label=mode)
    top = max(v for a in archs for v in steps[a].values())
    for i, a in enumerate(archs):
        if a in speedup:
            ax.text(i, max(steps[a].values()) + top * 0.02, f"speedup {speedup[a]:.2f}×", ha="center", fontsize=9)
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks(range(len(archs)), archs)
    ax.set(xlabel="architecture", ylabel="training throughput (images/s)",
           title=f"Train-step benchmark ({newest.name}): loader ratio {bench.get('loader_ratio', math.nan):.2f}, "
                 f"loader overhead {bench.get('loader_overhead', math.nan):.2f}")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", title="mode")
    save_figure(fig, path)


# ---- table ----

def cell(v: object, fmt: str = "") -> str:
    return "" if v is None else format(v, fmt)


def summary_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, TABLE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    # 8 significant digits: exact enough, without float noise like 0.8000000000000002
    writer.writerows({k: float(f"{v:.8g}") if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def summary_markdown(rows: list[dict]) -> str:
    header = ["config", "arch", "pool", "opt", "stem", "pretrained", "fraction", "params", "epochs",
              "best val acc (%)", "test acc (%)", "epoch time (s)", "img/s", "device"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        acc = f"{100 * r['test_acc_mean']:.2f}"
        if r["test_acc_std_ddof1"] is not None:
            acc += f" ± {100 * r['test_acc_std_ddof1']:.2f}"
        pct = None if r["best_val_acc"] is None else 100 * r["best_val_acc"]
        params = None if r["params"] is None else r["params"] / 1e6
        cells = [r["config"], cell(r["arch"]), cell(r["pool"]), cell(r["opt"]), cell(r["stem"]), cell(r["pretrained"]),
                 cell(r["fraction"], "g"), cell(params, ".2f") + "M" * (params is not None), cell(r["epochs"]),
                 cell(pct, ".2f"), f"{acc} (n={r['n_seeds']})", cell(r["mean_epoch_time_s"], ".1f"),
                 cell(r["img_per_s"], ".0f"), r["device"]]
        lines.append("| " + " | ".join(cells) + " |")
    note = "\nTest acc: mean ± sample std (ddof=1) over seeds; n = finished seeds. Sorted by test acc.\n"
    return "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dirs, out = [Path(d) for d in args.results_dirs], Path(args.out)
    for d in dirs:
        if not d.is_dir():
            sys.exit(f"{d} not found: run train.py (it writes results/<run>.json) or pass RESULTS_DIR")
    runs = load_runs(dirs)
    if not runs:
        sys.exit(f"no usable run JSONs in {', '.join(map(str, dirs))}: run train.py first")
    configs = defaultdict(list)
    for run in runs:
        configs[config_label(run["name"])].append(run)
    rows = summarize(configs)
    classes = next((r["classes"] for r in runs if r.get("classes")), [str(i) for i in range(10)])

    skipped = {"loss_curves.png": plot_loss_curves(configs, out / "loss_curves.png")}
    for label, config_runs in configs.items():
        plot_config_curves(label, config_runs, out / "curves" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', label)}.png")
    if rows:
        best = max(rows[0]["runs"], key=lambda r: r["final"]["test_acc"])
        skipped |= {
            "accuracy.png": plot_accuracy(rows, out / "accuracy.png"),
            "per_class.png": plot_per_class(rows, classes, out / "per_class.png"),
            "confusion.png": plot_confusion(best, classes, out / "confusion.png"),
            "predictions.png": plot_predictions(best, classes, out / "predictions.png"),
            "datasize.png": plot_datasize(rows, out / "datasize.png"),
            "speed.png": plot_speed(rows, out / "speed.png"),
            "accuracy_vs_params.png": plot_accuracy_vs(rows, "params", "parameters (millions, log scale)",
                                                       out / "accuracy_vs_params.png", unit=1e6, log=True),
            "accuracy_vs_time.png": plot_accuracy_vs(rows, "train_time_s", "total training time (s)",
                                                     out / "accuracy_vs_time.png"),
        }
    else:
        skipped |= dict.fromkeys(FINAL_FIGURES, "no finished runs")
    skipped["bench.png"] = plot_bench(dirs, out / "bench.png")
    skipped = {name: why for name, why in skipped.items() if why}
    for name in skipped:  # a figure left from earlier results would read as describing these ones
        (out / name).unlink(missing_ok=True)
    if skipped:
        print("skipped figures: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    if rows and all(r["n_seeds"] == 1 for r in rows):
        print("one seed per config: accuracy.png has no error bars, summary has no std")
    if not any("val_acc" in h for run in runs for h in run["history"]):
        print("no val split (config.val_split = 0): curves show train/test only, best val acc is blank")

    markdown = summary_markdown(rows)
    write_text_atomic(out / "summary.md", markdown)
    write_text_atomic(out / "summary.csv", summary_csv(rows))
    print(f"wrote figures, summary.md and summary.csv to {out}/\n")
    print(markdown)


if __name__ == "__main__":
    main()
