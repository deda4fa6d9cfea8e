"""Turn train.py's run records (RESULTS_DIR/*.json) into figures, a summary table and one page, report.html.

    python plot.py                                 # results/ -> figures/
    python plot.py results old_results --out figs  # several result dirs into one set of figures

Runs are grouped into configs by name minus the trailing "-s<seed>". Final-accuracy figures and the
table use finished runs only; running or diverged runs are still drawn as curves.
What the comparison can conclude comes first in summary.md (and is printed):
- each config's mean test accuracy with a 95 % interval: Student t over seeds (n - 1 df); with one seed,
  1.96 × the binomial standard error of an accuracy on the test set's N images, which leaves out
  seed-to-seed spread;
- the best config and the configs tied with it (two-sided tests at 5 %: Welch's t-test, or for single runs
  McNemar's test on paired per-image predictions, else a two-proportion test);
- when every config has a val split, configs are ranked and chosen by val accuracy and their test accuracy
  is reported, so the test set never chooses;
- for a grid, the effect of each factor (e.g. pool) averaged over matched configs of the other factors.
A figure that does not apply to the results at hand (e.g. datasize.png when no train fraction was
varied) is not drawn, a stale copy of it in --out is removed, and one line says why.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import re
import statistics
import sys
from collections import Counter, defaultdict
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
                 "best_val_acc", "val_acc_mean", "val_acc_ci95", "test_acc_mean", "test_acc_std_ddof1",
                 "test_acc_ci95", "test_acc_ci95_over", "n_seeds", "n_test_images", "ranked_by", "vs_best",
                 "vs_best_test", "vs_best_p", "mean_epoch_time_s", "img_per_s", "device"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dirs", nargs="*", default=["results"], metavar="RESULTS_DIR",
                   help="directories of run JSONs; only the top level is read, plus RESULTS_DIR/bench/*.json "
                        "for bench.png (default: results)")
    p.add_argument("--out", default="figures",
                   help="where the PNGs, summary.md, summary.csv and report.html go (default: figures)")
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
        run["_file"] = path  # where the record lies: files it names (the preview images) are relative to it
        if not is_finished(run):
            status = run.get("status") if run.get("status") != "finished" else "finished without final.test_acc"
            print(f"{path}: {status}: drawn as curves, left out of final-accuracy figures and the table")
        runs.append(run)
    return runs


def mean_of(values: list) -> float | None:
    """Mean of the finite numbers among values (None when there are none).

    For example best_val_acc is null without a val split."""
    xs = [v for v in values if finite(v)]
    return statistics.fmean(xs) if xs else None


def device_name(run: dict) -> str:
    """train.py records the device's model in env.device_name ("NVIDIA A100", the CPU model), its type in run.device."""
    return str(run.get("env", {}).get("device_name") or run.get("run", {}).get("device_name")
               or run.get("run", {}).get("device", "?"))


def finite(v: object) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v)


def test_size(run: dict) -> int | None:
    """How many test images final.test_acc was measured on."""
    final = run["final"]
    if isinstance(final.get("test_labels"), str):
        return len(final["test_labels"])
    if final.get("confusion"):  # records from before test_labels: the confusion matrix counts every image
        return int(sum(map(sum, final["confusion"])))
    return None


def val_acc(run: dict) -> float | None:
    """Val accuracy of the reported model: final.val_acc, else (older records) the last epoch's."""
    v = (run.get("final") or {}).get("val_acc")
    if not finite(v):
        v = next((h["val_acc"] for h in reversed(run["history"]) if "val_acc" in h), None)
    return v if finite(v) else None


def val_size(run: dict) -> int | None:
    """How many images the val accuracy was measured on. Records hold the training images, not these:
    data.split_indices holds out val_split of each class, then takes the fraction of the rest; undo that."""
    cfg, n_train = run["config"], run.get("run", {}).get("train_images")
    split, fraction = cfg.get("val_split") or 0, cfg.get("fraction") or 1
    if not (split > 0 and finite(n_train)):
        return None
    return round(n_train / fraction / (1 - split) * split)


def correct_per_image(run: dict) -> tuple[str, np.ndarray] | None:
    """(the test labels, whether each test image is right), from final.test_preds and final.test_labels."""
    preds, labels = run["final"].get("test_preds"), run["final"].get("test_labels")
    if not (isinstance(preds, str) and isinstance(labels, str) and len(preds) == len(labels)):
        return None
    return labels, np.frombuffer(preds.encode(), np.uint8) == np.frombuffer(labels.encode(), np.uint8)


# ---- statistics ----
# Plain math rather than scipy: scipy 1.18 needs Python >= 3.12 (ours is 3.11), and what this needs
# is four distributions that fit in a screen, each checked against closed forms in tests/test_stats.py.

ALPHA = 0.05  # two-sided level of every interval and test here
Z_975 = 1.959963984540054  # the standard normal's 97.5 % quantile


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by its continued fraction (modified Lentz; Numerical Recipes 6.4)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use I_x(a,b) = 1 - I_1-x(b,a)
        return 1 - regularized_beta(1 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    tiny = 1e-300
    d = 1 - (a + b) * x / (a + 1)
    c, d = 1.0, 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * f


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom (df may be fractional, as Welch's is)."""
    return regularized_beta(df / (df + t * t), df / 2, 0.5)


def t_quantile(q: float, df: float) -> float:
    """The q quantile (q > 0.5) of Student's t, by bisection on the tail probability."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 2 * (1 - q):
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 2 * (1 - q) else (lo, mid)
    return (lo + hi) / 2


def t_half_width(xs: list[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean of xs: Student t with n - 1 df."""
    return t_quantile(1 - ALPHA / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def binomial_se(acc: float, n_images: int) -> float:
    """Standard error of an accuracy measured on n_images: the test set's own sampling error."""
    return math.sqrt(acc * (1 - acc) / n_images)


def welch_p(xs: list[float], ys: list[float]) -> float:
    """Two-sided p of Welch's t-test (unequal variances, Welch-Satterthwaite df); needs >= 2 values each."""
    vx, vy = statistics.variance(xs) / len(xs), statistics.variance(ys) / len(ys)
    diff = statistics.fmean(xs) - statistics.fmean(ys)
    if vx + vy == 0:  # identical seeds on both sides: any difference at all is certain
        return float(diff == 0)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(xs) - 1) + vy ** 2 / (len(ys) - 1))
    return t_two_sided_p(diff / math.sqrt(vx + vy), df)


def single_run_vs_seeds_p(x: float, ys: list[float]) -> float:
    """Two-sided p that one run x comes from the same spread as the seeds ys (a prediction-interval t-test:
    t = (x - mean) / (sd * sqrt(1 + 1/n)), n - 1 df). It assumes x's config has the same seed spread as ys'."""
    sd = statistics.stdev(ys)
    diff = x - statistics.fmean(ys)
    if sd == 0:
        return float(diff == 0)
    return t_two_sided_p(diff / (sd * math.sqrt(1 + 1 / len(ys))), len(ys) - 1)


def mcnemar_p(only_a_right: int, only_b_right: int) -> float:
    """Exact two-sided McNemar test: of the images exactly one model gets right, is the split 50:50?"""
    n, k = only_a_right + only_b_right, min(only_a_right, only_b_right)
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0); integers throughout, so a large n neither overflows nor loses precision
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2 ** n)


def two_proportion_p(acc_a: float, n_a: int, acc_b: float, n_b: int) -> float:
    """Two-sided p of the pooled two-proportion z-test."""
    pooled = (acc_a * n_a + acc_b * n_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return float(acc_a == acc_b)
    return 2 * normal_sf(abs(acc_a - acc_b) / se)


# ---- configs: accuracy with its interval, ranking, ties with the best ----

def accuracy_interval(accs: list[float], n_images: int | None) -> tuple[float | None, str]:
    """(half-width of the 95 % interval of the mean accuracy, what it is over: "seeds" or "images")."""
    if len(accs) >= 2:
        return t_half_width(accs), "seeds"
    if n_images:  # one seed: only the test set's own sampling error can be measured
        return Z_975 * binomial_se(accs[0], n_images), "images"
    return None, ""


# config keys that say how a run was executed, not what was trained: never a factor of the comparison
NOT_FACTORS = {"seed", "name", "out", "data_dir", "device", "amp", "compile", "channels_last", "workers", "quiet",
               "resume", "from_json", "batch_size_per_rank"}


# train.py derives these from --opt, --batch-size and --epochs unless they are given: when derived they
# are part of that choice (adam's recipe is its lr, betas, wd and schedule), not factors of their own
DERIVED = {"lr", "momentum", "nesterov", "wd", "betas", "schedule", "warmup_epochs", "milestones"}


def design_factors(cfg: dict, given: dict | None) -> dict:
    """The choices a config made: its config less how it was run, and less the values train.py derived
    (records before `given` was kept count every value as a choice)."""
    derived = DERIVED - set(given) if isinstance(given, dict) else set()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k not in NOT_FACTORS | derived}


def summarize(configs: dict[str, list[dict]]) -> list[dict]:
    """One row per config that has finished runs, with test (and val) accuracy: mean, spread and interval."""
    rows = []
    for label, runs in configs.items():
        done = [r for r in runs if is_finished(r)]
        if not done:
            continue
        cfg, test_accs = done[0]["config"], [r["final"]["test_acc"] for r in done]
        val_accs = [val_acc(r) for r in done]
        val_accs = val_accs if None not in val_accs else None
        n_test, n_val = test_size(done[0]), val_size(done[0])
        test_ci, test_ci_over = accuracy_interval(test_accs, n_test)
        rows.append({
            "config": label,
            **{k: cfg.get(k) for k in ("arch", "pool", "opt", "stem", "pretrained", "fraction", "epochs")},
            "params": done[0].get("model", {}).get("params"),
            "best_val_acc": mean_of([r["final"].get("best_val_acc") for r in done]),
            "val_accs": val_accs,
            "val_acc_mean": statistics.fmean(val_accs) if val_accs else None,
            "val_acc_ci95": accuracy_interval(val_accs, n_val)[0] if val_accs else None,
            "n_val_images": n_val,
            "test_accs": test_accs,
            "test_acc_mean": statistics.fmean(test_accs),
            "test_acc_std_ddof1": statistics.stdev(test_accs) if len(test_accs) >= 2 else None,
            "test_acc_ci95": test_ci,
            "test_acc_ci95_over": test_ci_over,
            "n_test_images": n_test,
            "n_seeds": len(done),
            "mean_epoch_time_s": mean_of([r["final"].get("mean_epoch_time_s") for r in done]),
            "img_per_s": mean_of([r["final"].get("train_img_per_s") for r in done]),
            "train_time_s": mean_of([r["final"].get("train_time_s") for r in done]),
            "device": " / ".join(sorted({device_name(r) for r in done})),
            "factors": design_factors(cfg, done[0].get("given")),
            "runs": done,
        })
    return rows


def ranking_metric(rows: list[dict]) -> str:
    """"val" when every config has a val accuracy: choosing by test accuracy would make the test set a second
    val set, and the accuracy reported for the choice would be biased upwards."""
    return "val" if rows and all(r["val_accs"] for r in rows) else "test"


def rank(rows: list[dict], by: str) -> list[dict]:
    return sorted(({**row, "ranked_by": by} for row in rows), key=lambda row: (-row[f"{by}_acc_mean"], row["config"]))


def compare_with_best(best: dict, row: dict, by: str) -> tuple[str, float | None]:
    """(the test used, its two-sided p) for "row's `by` accuracy differs from the best's"; p None: no test applies."""
    a, b = best[f"{by}_accs"], row[f"{by}_accs"]
    if len(a) >= 2 and len(b) >= 2:
        return "Welch t", welch_p(a, b)
    if len(a) >= 2 or len(b) >= 2:
        single, seeds = (b, a) if len(a) >= 2 else (a, b)
        return "1 run vs seeds t", single_run_vs_seeds_p(single[0], seeds)
    if by == "test":
        pa, pb = correct_per_image(best["runs"][0]), correct_per_image(row["runs"][0])
        if pa and pb and pa[0] == pb[0]:  # the same test images in the same order: pair them
            return "McNemar", mcnemar_p(int(np.sum(pa[1] & ~pb[1])), int(np.sum(~pa[1] & pb[1])))
    na, nb = best[f"n_{by}_images"], row[f"n_{by}_images"]
    if na and nb:  # unpaired: it ignores that both saw the same images, so it finds ties more easily
        return "two-proportion z", two_proportion_p(a[0], na, b[0], nb)
    return f"none ({by} image count unknown)", None


def mark_ties_with_best(rows: list[dict], by: str) -> None:
    """Set each row's vs_best: "best", "tied" (not separable from the best at 5 %), "worse" or "untested"."""
    rows[0] |= {"vs_best": "best", "vs_best_test": "", "vs_best_p": None}
    for row in rows[1:]:
        test, p = compare_with_best(rows[0], row, by)
        row |= {"vs_best": "untested" if p is None else "tied" if p >= ALPHA else "worse",
                "vs_best_test": test, "vs_best_p": p}


def shown_run(row: dict) -> tuple[dict, str]:
    """The seed that confusion.png and predictions.png show, and why that one: the best val accuracy when there is
    a val split, else the median test accuracy; never the best test accuracy, which flatters the config."""
    runs = row["runs"]
    if all(val_acc(r) is not None for r in runs):
        return max(runs, key=lambda r: (val_acc(r), r["name"])), "its best val acc"
    by_test = sorted(runs, key=lambda r: (r["final"]["test_acc"], r["name"]))
    return by_test[(len(by_test) - 1) // 2], f"median test acc of {len(runs)} seeds" if len(runs) > 1 else "one seed"


# ---- factors: the effect of one design choice, averaged over the others ----

def varying_factors(rows: list[dict]) -> list[str]:
    keys = dict.fromkeys(k for r in rows for k in r["factors"])
    return [k for k in keys if len({r["factors"].get(k) for r in rows}) > 1]


def level_order(v: object) -> tuple:
    """Numbers in numeric order (fraction 0.25 < 0.5 < 1), then text, then None."""
    return (v is None, not finite(v), v if finite(v) else str(v))


def factor_effects(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Each level of each varying factor against the factor's first level, on mean test accuracy, averaged over
    matched pairs (two configs equal in every other factor), so that no other choice is mixed into the effect.
    Also the factors that never vary alone (no matched pair): their effect cannot be told from another's."""
    factors = varying_factors(rows)
    effects, confounded = [], []
    for f in factors:
        others = [g for g in factors if g != f]
        cells = defaultdict(dict)  # the other factors' levels -> {this factor's level: mean test acc}
        for r in rows:
            cells[tuple(r["factors"].get(g) for g in others)][r["factors"].get(f)] = r["test_acc_mean"]
        levels = sorted({r["factors"].get(f) for r in rows}, key=level_order)
        ref = levels[0]
        for level in levels[1:]:
            matched = [key for key, cell in cells.items() if level in cell and ref in cell]
            if not matched:
                continue
            diffs = [cells[key][level] - cells[key][ref] for key in matched]
            effects.append({"factor": f, "level": level, "reference": ref, "effect": statistics.fmean(diffs),
                            "ci95": t_half_width(diffs) if len(diffs) >= 2 else None, "pairs": len(diffs),
                            "over": [g for i, g in enumerate(others) if len({key[i] for key in matched}) > 1]})
        if not any(e["factor"] == f for e in effects):
            confounded.append(f)
    return effects, confounded


# ---- conclusions in words ----

def acc_text(row: dict, by: str) -> str:
    mean, half = row[f"{by}_acc_mean"], row[f"{by}_acc_ci95"]
    return f"{100 * mean:.2f}" + ("" if half is None else f" ± {100 * half:.2f}")


def chosen_text(row: dict, by: str) -> str:
    if by == "test":
        return f"{row['config']} ({acc_text(row, 'test')})"
    return f"{row['config']} (val {acc_text(row, 'val')}, test {acc_text(row, 'test')})"


def conclusion_lines(rows: list[dict], by: str) -> list[str]:
    """What the comparison can conclude: the best config, the ones tied with it, and what would settle more."""
    if not rows:
        return []
    best, others = rows[0], rows[1:]
    tied = [r for r in others if r["vs_best"] == "tied"]
    untested = [r["config"] for r in others if r["vs_best"] == "untested"]
    single = [r["config"] for r in rows if r["n_seeds"] == 1]
    lines = ["Ranked and chosen by val accuracy; test accuracy is reported for the chosen configs, never used "
             "to choose."] if by == "val" else []
    if not others:
        lines.append(f"one config: {chosen_text(best, by)}; nothing to compare it with")
    elif len(single) == len(rows) and len(tied) == len(others):
        lines.append(f"no config is separable from the best at n = 1 (top: {chosen_text(best, by)}) — run SEEDS=3")
    else:
        names = ", ".join(chosen_text(r, by) if by == "val" else r["config"] for r in tied)
        lines.append(f"best: {chosen_text(best, by)}; "
                     + (f"statistically tied with: {names}" if tied else "every other config is separably worse"))
    if untested:
        lines.append(f"not tested against the best ({by} image count unknown): {', '.join(untested)}")
    if single and others and not (len(single) == len(rows) and len(tied) == len(others)):
        which = "every config" if len(single) == len(rows) else ", ".join(single)
        lines.append(f"n = 1 for {which}: intervals and tests there cover {by}-set sampling only, "
                     "not seed-to-seed spread — run SEEDS=3 before trusting a gap")
    return lines


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


# colour of each config in accuracy.png by how it compares with the best
VERDICT_COLORS = {"best": "C2", "tied": "C0", "worse": "0.55", "untested": "C1"}
VERDICT_LABELS = {"best": "best", "tied": "tied with the best (5 %)", "worse": "separably worse",
                  "untested": "not tested"}


def plot_accuracy(rows: list[dict], by: str, path: Path) -> None:
    """Mean test accuracy with its 95 % interval: points, not bars from zero, so the intervals can be seen."""
    rows = rows[::-1]  # drawn bottom-up: best config on top
    fig = Figure(figsize=(9, 1.8 + 0.35 * len(rows)), layout="constrained")
    ax = fig.subplots()
    shown = set()
    for y, r in enumerate(rows):
        mean, half = 100 * r["test_acc_mean"], 100 * (r["test_acc_ci95"] or 0)
        seeds = r["test_acc_ci95_over"] == "seeds"
        label = VERDICT_LABELS[r["vs_best"]] if r["vs_best"] not in shown else None
        shown.add(r["vs_best"])
        # open markers: one seed, the interval is the test set's sampling error alone
        ax.errorbar(mean, y, xerr=half, fmt="o" if seeds else "s", capsize=4, color=VERDICT_COLORS[r["vs_best"]],
                    markerfacecolor=None if seeds else "white", label=label)
        ax.annotate(f"{mean:.2f}" + (f" ± {half:.2f}" if half else ""), (mean + half, y), xytext=(5, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r['config']} (n={r['n_seeds']})" for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    lo = min(100 * (r["test_acc_mean"] - (r["test_acc_ci95"] or 0)) for r in rows)
    hi = max(100 * (r["test_acc_mean"] + (r["test_acc_ci95"] or 0)) for r in rows)
    span = max(hi - lo, 1.0)
    # room for the value labels right of the intervals; no accuracy is below 0, whatever a t interval says
    ax.set_xlim(max(lo - 0.05 * span, 0), hi + 0.25 * span)
    order = ", ordered by val accuracy (the choice)" if by == "val" else ""
    ax.set(xlabel="test accuracy (%)", title=f"Final test accuracy, mean ± 95 % CI{order}\n"
                                             "filled: t over seeds; open: one seed, test-set sampling only")
    ax.title.set_fontsize(10)
    ax.grid(axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: list(VERDICT_LABELS.values()).index(labels[i]))
    # outside the axes: inside, it would hide a config
    fig.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="outside lower center",
               ncols=4)
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
        return f"shown run {run['name']} has no final.confusion"
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


def preview_images(run: dict, indices: list[int]) -> np.ndarray | str:
    """The test images at `indices` from the preview file the record names (train.py keeps it in
    RESULTS_DIR/previews/), or why they cannot be had. Figures need nothing but the results folder."""
    name = run["final"]["predictions"].get("images")
    if not name:
        return "the record names no preview images (trained before train.py kept them): train it again"
    try:
        with np.load(Path(run["_file"]).parent / name) as preview:
            position = {int(i): k for k, i in enumerate(preview["indices"])}
            return preview["images"][[position[i] for i in indices]]
    except (OSError, ValueError, KeyError) as e:
        return f"preview images unavailable ({type(e).__name__}: {e})"


def plot_predictions(run: dict, classes: list[str], path: Path) -> str | None:
    pred = run["final"].get("predictions")
    if not pred:
        return f"shown run {run['name']} has no final.predictions"
    n = min(N_PREDICTIONS, len(pred["indices"]))
    images = preview_images(run, list(pred["indices"][:n]))
    if isinstance(images, str):
        return images
    cols = 8
    fig = Figure(figsize=(cols * 1.5, math.ceil(n / cols) * 1.75), layout="constrained")
    for ax in fig.subplots(math.ceil(n / cols), cols, squeeze=False).flat:
        ax.axis("off")
    for k, ax in enumerate(fig.axes[:n]):
        true, guess = classes[pred["labels"][k]], classes[pred["preds"][k]]
        ax.imshow(images[k])
        ax.set_title(f"true: {true}\npred: {guess}", fontsize=7, color="green" if true == guess else "red",
                     fontweight="normal" if true == guess else "bold")  # bold: wrong ones show in greyscale too
    fig.suptitle(f"{n} test images (a fixed class-balanced sample, the same for every run), {run['name']} "
                 "(green = right, red bold = wrong)")
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
        ax.errorbar(x, y, yerr=100 * (r["test_acc_ci95"] or 0), marker="o", capsize=3, color=COLORS[i % 10])
        # rows are sorted by accuracy, so neighbours in y alternate sides and their labels do not collide
        ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(7 if i % 2 else -7, 0), va="center",
                    ha="left" if i % 2 else "right", fontsize=7)
    ax.margins(x=0.25)  # room for the labels beside the outermost points
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set(xlabel=xlabel, ylabel="test accuracy (%, mean ± 95 % CI)",
           title=f"Test accuracy vs {xlabel.split(' (')[0]}")
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


# ---- tables ----

TABLE_HEADER = ["config", "arch", "pool", "opt", "stem", "pretrained", "fraction", "params", "epochs",
                "val acc (%)", "test acc (%)", "± 95% CI", "sd", "n", "vs best", "epoch time (s)", "img/s", "device"]
FACTOR_HEADER = ["factor", "level vs reference", "effect (points)", "± 95% CI", "matched pairs", "averaged over"]
TEST_NOTES = {
    "Welch t": "Welch t: Welch's t-test on the seeds' accuracies (both configs have >= 2 seeds)",
    "1 run vs seeds t": "1 run vs seeds t: the single run against the other config's seeds (a prediction-interval "
                        "t-test; assumes both configs vary as much from seed to seed)",
    "McNemar": "McNemar: exact McNemar test on two single runs' paired per-image test predictions",
    "two-proportion z": "two-proportion z: two single runs without per-image predictions (unpaired, so it calls "
                        "ties more easily than McNemar)",
}


def cell(v: object, fmt: str = "") -> str:
    return "" if v is None else format(v, fmt)


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def vs_best_text(r: dict) -> str:
    if r["vs_best"] == "best":
        return "best"
    if r["vs_best_p"] is None:
        return f"untested: {r['vs_best_test']}"
    return f"{r['vs_best']} ({r['vs_best_test']}, {p_text(r['vs_best_p'])})"


def table_cells(rows: list[dict]) -> list[list[str]]:
    cells = []
    for r in rows:
        params = None if r["params"] is None else r["params"] / 1e6
        sd = None if r["test_acc_std_ddof1"] is None else 100 * r["test_acc_std_ddof1"]
        ci = "" if r["test_acc_ci95"] is None else f"± {100 * r['test_acc_ci95']:.2f}"
        cells.append([r["config"], cell(r["arch"]), cell(r["pool"]), cell(r["opt"]), cell(r["stem"]),
                      cell(r["pretrained"]), cell(r["fraction"], "g"), cell(params, ".2f") + "M" * (params is not None),
                      cell(r["epochs"]), "" if r["val_acc_mean"] is None else acc_text(r, "val"),
                      f"{100 * r['test_acc_mean']:.2f}", ci + " †" * (r["test_acc_ci95_over"] == "images"),
                      cell(sd, ".2f"), str(r["n_seeds"]), vs_best_text(r), cell(r["mean_epoch_time_s"], ".1f"),
                      cell(r["img_per_s"], ".0f"), r["device"]])
    return cells


def table_notes(rows: list[dict], by: str) -> list[str]:
    notes = [f"Sorted by mean {by} accuracy" + (" (the val split chooses, the test set reports)" if by == "val" else "")
             + "; n = finished seeds. test acc: mean over seeds; ± 95% CI: Student t over seeds (n - 1 df); "
             "sd: sample std over seeds (ddof = 1); val acc: mean ± 95% CI of the reported model's val accuracy."]
    sizes = sorted({r["n_test_images"] for r in rows if r["test_acc_ci95_over"] == "images"})
    if sizes:
        notes.append(f"† One seed: ± is 1.96 × the binomial standard error sqrt(p(1 - p)/N) of an accuracy on "
                     f"N = {', '.join(f'{n:,}' for n in sizes)} test images (0.36 points at 85 % on 10,000): "
                     "test-set sampling only; seed-to-seed spread is not measured.")
    used = [TEST_NOTES[t] for t in TEST_NOTES if any(r.get("vs_best_test") == t for r in rows)]
    if used:
        notes.append(f"vs best: two-sided tests at 5 % of {by} accuracy against the best; tied = not separable. "
                     + "; ".join(used) + ".")
    return notes


def factor_cells(effects: list[dict]) -> list[list[str]]:
    return [[e["factor"], f"{e['level']} vs {e['reference']}", f"{100 * e['effect']:+.2f}",
             "" if e["ci95"] is None else f"± {100 * e['ci95']:.2f}", str(e["pairs"]),
             ", ".join(e["over"]) or "nothing (one pair)"] for e in effects]


def factor_notes(effects: list[dict], confounded: list[str]) -> list[str]:
    notes = ["Factors: the effect on mean test accuracy (points) of each level against the factor's first level, "
             "averaged over matched pairs (configs equal in every other factor); ± 95% CI: Student t over the pairs' "
             "differences (none for one pair). An optimiser comes with the recipe train.py derives for it (lr, "
             "schedule, weight decay, momentum or betas) unless those were given."] if effects else []
    if confounded:
        notes.append(f"Not separable: {', '.join(confounded)} never change alone (every config that changes one "
                     "also changes another factor), so no effect is given.")
    return notes


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells])


def summary_markdown(rows: list[dict], by: str, conclusion: list[str], effects: list[dict],
                     confounded: list[str]) -> str:
    parts = [*conclusion, markdown_table(TABLE_HEADER, table_cells(rows)), *table_notes(rows, by)]
    if effects:
        parts.append(markdown_table(FACTOR_HEADER, factor_cells(effects)))
    return "\n\n".join(parts + factor_notes(effects, confounded)) + "\n"


def summary_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, TABLE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    # 8 significant digits: exact enough, without float noise like 0.8000000000000002
    writer.writerows({k: float(f"{v:.8g}") if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


# ---- report.html: one self-contained page ----

FIGURE_CAPTIONS = {
    "accuracy.png": "Mean test accuracy of each config with its 95 % interval (filled: t over seeds; open: one seed, "
                    "test-set sampling only); green is the best config, blue the configs tied with it, grey the "
                    "separably worse ones.",
    "loss_curves.png": "Training loss per epoch, mean over each config's seeds (log scale): how fast and how far each "
                       "config fits the training set.",
    "per_class.png": "Test accuracy per true class, mean over seeds: which classes each config finds hard.",
    "confusion.png": "Confusion matrix of the shown run: which classes it mistakes for which (colour: fraction of the "
                     "true class).",
    "predictions.png": "A fixed class-balanced sample of test images, the same for every run, with the shown run's "
                       "predictions (green: right; red bold: wrong).",
    "datasize.png": "Test accuracy against the fraction of the training set used, one line per design: what more data "
                    "buys.",
    "speed.png": "Mean epoch time and training throughput of each config, and the device they ran on.",
    "accuracy_vs_params.png": "Test accuracy (mean ± 95 % CI) against parameter count: what model size buys.",
    "accuracy_vs_time.png": "Test accuracy (mean ± 95 % CI) against total training time: what compute buys.",
    "bench.png": "Train-step throughput per architecture and mode, from the newest bench record.",
}
REPORT_CSS = """body { font-family: sans-serif; max-width: 1150px; margin: 1em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; }
th { background: #f0f0f0; } td.short { white-space: nowrap; }
tr.best td { background: #e6f4e6; } tr.tied td { background: #e8f0fb; }
p.conclusion { font-size: 17px; font-weight: bold; margin: 0.3em 0; }
p.note { font-size: 13px; color: #444; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 14px; margin-top: 0.3em; }"""


def environment(runs: list[dict]) -> list[list[str]]:
    """Each field of the records' env (device name, torch version, ...) with every value seen."""
    seen = defaultdict(Counter)
    for run in runs:
        for key, v in {"device": run.get("run", {}).get("device"), **run.get("env", {})}.items():
            if v is not None:
                seen[key][str(v)] += 1
    return [[key, ", ".join(v if len(counts) == 1 else f"{v} ({n} runs)" for v, n in counts.items())]
            for key, counts in seen.items()]


def html_cell(text: str) -> str:
    # short cells (numbers, "± 0.59 †") never break inside; long ones (config names, test names) wrap
    return ('<td class="short">' if len(text) <= 16 else "<td>") + html.escape(text) + "</td>"


def html_table(header: list[str], cells: list[list[str]], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f'<tr class="{cls}">{"".join(map(html_cell, row))}</tr>\n'
                   for row, cls in zip(cells, row_classes or [""] * len(cells), strict=True))
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def figure_html(path: Path, name: str, caption: str) -> str:
    # a data URI, so the page is one file that can be mailed or archived without its folder
    png = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure id="{html.escape(name)}"><img src="data:image/png;base64,{png}" alt="{html.escape(name)}">'
            f"<figcaption><b>{html.escape(name)}</b>: {html.escape(caption)}</figcaption></figure>")


def report_html(title: str, conclusion: list[str], rows: list[dict], by: str, effects: list[dict],
                confounded: list[str], figures: dict[str, str], out: Path, env: list[list[str]],
                skipped: dict[str, str]) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="conclusion">{html.escape(line)}</p>' for line in conclusion]
    parts += ["<h2>Configs</h2>", html_table(TABLE_HEADER, table_cells(rows), [r["vs_best"] for r in rows])]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in table_notes(rows, by)]
    if effects or confounded:
        parts.append("<h2>Factors</h2>")
        parts += [html_table(FACTOR_HEADER, factor_cells(effects))] if effects else []
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in factor_notes(effects, confounded)]
    parts += ["<h2>Environment</h2>", html_table(["field", "value"], env), "<h2>Figures</h2>"]
    if skipped:
        parts.append('<p class="note">Not drawn: ' + html.escape("; ".join(f"{n} ({why})" for n, why in
                                                                             skipped.items())) + "</p>")
    parts += [figure_html(out / name, name, caption) for name, caption in figures.items()]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>\n{REPORT_CSS}\n</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


# ---- main ----

def draw_figures(configs: dict[str, list[dict]], rows: list[dict], by: str, classes: list[str], dirs: list[Path],
                 out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Every figure that applies: ({name: caption} of those drawn, {name: why not} of the others)."""
    skipped = {"loss_curves.png": plot_loss_curves(configs, out / "loss_curves.png")}
    captions = dict(FIGURE_CAPTIONS)
    if rows:
        shown, why = shown_run(rows[0])
        print(f"confusion.png and predictions.png show {shown['name']} ({why})")
        for name in ("confusion.png", "predictions.png"):
            captions[name] += f" Shown: {shown['name']}, the {'chosen' if by == 'val' else 'best'} config's seed " \
                              f"with {why}."
        skipped |= {
            "accuracy.png": plot_accuracy(rows, by, out / "accuracy.png"),
            "per_class.png": plot_per_class(rows, classes, out / "per_class.png"),
            "confusion.png": plot_confusion(shown, classes, out / "confusion.png"),
            "predictions.png": plot_predictions(shown, classes, out / "predictions.png"),
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
    drawn = {name: captions[name] for name in FIGURE_CAPTIONS if name in skipped and not skipped[name]}
    for label, config_runs in configs.items():
        name = f"curves/{re.sub(r'[^A-Za-z0-9._-]', '_', label)}.png"
        plot_config_curves(label, config_runs, out / name)
        drawn[name] = (f"Train, val and test loss and accuracy per epoch of {label}, mean over its "
                       f"{len(config_runs)} run{'s' * (len(config_runs) > 1)}: over- or under-fitting at a glance.")
    return drawn, {name: why for name, why in skipped.items() if why}


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
    by = ranking_metric(rows)
    rows = rank(rows, by)
    if rows:
        mark_ties_with_best(rows, by)
    effects, confounded = factor_effects(rows)
    conclusion = conclusion_lines(rows, by)
    classes = next((r["classes"] for r in runs if r.get("classes")), [str(i) for i in range(10)])

    figures, skipped = draw_figures(configs, rows, by, classes, dirs, out)
    for name in skipped:  # a figure left from earlier results would read as describing these ones
        (out / name).unlink(missing_ok=True)
    if skipped:
        print("skipped figures: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    if rows and all(r["n_seeds"] == 1 for r in rows):
        print("one seed per config: intervals cover test-set sampling only, not seed-to-seed spread (run SEEDS=3)")
    if not any("val_acc" in h for run in runs for h in run["history"]):
        print("no val split (config.val_split = 0): curves show train/test only, configs are ranked by test acc")
    elif by == "test" and rows:
        print("val split in only some configs: ranked by test acc (give every config --val-split to choose by val)")

    markdown = summary_markdown(rows, by, conclusion, effects, confounded)
    write_text_atomic(out / "summary.md", markdown)
    write_text_atomic(out / "summary.csv", summary_csv(rows))
    title = f"ResNets on CIFAR-10: {', '.join(map(str, dirs))}"
    write_text_atomic(out / "report.html", report_html(title, conclusion, rows, by, effects, confounded, figures, out,
                                                       environment(runs), skipped))
    print(f"wrote figures, summary.md, summary.csv and report.html to {out}/\n")
    print(markdown)


if __name__ == "__main__":
    main()
