"""Turn train.py's run records (RESULTS_DIR/*.json) into figures, a summary table and one page, report.html.

    python plot.py                                 # results/ -> figures/
    python plot.py results old_results --out figs  # several result dirs into one set of figures
    python plot.py --status results                # one line per run: status, epochs, test acc, epoch time

Runs are grouped into configs by name minus the trailing "-s<seed>"; a config's factors are its record's
"factors". Finished runs make the table and the final-accuracy figures, the others are drawn as curves, and
summary.md starts with what the comparison can conclude (docs/statistics.md says how). A figure that does not
apply is not drawn, nor left stale in --out.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import itertools
import json
import math
import re
from statistics import fmean, stdev
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from scipy import stats
from statsmodels.regression.linear_model import OLS
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportions_ztest
# Figure objects rather than pyplot: no GUI backend to pick, no global figures to close
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogFormatter, MaxNLocator, NullLocator

# data.py imports only numpy at the top (torch and FFCV inside the functions that need them)
import data

SCHEMA_VERSION = 1  # the train.py record format this script reads
DPI = 150
LINE_STYLES = ["-", "--", ":", "-."]  # with 10 colours: 20 distinct lines, and readable in greyscale
N_PREDICTIONS = 32  # 4 rows of 8: the labels stay legible on paper
ALPHA = 0.05  # two-sided level of every interval and test here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dirs", nargs="*", default=["results"], metavar="RESULTS_DIR",
                   help="directories of run JSONs; only the top level is read, plus RESULTS_DIR/bench/*.json "
                        "for bench.png (default: results)")
    p.add_argument("--out", default="figures",
                   help="where the PNGs, summary.md, summary.csv and report.html go (default: figures)")
    p.add_argument("--status", action="store_true",
                   help="only print one line per run record (status, epochs, test acc, epoch time) and a total")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dirs, out = [Path(d) for d in args.results_dirs], Path(args.out)
    if args.status:
        return print_status([d for d in dirs if d.is_dir()])  # a folder not made yet has no runs
    if missing := [d for d in dirs if not d.is_dir()]:
        sys.exit(f"{missing[0]} not found: run train.py (it writes results/<run>.json) or pass RESULTS_DIR")
    runs = load_runs(dirs)
    if not runs:
        sys.exit(f"no usable run JSONs in {', '.join(map(str, dirs))}: run train.py first")
    configs = defaultdict(list)
    for run in runs:
        configs[re.sub(r"-s\d+$", "", run["name"])].append(run)
        if run["status"] != "finished":
            print(f"{run['_file']}: {run['status']}: drawn as curves, left out of final-accuracy figures and the table")
    rows, by = rank(summarize(configs))
    mark_ties_with_best(rows, by)
    effects, words = factor_model(rows)
    blocks = [*(("conclusion", line) for line in conclusion_lines(rows, by)), *config_table(rows, by),
              *(factor_table(effects, words) if effects else [])]
    figures, skipped = draw_figures(configs, rows, by, runs[0]["classes"], dirs, out)
    not_drawn = "; ".join(f"{name} ({why})" for name, why in skipped.items())
    if skipped:
        print("skipped figures: " + not_drawn)
    if rows and all(r["n_seeds"] == 1 for r in rows):
        print("one seed per config: intervals cover test-set sampling only, not seed-to-seed spread (run SEEDS=3)")
    if not any("val_acc" in h for run in runs for h in run["history"]):
        print("no val split (config.val_split = 0): curves show train/test only, configs are ranked by test acc")
    elif by == "test" and rows:
        print("val split in only some configs: ranked by test acc (give every config --val-split to choose by val)")

    markdown = to_markdown(blocks)
    save(out / "summary.md", markdown)
    save(out / "summary.csv", summary_csv(rows))
    save(out / "factors.csv", csv_text(effects, ["factor", "level", "reference", "effect", "ci95", "residual_df", "p"]))
    page = [*blocks, ("heading", "Environment"), ("table", ["field", "value"], environment(runs), None),
            ("heading", "Figures")]
    if skipped:
        page.append(("note", "Not drawn: " + not_drawn))
    page += [("figure", out / name, name, caption) for name, caption in figures.items()]
    save(out / "report.html", to_html(f"ResNets on CIFAR-10: {', '.join(map(str, dirs))}", page))
    print(f"wrote figures, summary.md, summary.csv, factors.csv and report.html to {out}/\n")
    print(markdown)


# ---- reading runs: a record's format is checked once, here; the rest indexes what train.py always writes ----

def finite(v: object) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v)


def load_run(path: Path) -> tuple[dict | None, str]:
    """Return (record, "") or (None, why it cannot be used)."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"malformed JSON ({e})"
    if not isinstance(record, dict) or "schema_version" not in record:
        return None, "not a train.py run record (no schema_version)"
    if record["schema_version"] != SCHEMA_VERSION:
        return None, f"schema_version {record['schema_version']} but plot.py reads {SCHEMA_VERSION}: train it again"
    return record, ""


def load_runs(dirs: list[Path]) -> list[dict]:
    """Every usable record in the top level of dirs; each unusable one is reported in one line."""
    runs, seen = [], {}
    for path in sorted(p for d in dirs for p in d.glob("*.json")):
        run, why = load_run(path)
        if run is None:
            print(f"skipped {path}: {why}")
        elif run["name"] in seen:  # the same run copied into two dirs would count as two seeds
            print(f"skipped {path}: duplicate run name {run['name']!r} (also in {seen[run['name']]})")
        else:
            seen[run["name"]] = run["_file"] = path  # files it names (the preview images) are relative to it
            runs.append(run)
    return runs


def val_size(run: dict) -> int | None:
    """How many images the val accuracy was measured on: data.split_indices' split, undone from train_images."""
    split, fraction = run["config"]["val_split"], run["config"]["fraction"]
    return round(run["run"]["train_images"] / fraction / (1 - split) * split) if split > 0 else None


def right_per_image(final: dict) -> np.ndarray:
    return np.array(list(final["test_preds"])) == np.array(list(final["test_labels"]))  # one digit per test image


# ---- statistics: scipy.stats for the tests, statsmodels for the factor model ----

def accuracy_interval(accs: list[float], n_images: int) -> tuple[float, str]:
    """(half-width of the 95 % interval of the mean accuracy, what it is over: "seeds" or "images")."""
    if len(accs) >= 2:  # Student t with n - 1 df
        return stats.t.ppf(1 - ALPHA / 2, len(accs) - 1) * stats.sem(accs), "seeds"
    # one seed: only the test set's own sampling error, its binomial standard error, can be measured
    return stats.norm.ppf(1 - ALPHA / 2) * math.sqrt(accs[0] * (1 - accs[0]) / n_images), "images"


def p_or_certain(p: float, a: list[float], b: list[float]) -> float:
    """A test's p; where there is no spread at all (p is NaN), any difference is certain and none is no evidence."""
    return float(fmean(a) == fmean(b)) if math.isnan(p) else float(p)


def compare_with_best(best: dict, row: dict, by: str) -> tuple[str, float]:
    """(the test used, its two-sided p) for "row's `by` accuracy differs from the best's"."""
    a, b = best[f"{by}_accs"], row[f"{by}_accs"]
    if len(a) >= 2 and len(b) >= 2:
        return "Welch t", p_or_certain(stats.ttest_ind(a, b, equal_var=False).pvalue, a, b)
    if len(a) >= 2 or len(b) >= 2:  # the single run against a prediction interval from the other config's seeds
        (x,), ys = (b, a) if len(a) >= 2 else (a, b)
        se = stdev(ys) * math.sqrt(1 + 1 / len(ys))
        p = 2 * stats.t.sf(abs(x - fmean(ys)) / se, len(ys) - 1) if se else math.nan
        return "1 run vs seeds t", p_or_certain(p, a, b)
    fa, fb = best["runs"][0]["final"], row["runs"][0]["final"]  # test_preds: kept when every label is one digit
    if by == "test" and "test_preds" in fa and "test_preds" in fb and fa["test_labels"] == fb["test_labels"]:
        ra, rb = right_per_image(fa), right_per_image(fb)  # the same test images in the same order: pair them
        only_a, only_b = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
        return "McNemar", stats.binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    na, nb = best[f"n_{by}_images"], row[f"n_{by}_images"]  # unpaired: it finds ties more easily than McNemar
    return "two-proportion z", p_or_certain(proportions_ztest([a[0] * na, b[0] * nb], [na, nb])[1], a, b)


def mark_ties_with_best(rows: list[dict], by: str) -> None:
    """Set each row's vs_best: "best", "tied" (not separable from the best at 5 %, Holm over the k - 1 tests) or
    "worse"; vs_best_p is the uncorrected p, vs_best_p_holm the one the verdict uses."""
    tests = [compare_with_best(rows[0], row, by) for row in rows[1:]]
    holm = multipletests([p for _, p in tests], ALPHA, "holm")[1] if tests else []
    for row, (test, p), p_holm in zip(rows, [("", None), *tests], [None, *map(float, holm)], strict=False):
        row |= {"vs_best": "best" if p is None else "tied" if p_holm >= ALPHA else "worse",
                "vs_best_test": test, "vs_best_p": p, "vs_best_p_holm": p_holm}


# ---- configs: accuracy with its interval, ranking, ties with the best ----

def summarize(configs: dict[str, list[dict]]) -> list[dict]:
    """One row per config that has finished runs, with test (and val) accuracy: mean, spread and interval."""
    rows = []
    for label, runs in configs.items():
        done = [r for r in runs if r["status"] == "finished"]
        if not done:
            continue
        finals = [r["final"] for r in done]
        test_accs, val_accs = [f["test_acc"] for f in finals], [f["val_acc"] for f in finals]
        val_accs = None if None in val_accs else val_accs  # final.val_acc is null without a val split
        n_test, n_val = int(np.sum(finals[0]["confusion"])), val_size(done[0])  # the confusion counts each image once
        test_ci, test_ci_over = accuracy_interval(test_accs, n_test)
        rows.append({
            "config": label, "factors": {k: tuple(v) if isinstance(v, list) else v
                                         for k, v in done[0]["factors"].items()},
            "params": done[0]["model"]["params"],
            "best_val_acc": fmean(f["best_val_acc"] for f in finals) if val_accs else None,
            "val_accs": val_accs, "val_acc_mean": fmean(val_accs) if val_accs else None,
            "val_acc_ci95": accuracy_interval(val_accs, n_val)[0] if val_accs else None, "n_val_images": n_val,
            "test_accs": test_accs, "test_acc_mean": fmean(test_accs),
            "test_acc_std_ddof1": stdev(test_accs) if len(test_accs) >= 2 else None,
            "test_acc_ci95": test_ci, "test_acc_ci95_over": test_ci_over, "n_test_images": n_test,
            "n_seeds": len(done), "mean_epoch_time_s": fmean(f["mean_epoch_time_s"] for f in finals),
            "img_per_s": fmean(f["train_img_per_s"] for f in finals),
            "train_time_s": fmean(f["train_time_s"] for f in finals),
            "device": " / ".join(sorted({r["env"]["device_name"] for r in done})), "runs": done})
    return rows


def rank(rows: list[dict]) -> tuple[list[dict], str]:
    """(rows best first, the accuracy that ranks them): "val" when every config has one, else "test"."""
    # choosing by test accuracy would make the test set a second val set and bias the chosen accuracy upwards
    by = "val" if rows and all(r["val_accs"] for r in rows) else "test"
    return sorted(({**r, "ranked_by": by} for r in rows), key=lambda r: (-r[f"{by}_acc_mean"], r["config"])), by


def shown_run(row: dict) -> tuple[dict, str]:
    """The seed confusion.png and predictions.png show, and why: the best val acc, else the median (best flatters)."""
    runs = row["runs"]
    if row["val_accs"]:
        return max(runs, key=lambda r: (r["final"]["val_acc"], r["name"])), "its best val acc"
    by_test = sorted(runs, key=lambda r: (r["final"]["test_acc"], r["name"]))
    return by_test[(len(by_test) - 1) // 2], f"median test acc of {len(runs)} seeds" if len(runs) > 1 else "one seed"


# ---- factors: one least-squares model of test accuracy over every finished run, each seed a row ----

def varying_factors(rows: list[dict]) -> list[str]:
    """The factors whose level differs between configs, in the records' order."""
    return [k for k in dict.fromkeys(k for r in rows for k in r["factors"])
            if len({r["factors"].get(k) for r in rows}) > 1]


def level_order(v: object) -> tuple:
    """Numbers in numeric order (fraction 0.25 < 0.5 < 1), then text, then None."""
    return (v is None, not finite(v), v if finite(v) else str(v))


def fit(y: np.ndarray, columns: dict[tuple, np.ndarray]) -> tuple[object, dict[tuple, tuple | None]]:
    """OLS of y on an intercept and the 0/1 columns: the fit, and {column: (coefficient, ± 95 % CI, p)}, None where
    the design cannot estimate it (a pseudo-inverse would print a number either way)."""
    x = np.column_stack([np.ones(len(y)), *columns.values()])
    with warnings.catch_warnings():  # a rank-deficient design is expected here: its inestimable effects are named
        warnings.simplefilter("ignore")
        model = OLS(y, x).fit()
    estimable = np.isclose(np.diag(np.linalg.pinv(x) @ x), 1)  # its unit vector lies in the design's row space
    with np.errstate(all="ignore"):  # no residual df (one run per coefficient): no interval, no p
        half = stats.t.ppf(1 - ALPHA / 2, model.df_resid) * model.bse if model.df_resid else np.full(len(x.T), np.nan)
        return model, {key: (model.params[j], half[j], model.pvalues[j]) if estimable[j] else None
                       for j, key in enumerate(columns, 1)}


def factor_model(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Each level of each varying factor against its first level, in points of test accuracy, from the additive
    model over every finished run; and, with >= 2 seeds in every config, what the interactions say in words."""
    factors, runs = varying_factors(rows), [(r["factors"], 100 * acc) for r in rows for acc in r["test_accs"]]
    y = np.array([acc for _, acc in runs])
    levels = {f: sorted({r["factors"].get(f) for r in rows}, key=level_order) for f in factors}
    main = {(f, v): np.array([fs.get(f) == v for fs, _ in runs], float) for f in factors for v in levels[f][1:]}
    if not main:
        return [], []
    additive, coefs = fit(y, main)
    effects = [{"factor": f, "level": v, "reference": levels[f][0], "residual_df": int(additive.df_resid),
                **dict(zip(["effect", "ci95", "p"], coefs[f, v] or [None] * 3, strict=True))} for f, v in main]
    # interactions of factors whose main effects can be told apart, when seeds give the spread to test them on
    separable = [f for f in factors if all(e["effect"] is not None for e in effects if e["factor"] == f)]
    seeded = all(r["n_seeds"] >= 2 for r in rows)
    return effects, [w for f, g in itertools.combinations(separable, 2) if seeded
                     for w in interaction_words(y, main, additive, levels, f, g)]


def interaction_words(y: np.ndarray, main: dict, additive, levels: dict, f: str, g: str) -> list[str]:
    """Whether f's effect depends on g: the additive model against it plus the f x g terms (an F test)."""
    terms = {(a, b): main[a] * main[b] for a in main if a[0] == f for b in main if b[0] == g}
    model, coefs = fit(y, main | terms)
    if all(coefs[t] is None for t in terms):
        return [f"{f} × {g}: the interaction cannot be estimated (a cell of the grid has no runs)"]
    p = model.compare_f_test(additive)[1]
    if p >= ALPHA:
        return []
    words = []
    for a in (k for k in main if k[0] == f):
        what = f"{f}'s effect" + (f" ({a[1]} vs {levels[f][0]})" if len(levels[f]) > 2 else "")
        parts = [coefs[a]] + [coefs[a, b] for b in main if b[0] == g]  # at g's reference, then the change at each
        if None in parts:
            words.append(f"{what} depends on {g} (interaction F test, {p_text(p)}); a cell of the grid has no runs")
            continue
        base, changes = parts[0][0], [0.0] + [change[0] for change in parts[1:]]
        at = ", ".join(f"{base + change:+.1f} with {v}" for change, v in zip(changes, levels[g], strict=True))
        words.append(f"{what} depends on {g}: {at} (interaction F test, {p_text(p)})")
    return words


# ---- conclusions in words ----

def acc_text(row: dict, by: str) -> str:
    return f"{100 * row[f'{by}_acc_mean']:.2f} ± {100 * row[f'{by}_acc_ci95']:.2f}"


def chosen_text(row: dict, by: str) -> str:
    accs = acc_text(row, "test") if by == "test" else f"val {acc_text(row, 'val')}, test {acc_text(row, 'test')}"
    return f"{row['config']} ({accs})"


def conclusion_lines(rows: list[dict], by: str) -> list[str]:
    """What the comparison can conclude: the best config, the ones tied with it, and what would settle more."""
    if not rows:
        return []
    best, others = rows[0], rows[1:]
    tied = [r for r in others if r["vs_best"] == "tied"]
    single = [r["config"] for r in rows if r["n_seeds"] == 1]
    all_single_and_tied = len(single) == len(rows) and len(tied) == len(others)
    lines = ["Ranked and chosen by val accuracy; test accuracy is reported for the chosen configs, never used "
             "to choose."] if by == "val" else []
    if not others:
        lines.append(f"one config: {chosen_text(best, by)}; nothing to compare it with")
    elif all_single_and_tied:
        lines.append(f"no config is separable from the best at n = 1 (top: {chosen_text(best, by)}) — run SEEDS=3")
    else:
        names = ", ".join(chosen_text(r, by) if by == "val" else r["config"] for r in tied)
        lines.append(f"best: {chosen_text(best, by)}; "
                     + (f"statistically tied with: {names}" if tied else "every other config is separably worse"))
    if single and others and not all_single_and_tied:
        which = "every config" if len(single) == len(rows) else ", ".join(single)
        lines.append(f"n = 1 for {which}: intervals and tests there cover {by}-set sampling only, "
                     "not seed-to-seed spread — run SEEDS=3 before trusting a gap")
    return lines


# ---- figures: each returns the Figure, or why it does not apply; its docstring is its caption in report.html ----

def draw_figures(configs: dict[str, list[dict]], rows: list[dict], by: str, classes: list[str], dirs: list[Path],
                 out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write every figure that applies: ({name: caption} of those drawn, {name: why not} of the others)."""
    final = {"accuracy.png": (plot_accuracy, rows, by), "per_class.png": (plot_per_class, rows, classes),
             "confusion.png": (plot_confusion, rows, classes), "predictions.png": (plot_predictions, rows, classes),
             "datasize.png": (plot_datasize, rows), "speed.png": (plot_speed, rows),
             "accuracy_vs_params.png": (plot_accuracy_vs, rows, "params"),
             "accuracy_vs_time.png": (plot_accuracy_vs, rows, "train_time_s")}
    figures = {"loss_curves.png": (plot_loss_curves, configs), **final, "bench.png": (plot_bench, dirs)}
    note = ""
    if rows:
        shown, why = shown_run(rows[0])
        print(f"confusion.png and predictions.png show {shown['name']} ({why})")
        note = f" Shown: {shown['name']}, the {'chosen' if by == 'val' else 'best'} config's seed with {why}."
    drawn, skipped = {}, {}
    for name, (plot, *inputs) in figures.items():
        fig = plot(*inputs) if rows or name not in final else "no finished runs"
        if isinstance(fig, str):
            skipped[name] = fig
            (out / name).unlink(missing_ok=True)  # a figure left from earlier results would describe these ones
        else:
            save(out / name, fig)
            drawn[name] = " ".join(plot.__doc__.split()) + note * (name in ("confusion.png", "predictions.png"))
    for label, config_runs in configs.items():
        name = f"curves/{re.sub(r'[^A-Za-z0-9._-]', '_', label)}.png"
        save(out / name, plot_config_curves(label, config_runs))
        drawn[name] = (f"Train, val and test loss and accuracy per epoch of {label}, mean over its "
                       f"{len(config_runs)} run{'s' * (len(config_runs) > 1)}: over- or under-fitting at a glance.")
    return drawn, skipped


def save(path: Path, content: Figure | str) -> None:
    """Write a figure (PNG) or a text with data.py's one atomic writer: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Figure):
        data.write_atomically(path, lambda tmp: content.savefig(tmp, format="png", dpi=DPI))
    else:
        data.write_atomically(path, lambda tmp: tmp.write_text(content))


def new_figure(width: float, height: float, title: str, *grid: int, **subplots) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.suptitle(title, fontsize=10)
    return fig, fig.subplots(*grid, **subplots)


def style(ax, grid: str = "both", log: str = "", integer_x: bool = False, **props) -> None:
    """The axes' labels and limits, a light grid, and a log axis that reads "0.1" rather than "10⁻¹"."""
    ax.set(**props)
    ax.grid(axis=grid, alpha=0.3)
    for axis in [a for a, name in ((ax.xaxis, "x"), (ax.yaxis, "y")) if name in log]:
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def mean_curve(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch mean of history[key] over the runs that have a finite value there (not diverged, not running)."""
    by_epoch = defaultdict(list)
    for run in runs:
        for h in run["history"]:
            if finite(h.get(key)):  # val_* only with a val split
                by_epoch[h["epoch"]].append(h[key])
    epochs = sorted(by_epoch)
    return np.array(epochs), np.array([fmean(by_epoch[e]) for e in epochs])


def plot_loss_curves(configs: dict[str, list[dict]]) -> Figure:
    """Training loss per epoch, mean over each config's seeds (log scale): how fast and how far each config fits
    the training set."""
    fig, ax = new_figure(10, 5.5, "Training loss per epoch (mean over seeds)")
    for i, (label, runs) in enumerate(sorted(configs.items())):
        unfinished = sum(r["status"] != "finished" for r in runs)
        ax.plot(*mean_curve(runs, "train_loss"), color=f"C{i % 10}", linestyle=LINE_STYLES[i % 4], marker=".",
                label=f"{label} (n={len(runs)}" + (f", {unfinished} unfinished)" if unfinished else ")"))
    style(ax, log="y", integer_x=True, yscale="log", xlabel="epoch", ylabel="training loss (cross-entropy, log scale)")
    fig.legend(loc="outside right upper", fontsize="small", ncols=1 + len(configs) // 25)
    return fig


def plot_config_curves(label: str, runs: list[dict]) -> Figure:
    fig, axes = new_figure(11, 4.2, f"{label}: mean over {len(runs)} run{'s' * (len(runs) > 1)}", 1, 2)
    for ax, metric, scale, ylabel in zip(axes, ("loss", "acc"), (1, 100), ("loss (cross-entropy)", "accuracy (%)"),
                                         strict=True):
        for split, linestyle in (("train", "-"), ("val", "--"), ("test", ":")):
            x, y = mean_curve(runs, f"{split}_{metric}")
            if len(x):
                ax.plot(x, y * scale, linestyle=linestyle, marker=".", label=split)
        style(ax, integer_x=True, xlabel="epoch", ylabel=ylabel)
        ax.legend()
    return fig


# each config in accuracy.png by how it compares with the best: (colour, legend label)
VERDICTS = {"best": ("C2", "best"), "tied": ("C0", "tied with the best (5 %)"), "worse": ("0.55", "separably worse")}


def plot_accuracy(rows: list[dict], by: str) -> Figure:
    """Mean test accuracy of each config with its 95 % interval (filled: t over seeds; open: one seed, test-set
    sampling only); green is the best config, blue the configs tied with it, grey the separably worse ones."""
    rows = rows[::-1]  # drawn bottom-up: best config on top; points, not bars from zero, so intervals show
    order = ", ordered by val accuracy (the choice)" if by == "val" else ""
    fig, ax = new_figure(9, 1.8 + 0.35 * len(rows), f"Final test accuracy, mean ± 95 % CI{order}\nfilled: t over "
                         "seeds; open: one seed, test-set sampling only")
    ends = []
    for y, r in enumerate(rows):
        mean, half = 100 * r["test_acc_mean"], 100 * r["test_acc_ci95"]
        filled = r["test_acc_ci95_over"] == "seeds"
        color, label = VERDICTS[r["vs_best"]]
        ax.errorbar(mean, y, xerr=half, fmt="o" if filled else "s", capsize=4, color=color,
                    markerfacecolor=None if filled else "white", label=label)
        ax.annotate(f"{mean:.2f}" + (f" ± {half:.2f}" if half else ""), (mean + half, y), xytext=(5, 0),
                    textcoords="offset points", va="center", fontsize=8)
        ends += [mean - half, mean + half]
    ax.set_yticks(range(len(rows)), [f"{r['config']} (n={r['n_seeds']})" for r in rows], fontsize=8)
    lo, hi = min(ends), max(ends)
    span = max(hi - lo, 1.0)  # room for the value labels right of the intervals; no accuracy is below 0
    style(ax, "x", xlabel="test accuracy (%)", ylim=(-0.7, len(rows) - 0.3),
          xlim=(max(lo - 0.05 * span, 0), hi + 0.25 * span))
    handles = dict(zip(*ax.get_legend_handles_labels()[::-1], strict=True))
    labels = [label for _, label in VERDICTS.values() if label in handles]  # one entry per verdict, in order
    fig.legend([handles[k] for k in labels], labels, fontsize=8, loc="outside lower center", ncols=4)
    return fig


def heatmap(values: np.ndarray, text: list[list[str]], cmap: str, size: tuple[float, float], title: str,
            xlabels: list[str], ylabels: list[str], colorbar: str, **props) -> Figure:
    fig, ax = new_figure(*size, title)
    im = ax.imshow(values, cmap=cmap, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        r, g, b, _ = im.cmap(im.norm(v))  # text colour from the cell's brightness: legible on any colormap
        ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7,
                color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    ax.set(**props)
    fig.colorbar(im, ax=ax, label=colorbar)
    return fig


def plot_per_class(rows: list[dict], classes: list[str]) -> Figure:
    """Test accuracy per true class, mean over seeds: which classes each config finds hard."""
    acc = np.array([[100 * fmean(run["final"]["per_class_acc"][c] for run in r["runs"]) for c in classes]
                    for r in rows])
    return heatmap(acc, [[f"{v:.1f}" for v in row] for row in acc], "viridis", (10, 1.8 + 0.4 * len(rows)),
                   "Per-class test accuracy (%) (mean over seeds)", classes, [r["config"] for r in rows],
                   "test accuracy (%)", xlabel="true class")


def plot_confusion(rows: list[dict], classes: list[str]) -> Figure:
    """Confusion matrix of the shown run: which classes it mistakes for which (colour: fraction of the true class)."""
    run = shown_run(rows[0])[0]
    counts = np.array(run["final"]["confusion"])
    # colour by fraction of each true class, so rare and common classes read on one scale
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return heatmap(frac, [[str(c) for c in row] for row in counts], "Blues", (8, 6.5),
                   f"Confusion matrix (counts), {run['name']}: test acc {run['final']['test_acc']:.2%}",
                   classes, classes, "fraction of the true class", xlabel="predicted class", ylabel="true class")


def preview_images(run: dict, indices: list[int]) -> np.ndarray | str:
    """The test images at `indices` from the preview file the record names (RESULTS_DIR/previews/), or why not."""
    name = run["final"]["predictions"].get("images")  # absent when train.py could not keep them
    if not name:
        return "the record names no preview images (train.py could not keep them)"
    try:
        with np.load(Path(run["_file"]).parent / name) as preview:
            position = {int(i): k for k, i in enumerate(preview["indices"])}
            return preview["images"][[position[i] for i in indices]]
    except (OSError, ValueError, KeyError) as e:
        return f"preview images unavailable ({type(e).__name__}: {e})"


def plot_predictions(rows: list[dict], classes: list[str]) -> Figure | str:
    """A fixed class-balanced sample of test images, the same for every run, with the shown run's predictions
    (green: right; red bold: wrong)."""
    run = shown_run(rows[0])[0]
    pred = run["final"]["predictions"]
    n = min(N_PREDICTIONS, len(pred["indices"]))
    images = preview_images(run, pred["indices"][:n])
    if isinstance(images, str):
        return images
    fig, axes = new_figure(12, math.ceil(n / 8) * 1.75, f"{n} test images (a fixed class-balanced sample, the same "
                           f"for every run), {run['name']} (green = right, red bold = wrong)", math.ceil(n / 8), 8,
                           squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            true, guess = classes[pred["labels"][k]], classes[pred["preds"][k]]
            ax.imshow(images[k])
            ax.set_title(f"true: {true}\npred: {guess}", fontsize=7, color="green" if true == guess else "red",
                         fontweight="normal" if true == guess else "bold")  # bold: wrong ones show in greyscale too
    return fig


def plot_datasize(rows: list[dict]) -> Figure | str:
    """Test accuracy against the fraction of the training set used, one line per design: what more data buys."""
    designs = defaultdict(list)  # one line per design (every factor but the fraction): designs are never averaged
    for r in rows:
        designs[str(sorted((k, v) for k, v in r["factors"].items() if k != "fraction"))].append(r)
    lines = [g for _, g in sorted(designs.items()) if len({r["factors"]["fraction"] for r in g}) >= 2]
    if not lines:
        return "train fraction not varied"
    names = [k for k in varying_factors([g[0] for g in lines]) if k != "fraction"]
    fig, ax = new_figure(8, 5, "Test accuracy vs training-set size (mean ± sample std over seeds)")
    for group in lines:
        by_frac = defaultdict(list)
        for r in group:
            by_frac[r["factors"]["fraction"]] += [100 * acc for acc in r["test_accs"]]
        x = sorted(by_frac)
        ax.errorbar(x, [fmean(by_frac[f]) for f in x], marker="o", capsize=3,
                    yerr=[stdev(by_frac[f]) if len(by_frac[f]) >= 2 else 0 for f in x],
                    label=" ".join(f"{k}={group[0]['factors'].get(k)}" for k in names) or "every config")
    fractions = sorted({r["factors"]["fraction"] for g in lines for r in g})
    ax.set_xscale("log", base=2)
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.xaxis.set_minor_locator(NullLocator())
    style(ax, xlabel="fraction of the training set (log₂ scale)", ylabel="test accuracy (%)")
    ax.legend()
    return fig


def plot_speed(rows: list[dict]) -> Figure:
    """Mean epoch time and training throughput of each config, and the device they ran on."""
    rows = rows[::-1]
    devices = ", ".join(sorted({r["device"] for r in rows}))
    fig, axes = new_figure(11, 1.5 + 0.35 * len(rows), f"Training speed per config (mean over seeds; device: "
                           f"{devices})", 1, 2, sharey=True)
    for ax, key, xlabel in zip(axes, ("mean_epoch_time_s", "img_per_s"),
                               ("mean epoch time (s)", "training throughput (images/s)"), strict=True):
        ax.barh(range(len(rows)), [r[key] for r in rows], color="C1")
        style(ax, "x", xlabel=xlabel)
    axes[0].set_yticks(range(len(rows)), [r["config"] for r in rows], fontsize=8)
    return fig


def plot_accuracy_vs(rows: list[dict], key: str) -> Figure | str:
    """Test accuracy (mean ± 95 % CI) against parameter count (what model size buys) or total training time
    (what compute buys)."""
    if len(rows) < 2:
        return "fewer than 2 configs"
    log = key == "params"
    what, unit, scale = ("parameters", "millions, log scale", 1e6) if log else ("total training time", "s", 1)
    fig, ax = new_figure(8, 5.5, f"Test accuracy vs {what}")
    for i, r in enumerate(rows):
        x, y = r[key] / scale, 100 * r["test_acc_mean"]
        ax.errorbar(x, y, yerr=100 * r["test_acc_ci95"], marker="o", capsize=3, color=f"C{i % 10}")
        # rows are sorted by accuracy, so neighbours in y alternate sides and their labels do not collide
        ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(7 if i % 2 else -7, 0), va="center",
                    ha="left" if i % 2 else "right", fontsize=7)
    ax.margins(x=0.25)  # room for the labels beside the outermost points
    style(ax, log="x" * log, xscale="log" if log else "linear", xlabel=f"{what} ({unit})",
          ylabel="test accuracy (%, mean ± 95 % CI)")
    return fig


def plot_bench(dirs: list[Path]) -> Figure | str:
    """Train-step throughput per architecture and mode, from the newest bench record."""
    files = [p for d in dirs for p in d.glob("bench/*.json")]
    if not files:
        return "no RESULTS_DIR/bench/*.json"
    newest = max(files, key=lambda p: p.stat().st_mtime)
    bench = json.loads(newest.read_text())  # bench.py's record, written atomically
    steps, speedup = bench["train_step"], bench["speedup"]  # a failed mode has no rate, nor its arch a speedup
    archs, modes = list(steps), list(dict.fromkeys(m for a in steps for m in steps[a]))  # union, first-seen order
    if not modes:
        return f"{newest} has no train-step rates (every mode failed)"
    top = max(v for a in steps for v in steps[a].values())
    overhead = f", loader overhead {bench['loader_overhead']:.2f}" if "loader_overhead" in bench else ""
    fig, ax = new_figure(9, 5, f"Train-step benchmark ({newest.name}): loader ratio {bench['loader_ratio']:.2f}"
                         + overhead)
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        ax.bar(np.arange(len(archs)) + (j - (len(modes) - 1) / 2) * width,
               [steps[a].get(mode, math.nan) for a in archs], width, label=mode)
    for i, a in enumerate(archs):
        if a in speedup:
            ax.text(i, max(steps[a].values()) + top * 0.02, f"speedup {speedup[a]:.2f}×", ha="center", fontsize=9)
    ax.set_xticks(range(len(archs)), archs)
    style(ax, "y", ylim=(0, top * 1.15), xlabel="architecture", ylabel="training throughput (images/s)")
    fig.legend(loc="outside right upper", title="mode")
    return fig


# ---- tables: summary.md and report.html render one list of blocks; summary.csv has the rows' numbers ----

def cell(v: object, fmt: str = "", scale: float = 1) -> str:
    return "" if v is None else format(v if scale == 1 else v * scale, fmt)


def p_text(p: float, name: str = "p") -> str:
    return f"{name} < 0.001" if p < 0.001 else f"{name} = {p:.3f}"


def vs_best_text(r: dict) -> str:
    if r["vs_best"] == "best":
        return "best"
    return f"{r['vs_best']} ({r['vs_best_test']}, {p_text(r['vs_best_p'])}, {p_text(r['vs_best_p_holm'], 'Holm')})"


CONFIG_COLUMNS = {  # after config and the factors that vary: header -> the cell of a row
    "params": lambda r: f"{r['params'] / 1e6:.2f}M",
    "val acc (%)": lambda r: acc_text(r, "val") if r["val_accs"] else "",
    "test acc (%)": lambda r: f"{100 * r['test_acc_mean']:.2f}",
    "± 95% CI": lambda r: f"± {100 * r['test_acc_ci95']:.2f}" + " †" * (r["test_acc_ci95_over"] == "images"),
    "sd": lambda r: cell(r["test_acc_std_ddof1"], ".2f", scale=100), "n": lambda r: str(r["n_seeds"]),
    "vs best": vs_best_text, "epoch time (s)": lambda r: f"{r['mean_epoch_time_s']:.1f}",
    "img/s": lambda r: f"{r['img_per_s']:.0f}", "device": lambda r: r["device"]}
TEST_NOTES = {  # what each test against the best is, said under the table when it was used
    "Welch t": "Welch's t-test on the seeds' accuracies (both configs have >= 2 seeds)",
    "1 run vs seeds t": "the single run against the other config's seeds (a prediction-interval t-test)",
    "McNemar": "exact McNemar test on two single runs' paired per-image test predictions",
    "two-proportion z": "two single runs without per-image predictions (unpaired: it calls ties more easily)"}


def config_table(rows: list[dict], by: str) -> list[tuple]:
    factors = varying_factors(rows)
    cells = [[r["config"], *(cell(r["factors"].get(f)) for f in factors), *(c(r) for c in CONFIG_COLUMNS.values())]
             for r in rows]
    notes = [f"Sorted by mean {by} accuracy" + (" (the val split chooses, the test set reports)" if by == "val" else "")
             + "; n = finished seeds. test acc: mean over seeds; ± 95% CI: Student t over seeds (n - 1 df); "
             "sd: sample std over seeds (ddof = 1); val acc: mean ± 95% CI of the reported model's val accuracy."]
    sizes = sorted({r["n_test_images"] for r in rows if r["test_acc_ci95_over"] == "images"})
    if sizes:
        notes.append(f"† One seed: ± is 1.96 × the binomial standard error sqrt(p(1 - p)/N) of an accuracy on "
                     f"N = {', '.join(f'{n:,}' for n in sizes)} test images (0.36 points at 85 % on 10,000): "
                     "test-set sampling only; seed-to-seed spread is not measured.")
    used = [f"{test}: {note}" for test, note in TEST_NOTES.items() if any(r["vs_best_test"] == test for r in rows)]
    if used:
        notes.append(f"vs best: two-sided tests at 5 % of {by} accuracy against the best, Holm-corrected over the "
                     f"{len(rows) - 1} tests (p uncorrected, Holm's p beside it); tied = not separable. "
                     + "; ".join(used) + ".")
    header = ["config", *factors, *CONFIG_COLUMNS]
    return [("heading", "Configs"), ("table", header, cells, [r["vs_best"] for r in rows]),
            *(("note", n) for n in notes)]


FACTOR_HEADER = ["factor", "level vs reference", "effect (points)", "± 95% CI", "residual df", "p"]


def factor_table(effects: list[dict], words: list[str]) -> list[tuple]:
    cells = [[e["factor"], f"{e['level']} vs {e['reference']}", cell(e["effect"], "+.2f") or "not estimable",
              f"± {e['ci95']:.2f}" if finite(e["ci95"]) else "", str(e["residual_df"]),
              p_text(e["p"]) if finite(e["p"]) else ""] for e in effects]
    missing = [f"{e['factor']} {e['level']} vs {e['reference']}" for e in effects if e["effect"] is None]
    notes = ["Factors: one least-squares model of test accuracy (points) over every finished run, each seed a row: "
             "the additive effects of the factors that vary, each level against the factor's first, ± 95% CI and p "
             "from the model's residual df; with >= 2 seeds per config, each pair's interaction is tested too (F "
             "test). An optimiser comes with the recipe train.py derives for it (lr, schedule, weight decay, momentum "
             "or betas) unless those were given."]
    if missing:
        notes.append(f"Not estimable: {', '.join(missing)}: no config changes it apart from the other factors (the "
                     "grid lacks the cells that would), so no effect is given.")
    return [("heading", "Factors"), ("table", FACTOR_HEADER, cells, None), *(("note", n) for n in notes + words)]


def to_markdown(blocks: list[tuple]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    parts = [("## " if kind == "heading" else "") + content[0] if kind != "table"
             else "\n".join([line(content[0]), "|" + "---|" * len(content[0]), *map(line, content[1])])
             for kind, *content in blocks]
    return "\n\n".join(parts) + "\n"


REPORT_CSS = """body { font-family: sans-serif; max-width: 1150px; margin: 1em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; } th { background: #f0f0f0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; } td.short { white-space: nowrap; }
tr.best td { background: #e6f4e6; } tr.tied td { background: #e8f0fb; } p.note { font-size: 13px; color: #444; }
p.conclusion { font-size: 17px; font-weight: bold; margin: 0.3em 0; } figcaption { font-size: 14px; margin-top: 0.3em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }"""
HTML_BLOCKS = {"heading": "<h2>{}</h2>", "conclusion": '<p class="conclusion">{}</p>', "note": '<p class="note">{}</p>'}


def html_block(kind: str, *content) -> str:
    if kind == "figure":  # a data URI, so the page is one file that can be mailed or archived alone
        path, name, caption = content
        png = base64.b64encode(path.read_bytes()).decode()
        return (f'<figure id="{html.escape(name)}"><img src="data:image/png;base64,{png}" alt="{html.escape(name)}">'
                f"<figcaption><b>{html.escape(name)}</b>: {html.escape(caption)}</figcaption></figure>")
    if kind != "table":
        return HTML_BLOCKS[kind].format(html.escape(content[0]))
    header, cells, row_classes = content
    # short cells (numbers, "± 0.59 †") never break inside; long ones (config names, test names) wrap
    tds = ["".join(('<td class="short">' if len(c) <= 16 else "<td>") + html.escape(c) + "</td>" for c in row)
           for row in cells]
    body = "".join(f'<tr class="{cls}">{td}</tr>\n' for td, cls in zip(tds, row_classes or [""] * len(cells),
                                                                      strict=True))
    return "<table>\n<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + f"</tr>\n{body}</table>"


def to_html(title: str, blocks: list[tuple]) -> str:
    body = "\n".join([f"<h1>{html.escape(title)}</h1>", *(html_block(*b) for b in blocks)])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>\n{REPORT_CSS}\n</style></head>\n<body>\n{body}\n</body></html>\n")


def environment(runs: list[dict]) -> list[list[str]]:
    """Each field of the records' env (device name, torch version, ...) with every value seen."""
    seen = defaultdict(Counter)
    for run in runs:
        for key, v in {"device": run["run"]["device"], **run["env"]}.items():
            if v is not None:
                seen[key][str(v)] += 1
    return [[key, ", ".join(v if len(counts) == 1 else f"{v} ({n} runs)" for v, n in counts.items())]
            for key, counts in seen.items()]


def summary_csv(rows: list[dict]) -> str:
    """One line per config: its name, every factor, then every number of its row."""
    factors = list(dict.fromkeys(k for r in rows for k in r["factors"]))
    numbers = [k for k, v in (rows[0] if rows else {}).items() if k != "config" and not isinstance(v, list | dict)]
    return csv_text([{**r["factors"], **r} for r in rows], ["config", *factors, *numbers])


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    # 8 significant digits: exact enough, without float noise like 0.8000000000000002
    writer.writerows({k: float(f"{v:.8g}") if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


# ---- --status: where each run stands, from the records alone ----

def print_status(dirs: list[Path]) -> None:
    """One line per run record in dirs, then the total; the sweep prints it."""
    runs, done_epochs, left_s = load_runs(dirs), 0, 0.0
    for r in runs:
        done, total = (r["history"][-1]["epoch"] if r["history"] else 0), r["config"]["epochs"]
        # once finished, final's mean (steady epochs only); else the mean of the epochs so far
        epoch_s = (r["final"]["mean_epoch_time_s"] if r["status"] == "finished"
                   else fmean(h["epoch_time_s"] for h in r["history"]) if r["history"] else None)
        acc = f"test {100 * r['final']['test_acc']:.2f} %" if r["status"] == "finished" else ""
        print((f"{r['name']:<32} {r['status']:<11} {done:>3}/{total} epochs  {acc:<13}"
               + ("" if epoch_s is None else f" {epoch_s:6.1f} s/epoch")).rstrip())
        done_epochs += done
        if r["status"] == "running":  # what a run that can go on (--resume) still has to train
            left_s += (total - done) * (epoch_s or 0)
    counts = ", ".join(f"{n} {status}" for status, n in Counter(r["status"] for r in runs).most_common())
    print(f"total: {len(runs)} runs" + (f" ({counts})" if runs else "")
          + f"; {done_epochs}/{sum(r['config']['epochs'] for r in runs)} epochs"
          + (f"; about {left_s / 60:.0f} min of epochs left at the measured epoch times" if left_s else ""))


if __name__ == "__main__":
    main()
