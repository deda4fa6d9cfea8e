"""The comparison plot.py draws from run records, on cases whose answers are known: intervals, ties with the
best (Holm over the tests), the seed shown, and the factor model (issue 26's grid, an interaction, a missing cell)."""

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
    # exact: 2 P(X <= 20), X ~ Binomial(80, 1/2) = 8.6e-6
    assert rows[1]["vs_best_p"] == pytest.approx(8.5806e-6, rel=1e-4)
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

def test_val_in_every_config_ranks_and_tests_by_val_and_reports_test_else_test_ranks():
    rows, by = compare({"a": [make_run("a-s0", 0.84, val=0.90)], "b": [make_run("b-s0", 0.86, val=0.88)]})
    assert by == "val" and [r["config"] for r in rows] == ["a", "b"]
    # val set: 45,000 training images are 90 % of the train set, so 5,000 val images. 90 % vs 88 % on 5,000 each:
    # pooled 0.89, se = sqrt(0.89 × 0.11 × 2 / 5000) = 0.0062578, z = 0.02 / 0.0062578 = 3.196, p = 0.0014: worse
    assert rows[0]["n_val_images"] == 5000
    assert (rows[1]["vs_best"], rows[1]["vs_best_p"]) == ("worse", pytest.approx(0.0014, abs=1e-4))
    lines = plot.conclusion_lines(rows, by)
    assert lines[0].startswith("Ranked and chosen by val accuracy")
    assert lines[1].startswith("best: a (val 90.00 ± 0.83, test 84.00 ± ")
    # val in only some configs: ranked by test
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


def test_ties_with_the_best_are_holm_corrected_over_the_k_minus_1_tests():
    # b and c each 2.7 points below a (3 seeds of sd 1): Welch p = 0.0297 each, under 5 % alone; Holm over the
    # two tests: 2 × 0.0297 = 0.059 for both, so both are tied with a
    rows, _ = compare({c: seeds(c, [0.85 - d, 0.86 - d, 0.87 - d]) for c, d in [("a", 0), ("b", 0.027), ("c", 0.027)]})
    assert [(r["vs_best"], round(r["vs_best_p"], 4), round(r["vs_best_p_holm"], 4)) for r in rows[1:]] == [
        ("tied", 0.0297, 0.0595)] * 2
    assert plot.vs_best_text(rows[1]) == "tied (Welch t, p = 0.030, Holm = 0.059)"


# ---- factors: one model over every run ----

def grid(cells: dict[tuple[str, str], list[float]]) -> list[dict]:
    """Ranked rows of a pool x opt grid: {(pool, opt): test accuracy in % of each seed}."""
    return compare({f"{p}-{o}": [make_run(f"{p}-{o}-s{i}", acc / 100, pool=p, opt=o) for i, acc in enumerate(accs)]
                    for (p, o), accs in cells.items()})[0]


def test_factor_effects_of_a_2x2_grid_with_3_seeds_come_from_the_additive_model_over_its_12_runs():
    # issue 26's case: 80 % + 2 points for max + each seed's noise; acc ~ pool + opt over the 12 runs has
    # 12 - 3 = 9 residual df, and pool's effect +1.82 ± 1.39 (the mean of the 6 max runs less the 6 avg runs)
    noise = {("avg", "sgd"): [0.4, 1.5, -1.8], ("avg", "adam"): [1.7, 0.0, -0.8],
             ("max", "sgd"): [-0.8, -1.1, -0.2], ("max", "adam"): [0.8, 0.6, 0.6]}
    rows = grid({(p, o): [80 + 2 * (p == "max") + n for n in ns] for (p, o), ns in noise.items()})
    effects, words = plot.factor_model(rows)
    pool, opt = effects
    assert (pool["factor"], pool["level"], pool["reference"], pool["residual_df"]) == ("pool", "max", "avg", 9)
    assert (pool["effect"], pool["ci95"]) == (pytest.approx(1.8167, abs=1e-4), pytest.approx(1.39, abs=0.01))
    assert pool["p"] < 0.05 and abs(opt["effect"]) < opt["ci95"]  # opt's interval covers 0
    assert words == []  # no interaction
    table = plot.factor_table(effects, words)[1]
    assert table[1] == plot.FACTOR_HEADER and table[2][0] == ["pool", "max vs avg", "+1.82", "± 1.39", "9", "p = 0.016"]


def test_an_interaction_is_said_in_words_with_the_effect_at_each_level():
    means = {("avg", "sgd"): 80, ("max", "sgd"): 80.7, ("avg", "adam"): 80, ("max", "adam"): 83.6}
    rows = grid({cell: [m - 0.3, m, m + 0.3] for cell, m in means.items()})
    assert plot.factor_model(rows)[1] == [
        "pool's effect depends on opt: +3.6 with adam, +0.7 with sgd (interaction F test, p < 0.001)"]


def test_a_missing_cell_names_what_it_cannot_estimate():
    rows = grid({("avg", "sgd"): [80, 80.6], ("max", "sgd"): [80.7, 81.3], ("avg", "adam"): [80, 80.6]})
    effects, words = plot.factor_model(rows)
    assert [round(e["effect"], 2) for e in effects] == [0.7, 0.0]  # the main effects still are estimable
    assert words == ["pool × opt: the interaction cannot be estimated (a cell of the grid has no runs)"]
    # factors that never change apart: neither effect is printed as a number
    runs = {"scratch": seeds("scratch", [0.85, 0.86], stem="cifar", pretrained=False),
            "pre": seeds("pre", [0.90, 0.91], stem="imagenet", pretrained=True)}
    effects, words = plot.factor_model(plot.summarize(runs))
    blocks = plot.factor_table(effects, words)
    assert [row[:3] for row in blocks[1][2]] == [["stem", "imagenet vs cifar", "not estimable"],
                                                 ["pretrained", "True vs False", "not estimable"]]
    assert any(b[1].startswith("Not estimable: stem imagenet vs cifar, pretrained True vs False") for b in blocks[2:])
    assert words == []


def test_factors_are_the_records_factors_and_nothing_else_of_its_config():
    runs = {"a": [make_run("a-s0", 0.85)], "b": [make_run("b-s1", 0.84)]}
    runs["a"][0]["config"] |= {"device": "cuda", "workers": 8, "lr": 0.1}
    runs["b"][0]["config"] |= {"device": "cpu", "workers": 2, "lr": 0.2}
    assert plot.factor_model(plot.summarize(runs)) == ([], [])


def test_an_optimiser_is_one_factor_with_the_recipe_train_py_derived_for_it():
    """pool x opt, as GRID=quick: adam's lr, wd and schedule were derived, not given, so train.py left them out
    of the factors: they are part of `opt`."""
    recipes = {"sgd": {"lr": 0.1, "wd": 5e-4, "schedule": "onecycle"},
               "adam": {"lr": 1e-3, "wd": 0.0, "schedule": "cosine"}}
    accs = {("avg", "sgd"): 41, ("max", "sgd"): 29, ("avg", "adam"): 38, ("max", "adam"): 31}
    rows = grid({cell: [acc] for cell, acc in accs.items()})
    for r in rows:
        r["runs"][0]["config"] |= recipes[r["factors"]["opt"]]
    effects, _ = plot.factor_model(rows)
    assert [(e["factor"], e["level"], e["reference"]) for e in effects] == [("pool", "max", "avg"),
                                                                            ("opt", "sgd", "adam")]
    assert effects[1]["effect"] == pytest.approx(0.5)  # sgd vs adam: +3 points with avg pooling, -2 with max
