"""plot.py's statistics, each against a case computed by hand (the computation is written in the test), and
the comparison built on them (intervals, ties with the best, factor effects, the seed shown) on constructed
records."""

import math

import pytest

import plot

LABELS = "0123456789" * 1000  # a 10,000-image test set in test-set order


def make_run(name: str, test_acc: float, val: float | None = None, preds: str | None = None, **config) -> dict:
    """The fields of a finished train.py record that the comparison reads."""
    factors = {"arch": "resnet18", "pool": "avg", "opt": "sgd", "val_split": 0.1 if val is not None else 0.0,
               "fraction": 1.0} | config
    final = {"test_acc": test_acc, "confusion": [[1000 if i == j else 0 for j in range(10)] for i in range(10)],
             "val_acc": val, "best_val_acc": val, "mean_epoch_time_s": 30.0, "train_img_per_s": 1650.0,
             "train_time_s": 120.0}
    if preds is not None:
        final |= {"test_preds": preds, "test_labels": LABELS}
    return {"name": name, "status": "finished", "config": factors | {"seed": int(name.rsplit("-s", 1)[1])},
            "factors": factors, "history": [], "final": final,
            "run": {"train_images": 45_000}, "env": {"device_name": "Test CPU"},
            "model": {"params": 11_173_962}}


def compare(configs: dict[str, list[dict]]) -> tuple[list[dict], str]:
    """plot.py's pipeline from grouped runs to ranked rows marked against the best."""
    rows, by = plot.rank(plot.summarize(configs))
    plot.mark_ties_with_best(rows, by)
    return rows, by


def seeds(config: str, accs: list[float], **kwargs) -> list[dict]:
    return [make_run(f"{config}-s{i}", acc, **kwargs) for i, acc in enumerate(accs)]


def preds_wrong_on(wrong: range) -> str:
    """Predictions right on every image but those in `wrong`, where they say the next class."""
    return "".join(str((int(y) + 1) % 10) if i in wrong else y for i, y in enumerate(LABELS))


# ---- the distributions ----

def test_t_quantile_matches_closed_forms_and_the_printed_table():
    # 1 df is the Cauchy distribution: t_q = tan(pi (q - 1/2)) -> tan(0.475 pi) = 12.706
    assert plot.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    # 2 df: F(t) = 1/2 + t / (2 sqrt(2 + t²)), so t_q = (2q - 1) / sqrt(2q(1 - q)) -> 0.95 / sqrt(0.04875) = 4.3027
    assert plot.t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)
    # printed t tables, 97.5 %: 2.776 (4 df), 2.262 (9 df), 2.042 (30 df); very many df: the normal's 1.960
    for df, table in [(4, 2.776), (9, 2.262), (30, 2.042), (1e6, 1.960)]:
        assert plot.t_quantile(0.975, df) == pytest.approx(table, abs=5e-4), df


def test_t_two_sided_p_matches_closed_forms_including_between_integer_df():
    # 1 df: P(|T| >= 1) = 1 - 2 atan(1) / pi = 0.5
    assert plot.t_two_sided_p(1.0, 1) == pytest.approx(0.5, rel=1e-12)
    # 2 df: P(|T| >= t) = 1 - t / sqrt(2 + t²); t = 2 -> 1 - 2 / sqrt(6) = 0.18350
    assert plot.t_two_sided_p(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-12)
    # 3 df: P(|T| >= t) = 1 - (2/pi) (t / (sqrt(3) (1 + t²/3)) + atan(t / sqrt(3)));
    # t = sqrt(3) -> 1 - (2/pi)(1/2 + pi/4) = 1/2 - 1/pi
    assert plot.t_two_sided_p(math.sqrt(3), 3) == pytest.approx(0.5 - 1 / math.pi, rel=1e-12)
    # Welch's df are fractional: the tail at 2.5 df lies between those at 2 and 3 df
    assert plot.t_two_sided_p(2.0, 2) > plot.t_two_sided_p(2.0, 2.5) > plot.t_two_sided_p(2.0, 3)
    assert plot.t_two_sided_p(0.0, 5) == 1.0


# ---- intervals ----

def test_interval_over_three_seeds_is_student_t_with_2_df():
    # 83, 84, 80: mean 82.333; deviations 0.667, 1.667, -2.333; sd = sqrt((0.444 + 2.778 + 5.444) / 2) = 2.0817;
    # half-width = t(0.975, 2 df) 4.3027 × 2.0817 / sqrt(3) = 5.171 points
    half, over = plot.accuracy_interval([0.83, 0.84, 0.80], 10_000)
    assert (half, over) == (pytest.approx(0.05171, abs=1e-5), "seeds")


def test_interval_of_one_seed_is_the_test_sets_binomial_sampling_error():
    # 85 % on 10,000 images: SE = sqrt(0.85 × 0.15 / 10000) = 0.0035707 (0.36 points); 95 %: × 1.96 = 0.70 points
    half, over = plot.accuracy_interval([0.85], 10_000)
    assert (half, over) == (pytest.approx(0.0069985, abs=1e-7), "images")
    assert plot.accuracy_interval([0.85], None) == (None, "")


# ---- the tests against the best ----

def test_welch_p_on_two_seeds_each_with_equal_spread_has_2_df():
    # 85, 87 vs 83, 85: means 86 and 84, variances 0.0002 each; se² = 0.0002/2 + 0.0002/2 = 0.0002, t = 0.02 /
    # 0.014142 = sqrt(2); df = 0.0002² / (0.0001² / 1 + 0.0001² / 1) = 2; p = 1 - sqrt(2) / sqrt(2 + 2) = 0.29289
    assert plot.welch_p([0.85, 0.87], [0.83, 0.85]) == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-9)


def test_welch_p_uses_the_welch_satterthwaite_df():
    # 80, 84, 88 (var 0.0016, /3 = 5.333e-4) vs 85, 86 (var 0.00005, /2 = 2.5e-5): se = sqrt(5.5833e-4) = 0.023629,
    # t = (0.84 - 0.855) / 0.023629 = -0.63481; df = 5.5833e-4² / (5.333e-4² / 2 + 2.5e-5² / 1) = 2.1823
    df = (0.0016 / 3 + 0.00005 / 2) ** 2 / ((0.0016 / 3) ** 2 / 2 + (0.00005 / 2) ** 2)
    assert df == pytest.approx(2.1823, abs=1e-4)
    assert plot.welch_p([0.80, 0.84, 0.88], [0.85, 0.86]) == pytest.approx(plot.t_two_sided_p(0.63481, df), abs=1e-5)


def test_single_run_against_seeds_is_a_prediction_interval_t_test():
    # 90 against 85, 86, 87 (mean 86, sd 1): t = 4 / (1 × sqrt(1 + 1/3)) = 2 sqrt(3) = 3.4641 on 2 df;
    # p = 1 - t / sqrt(2 + t²) = 1 - 3.4641 / sqrt(14) = 0.074180
    assert plot.single_run_vs_seeds_p(0.90, [0.85, 0.86, 0.87]) == pytest.approx(1 - 3.4641016 / math.sqrt(14),
                                                                                     abs=1e-7)


def test_mcnemar_exact_p():
    # 10 images only A gets right, 2 only B: two-sided 2 × P(X <= 2), X ~ Binomial(12, 1/2) = 2 (1 + 12 + 66) / 4096
    assert plot.mcnemar_p(10, 2) == 2 * (1 + 12 + 66) / 4096
    assert plot.mcnemar_p(2, 10) == plot.mcnemar_p(10, 2)
    assert plot.mcnemar_p(0, 0) == 1.0 and plot.mcnemar_p(5, 5) == 1.0


def test_two_proportion_p():
    # 85 % vs 84 % on 10,000 each: pooled 0.845; se = sqrt(0.845 × 0.155 × 2 / 10000) = 0.0051181; z = 1.95385;
    # p = 2 (1 - Phi(1.95385)) = 0.0507 (normal table: Phi(1.95) = 0.97441, Phi(1.96) = 0.97500)
    assert plot.two_proportion_p(0.85, 10_000, 0.84, 10_000) == pytest.approx(0.0507, abs=2e-4)
    assert plot.two_proportion_p(0.85, 10_000, 0.84, 10_000) == pytest.approx(math.erfc(1.95385 / math.sqrt(2)),
                                                                              abs=1e-5)


# ---- ties with the best ----

def test_configs_0_1_points_apart_with_3_seeds_of_sd_0_3_are_tied():
    # 85.0 vs 84.9, sd 0.3 each: se = sqrt(2 × 0.003² / 3) = 0.0024495, t = 0.001 / 0.0024495 = 0.41 on 4 df, p = 0.70
    rows, by = compare({"a": seeds("a", [0.847, 0.850, 0.853]), "b": seeds("b", [0.846, 0.849, 0.852])})
    assert [(r["config"], r["vs_best"], r["vs_best_test"]) for r in rows] == [("a", "best", ""),
                                                                               ("b", "tied", "Welch t")]
    assert rows[1]["vs_best_p"] == pytest.approx(0.70, abs=0.01)
    # interval of each: t(0.975, 2 df) 4.3027 × 0.003 / sqrt(3) = 0.745 points
    assert plot.conclusion_lines(rows, by)[0] == "best: a (85.00 ± 0.75); statistically tied with: b"


def test_configs_2_points_apart_with_3_seeds_of_sd_0_3_are_not_tied():
    # 85.0 vs 83.0: t = 0.02 / 0.0024495 = 8.16 on 4 df, p = 0.0012
    rows, by = compare({"a": seeds("a", [0.847, 0.850, 0.853]), "c": seeds("c", [0.827, 0.830, 0.833])})
    assert rows[1]["vs_best"] == "worse"
    assert rows[1]["vs_best_p"] == pytest.approx(0.0012, abs=1e-4)
    assert plot.conclusion_lines(rows, by)[0] == "best: a (85.00 ± 0.75); every other config is separably worse"


def test_single_runs_with_per_image_predictions_are_compared_by_mcnemar():
    # A wrong on images 0-1499 (85.0 %), B on 20-1559 (84.6 %): only A right on 60 images (1500-1559), only B on 20
    a, b = preds_wrong_on(range(1500)), preds_wrong_on(range(20, 1560))
    rows, _ = compare({"a": [make_run("a-s0", 0.85, preds=a)], "b": [make_run("b-s0", 0.846, preds=b)]})
    assert (rows[1]["vs_best"], rows[1]["vs_best_test"]) == ("worse", "McNemar")
    assert rows[1]["vs_best_p"] == plot.mcnemar_p(60, 20) < 0.001
    # the same accuracies without paired predictions: 85.0 vs 84.6 on 10,000 images each, unpaired:
    # pooled 0.848, se = sqrt(0.848 × 0.152 × 2 / 10000) = 0.0050773, z = 0.004 / 0.0050773 = 0.788, p = 0.43: tied
    rows, by = compare({"a": [make_run("a-s0", 0.85)], "b": [make_run("b-s0", 0.846)]})
    assert (rows[1]["vs_best"], rows[1]["vs_best_test"]) == ("tied", "two-proportion z")
    assert rows[1]["vs_best_p"] == pytest.approx(0.43, abs=0.005)
    assert plot.conclusion_lines(rows, by) == [
        "no config is separable from the best at n = 1 (top: a (85.00 ± 0.70)) — run SEEDS=3"]


def test_a_single_run_against_a_seeded_config_uses_the_seeds_spread():
    rows, by = compare({"a": seeds("a", [0.85, 0.86, 0.87]), "b": [make_run("b-s0", 0.90)]})
    assert rows[0]["config"] == "b"
    assert (rows[1]["vs_best_test"], rows[1]["vs_best_p"]) == ("1 run vs seeds t", pytest.approx(0.07418, abs=1e-5))
    assert "n = 1 for b" in plot.conclusion_lines(rows, by)[1]


# ---- val picks, test reports ----

def test_with_val_in_every_config_ranking_and_ties_use_val_and_the_test_accuracy_is_reported():
    rows, by = compare({"a": [make_run("a-s0", 0.84, val=0.90)], "b": [make_run("b-s0", 0.86, val=0.88)]})
    assert by == "val" and [r["config"] for r in rows] == ["a", "b"]
    # val set: 45,000 training images are 90 % of the train set, so 5,000 val images. 90 % vs 88 % on 5,000 each:
    # pooled 0.89, se = sqrt(0.89 × 0.11 × 2 / 5000) = 0.0062578, z = 0.02 / 0.0062578 = 3.196, p = 0.0014: worse
    assert rows[0]["n_val_images"] == 5000
    assert (rows[1]["vs_best"], rows[1]["vs_best_p"]) == ("worse", pytest.approx(0.0014, abs=1e-4))
    lines = plot.conclusion_lines(rows, by)
    assert lines[0].startswith("Ranked and chosen by val accuracy")
    assert lines[1].startswith("best: a (val 90.00 ± 0.83, test 84.00 ± ")


def test_val_in_only_some_configs_ranks_by_test():
    rows, by = compare({"a": [make_run("a-s0", 0.84, val=0.90)], "b": [make_run("b-s0", 0.86)]})
    assert by == "test" and rows[0]["config"] == "b"


# ---- the seed the figures show ----

def test_figures_show_the_median_seed_by_test_accuracy_without_a_val_split():
    [row] = plot.summarize({"a": seeds("a", [0.83, 0.84, 0.80])})
    assert plot.shown_run(row)[0]["name"] == "a-s0"  # 80 < 83 < 84
    [row] = plot.summarize({"a": seeds("a", [0.76, 0.75])})
    assert plot.shown_run(row)[0]["name"] == "a-s1"  # two seeds: the lower of the two middle ones


def test_figures_show_the_seed_with_the_best_val_accuracy_with_a_val_split():
    runs = [make_run("a-s0", 0.83, val=0.80), make_run("a-s1", 0.80, val=0.86), make_run("a-s2", 0.84, val=0.82)]
    [row] = plot.summarize({"a": runs})
    assert plot.shown_run(row) == (runs[1], "its best val acc")  # not the best test (s2) nor the median (s0)


# ---- factors ----

def test_factor_effects_average_matched_pairs_over_the_other_factors():
    grid = {("resnet18", "avg"): 0.85, ("resnet18", "max"): 0.84, ("resnet34", "avg"): 0.87, ("resnet34", "max"): 0.855}
    rows = plot.summarize({f"{a}-{p}": [make_run(f"{a}-{p}-s0", acc, arch=a, pool=p)] for (a, p), acc in grid.items()})
    effects, confounded = plot.factor_effects(rows)
    assert confounded == []
    by_factor = {e["factor"]: e for e in effects}
    # pool, max vs avg: -1.0 (resnet18) and -1.5 (resnet34) -> mean -1.25 points; sd of the two = 0.5 / sqrt(2)
    # = 0.35355; 95 %: t(0.975, 1 df) 12.706 × 0.35355 / sqrt(2) = 3.18 points
    pool = by_factor["pool"]
    assert (pool["level"], pool["reference"], pool["pairs"], pool["over"]) == ("max", "avg", 2, ["arch"])
    assert 100 * pool["effect"] == pytest.approx(-1.25)
    assert 100 * pool["ci95"] == pytest.approx(12.7062 * 0.35355 / math.sqrt(2), abs=1e-3)
    # arch, resnet34 vs resnet18: +2.0 (avg) and +1.5 (max) -> +1.75 points, same interval
    assert 100 * by_factor["arch"]["effect"] == pytest.approx(1.75)
    assert plot.factor_table(rows)[1][2][0] == ["arch", "resnet34 vs resnet18", "+1.75", "± 3.18", "2", "pool"]


def test_factors_that_never_change_alone_get_no_effect():
    runs = {"scratch": [make_run("scratch-s0", 0.85, stem="cifar", pretrained=False)],
            "pre": [make_run("pre-s0", 0.90, stem="imagenet", pretrained=True)]}
    effects, confounded = plot.factor_effects(plot.summarize(runs))
    assert effects == [] and confounded == ["stem", "pretrained"]


def test_factors_are_the_records_factors_and_nothing_else_of_its_config():
    runs = {"a": [make_run("a-s0", 0.85)], "b": [make_run("b-s1", 0.84)]}
    runs["a"][0]["config"] |= {"device": "cuda", "workers": 8, "lr": 0.1}
    runs["b"][0]["config"] |= {"device": "cpu", "workers": 2, "lr": 0.2}
    assert plot.factor_effects(plot.summarize(runs)) == ([], [])


def test_an_optimiser_is_one_factor_with_the_recipe_train_py_derived_for_it():
    """pool x opt, as GRID=quick: adam's lr, wd and schedule were derived, not given, so train.py left them out
    of the factors: they are part of `opt`."""
    recipes = {"sgd": {"lr": 0.1, "wd": 5e-4, "schedule": "onecycle"},
               "adam": {"lr": 1e-3, "wd": 0.0, "schedule": "cosine"}}
    grid = {("avg", "sgd"): 0.41, ("max", "sgd"): 0.29, ("avg", "adam"): 0.38, ("max", "adam"): 0.31}
    runs = {}
    for (pool, opt), acc in grid.items():
        run = make_run(f"{pool}-{opt}-s0", acc, pool=pool, opt=opt)
        run["config"] |= recipes[opt]
        runs[f"{pool}-{opt}"] = [run]
    effects, confounded = plot.factor_effects(plot.summarize(runs))
    assert confounded == []
    by_factor = {e["factor"]: e for e in effects}
    assert set(by_factor) == {"pool", "opt"}
    opt = by_factor["opt"]  # sgd vs adam: +3 points with avg pooling, -2 with max -> +0.5
    assert (opt["level"], opt["reference"], opt["pairs"], opt["over"]) == ("sgd", "adam", 2, ["pool"])
    assert 100 * opt["effect"] == pytest.approx(0.5)
