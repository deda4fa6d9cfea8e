"""The state around the training loop: resume, replay (--from), names and locks, the lr schedule,
the metrics' definitions. Runs are in-process (train.main) on the tiny synthetic data set, so a
kill is simulated: the run stops at the next step after a checkpoint was written, as after a SIGKILL
there, and a second main() resumes it."""
from __future__ import annotations

import fcntl
import json
import math

import pytest
import torch
import torch.nn.functional as F
import train
from conftest import TINY, tiny_model

STRICT = {"parse_constant": lambda name: pytest.fail(f"non-strict JSON constant {name}")}


def run(tmp_path, data_dir, *flags) -> int:
    return train.main([*TINY, "--data-dir", str(data_dir), "--out", str(tmp_path / "results"), *flags])


def record(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "results" / f"{name}.json").read_text(), **STRICT)


class Killed(Exception):
    pass


def run_killed_after_first_checkpoint(monkeypatch, tmp_path, data_dir, *flags) -> None:
    """Stop the run at its first step after the first checkpoint, as a kill there would."""
    written = []
    save = train.save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        written.append(path)

    def die_if_written():
        if written:
            raise Killed

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    monkeypatch.setattr(train, "stop_if_interrupted", die_if_written)
    with pytest.raises(Killed):
        run(tmp_path, data_dir, *flags)
    monkeypatch.undo()


SCHEDULE_FLAGS = {"onecycle": [], "cosine": [], "step": [], "multistep": ["--milestones", "1,2"], "constant": []}


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("schedule", list(SCHEDULE_FLAGS))
def test_every_optimiser_and_schedule_resumes_to_the_uninterrupted_history(monkeypatch, tmp_path, synthetic_data,
                                                                           opt, schedule):
    flags = ["--opt", opt, "--schedule", schedule, *SCHEDULE_FLAGS[schedule], "--epochs", "2", "--fraction", "0.5"]
    assert run(tmp_path, synthetic_data, *flags, "--name", "whole") == 0
    run_killed_after_first_checkpoint(monkeypatch, tmp_path, synthetic_data, *flags, "--name", "cut")
    assert record(tmp_path, "cut")["status"] == "running"
    assert run(tmp_path, synthetic_data, *flags, "--name", "cut", "--resume") == 0
    whole, cut = record(tmp_path, "whole"), record(tmp_path, "cut")
    assert cut["status"] == "finished" and [row["epoch"] for row in cut["history"]] == [1, 2]
    for a, b in zip(whole["history"], cut["history"], strict=True):
        for key in ("train_loss", "test_loss", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert cut["final"]["test_acc"] == pytest.approx(whole["final"]["test_acc"], abs=0.011)


def test_resume_ignores_tta_and_the_spelling_of_the_data_dir_but_not_the_data(monkeypatch, tmp_path, synthetic_data,
                                                                             fresh_data):
    run_killed_after_first_checkpoint(monkeypatch, tmp_path, synthetic_data, "--epochs", "2", "--name", "r")
    respelled = f"{synthetic_data}/./"
    assert run(tmp_path, respelled, "--epochs", "2", "--name", "r", "--resume", "--tta") == 0
    rows = record(tmp_path, "r")["history"]
    assert [r["pays_jit"] for r in rows] == [True, True]  # each process's first epoch pays its warm-up
    run_killed_after_first_checkpoint(monkeypatch, tmp_path, synthetic_data, "--epochs", "2", "--name", "other")
    meta = json.loads((fresh_data / "meta.json").read_text())
    meta["betons"]["train"]["sha256"] = "0" * 64  # other data behind the same flags
    (fresh_data / "meta.json").write_text(json.dumps(meta))
    args = train.parse_config([*TINY, "--epochs", "2", "--name", "other"])
    args.batch_size_per_rank = args.batch_size
    with pytest.raises(SystemExit, match="data_sha256"):
        train.load_checkpoint(tmp_path / "results" / "checkpoints" / "other.pt", args, meta)


def test_mean_epoch_time_leaves_out_every_epoch_that_paid_the_loader_jit():
    history = [{"epoch": 1, "epoch_time_s": 9.0, "train_img_per_s": 10, "eval_time_s": 1, "pays_jit": True},
               {"epoch": 2, "epoch_time_s": 2.0, "train_img_per_s": 50, "eval_time_s": 1, "pays_jit": False},
               {"epoch": 3, "epoch_time_s": 8.0, "train_img_per_s": 12, "eval_time_s": 1, "pays_jit": True},
               {"epoch": 4, "epoch_time_s": 4.0, "train_img_per_s": 30, "eval_time_s": 1, "pays_jit": False}]
    test = {"loss": 1.0, "acc": 0.5, "confusion": [[1, 1], [0, 2]], "preds": [0, 1, 1, 1], "labels": [0, 0, 1, 1]}
    progress = {"best": {"acc": None, "epoch": None}, "best_test": None}
    final = train.final_summary({"history": history, "config": {"early_stop": None}}, {"test": test}, progress,
                                False, ["a", "b"], 0.0, 0, torch.device("cpu"))
    assert final["mean_epoch_time_s"] == 3.0 and final["train_img_per_s"] == 40
    assert final["test_preds"] == "0111" and final["test_labels"] == "0011"


# ---------------------------------------------------------------------------------------------
# --from: a replay takes the flags its source was given, derives the rest again, never writes there


def plant(tmp_path, argv: list[str]) -> str:
    """A finished record of parse_config(argv), as train.py writes it."""
    args = train.parse_config(argv)
    path = tmp_path / "src" / f"{args.name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"schema_version": train.SCHEMA_VERSION, "status": "finished",
                                "config": train.config_of(args), "given": args.given}))
    return str(path)


def test_from_with_another_seed_gets_its_own_name_beside_the_source(tmp_path):
    source = plant(tmp_path, ["--arch", "resnet34", "--pool", "avg", "--opt", "sgd"])
    args = train.parse_config(["--from", source, "--seed", "1"])
    assert source.endswith("resnet34-avg-sgd-s0.json")
    assert args.name == "resnet34-avg-sgd-s1" and args.out == str(tmp_path / "src")


def test_from_derives_the_optimiser_defaults_again(tmp_path):
    sgd = plant(tmp_path, ["--arch", "resnet20"])
    adam = train.parse_config(["--from", sgd, "--opt", "adam"])
    assert (adam.lr, adam.wd, adam.schedule, tuple(adam.betas)) == (1e-3, 0.0, "cosine", (0.9, 0.999))
    small = train.parse_config(["--from", sgd, "--batch-size", "128"])
    assert small.lr == pytest.approx(0.1)  # 0.4 at 512, scaled to the new batch
    short = train.parse_config(["--from", sgd, "--epochs", "1"])  # no frozen --warmup-epochs 2 to trip on
    assert short.warmup_epochs == pytest.approx(0.2)
    given_lr = plant(tmp_path, ["--arch", "resnet20", "--lr", "0.3"])
    given = train.parse_config(["--from", given_lr, "--batch-size", "128"])
    assert given.lr == 0.3  # what the user gave is kept


def test_a_replay_takes_the_given_flags_but_not_the_sources_name_folder_or_command(tmp_path):
    source = plant(tmp_path, ["--arch", "resnet20", "--name", "mine", "--out", "elsewhere", "--workers", "1",
                              "--overwrite"])
    replay = train.parse_config(["--from", source])
    assert (replay.arch, replay.workers, replay.overwrite) == ("resnet20", 1, False)
    assert replay.name == "resnet20-avg-sgd-s0" and replay.out == str(tmp_path / "src")
    assert "overwrite" not in json.loads(open(source).read())["given"]


def test_replay_leaves_its_source_untouched(tmp_path, synthetic_data):
    assert run(tmp_path, synthetic_data, "--epochs", "1") == 0
    sources = list((tmp_path / "results").glob("*.json"))
    assert len(sources) == 1
    before = sources[0].read_bytes()
    assert train.main(["--from", str(sources[0]), "--seed", "1", "--data-dir", str(synthetic_data), "--quiet"]) == 0
    assert sources[0].read_bytes() == before
    replay = sources[0].name.replace("-s0.json", "-s1.json")
    assert record(tmp_path, replay[:-5])["config"]["seed"] == 1


# ---------------------------------------------------------------------------------------------
# Names and what a fresh run may replace


def test_default_names_differ_when_configs_differ():
    names = {train.parse_config(argv).name for argv in (
        [], ["--epochs", "20"], ["--lr", "0.1"], ["--batch-size", "128"], ["--aug", "none"], ["--val-split", "0.1"],
        ["--tta"], ["--label-smoothing", "0"], ["--wd", "0"], ["--amp", "off"], ["--fraction", "0.5"],
        ["--early-stop", "2", "--val-split", "0.1"], ["--pool-norm"])}
    assert len(names) == 13
    assert train.parse_config(["--arch", "resnet20", "--epochs", "10", "--val-split", "0.1", "--tta"]).name == \
        "resnet20-avg-sgd-val0.1-tta-s0"
    assert train.parse_config(["--arch", "resnet34", "--pool", "avg", "--opt", "sgd"]).name == "resnet34-avg-sgd-s0"
    assert train.parse_config(["--arch", "resnet20", "--pool", "max", "--pool-norm"]).name == \
        "resnet20-max-poolnorm-sgd-s0"
    # flags that do not change what is computed do not change the name
    assert train.parse_config(["--quiet", "--workers", "1", "--data-dir", "x"]).name == train.parse_config([]).name
    assert train.parse_config(["--no-pool-norm"]).name == train.parse_config([]).name  # the default, said


def test_factors_are_the_choices_made_with_resnet_custom_options_only_when_set():
    args = train.parse_config(["--arch", "resnet_custom", "--blocks", "1,1", "--channels", "8,16", "--opt", "adam",
                               "--wd", "0.1", "--seed", "3", "--workers", "1", "--amp", "bf16", "--tta"])
    factors = train.factors_of(args)
    assert (factors["blocks"], factors["wd"], factors["tta"], factors["early_stop"]) == ([1, 1], 0.1, True, None)
    assert not {"head", "seed", "workers", "amp", "lr", "betas", "schedule", "name", "out", "resume"} & set(factors)


def test_a_fresh_run_never_replaces_a_finished_record_or_an_interrupted_checkpoint(monkeypatch, tmp_path,
                                                                                  synthetic_data, capsys):
    assert run(tmp_path, synthetic_data, "--epochs", "1", "--name", "done") == 0
    before = (tmp_path / "results" / "done.json").read_bytes()
    with pytest.raises(SystemExit, match="already holds a finished run.*--overwrite"):
        run(tmp_path, synthetic_data, "--epochs", "1", "--name", "done")
    assert (tmp_path / "results" / "done.json").read_bytes() == before
    with monkeypatch.context() as no_work:  # said before any loader or model is built: a sweep skips it at once
        no_work.setattr(train, "make_loaders", lambda *a: pytest.fail("built the loaders of a finished run"))
        assert run(tmp_path, synthetic_data, "--epochs", "1", "--name", "done", "--resume") == 0
    assert "done: already finished" in capsys.readouterr().out
    assert (tmp_path / "results" / "done.json").read_bytes() == before
    run_killed_after_first_checkpoint(monkeypatch, tmp_path, synthetic_data, "--epochs", "2", "--name", "cut")
    ckpt = tmp_path / "results" / "checkpoints" / "cut.pt"
    kept = ckpt.read_bytes()
    with pytest.raises(SystemExit, match="interrupted run.*--resume"):
        run(tmp_path, synthetic_data, "--epochs", "2", "--name", "cut")
    assert ckpt.read_bytes() == kept
    assert run(tmp_path, synthetic_data, "--epochs", "1", "--name", "done", "--overwrite") == 0


def test_a_run_another_process_holds_is_not_touched(monkeypatch, tmp_path, synthetic_data):
    folder = tmp_path / "results" / "checkpoints"
    folder.mkdir(parents=True)
    monkeypatch.setattr(train, "make_loaders", lambda *a: pytest.fail("built the loaders of a run it cannot claim"))
    with open(folder / "live.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for flags in ([], ["--resume"]):
            with pytest.raises(SystemExit, match="being trained by another process"):
                run(tmp_path, synthetic_data, "--epochs", "1", "--name", "live", *flags)
    assert not (tmp_path / "results" / "live.json").exists()


# ---------------------------------------------------------------------------------------------
# The lr schedule


def factors(argv: list[str], steps_per_epoch: int) -> list[float]:
    args = train.parse_config(argv)
    warmup = train.warmup_steps(args, steps_per_epoch)
    limited = "warmup_epochs" not in args.given
    return [train.lr_factor(s, steps_per_epoch, warmup, args, limited)
            for s in range(args.epochs * steps_per_epoch + 1)]


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "multistep", "constant"])
def test_warm_up_starts_above_zero_and_peaks_at_exactly_one(schedule):
    extra = ["--milestones", "4,8"] if schedule == "multistep" else []
    # 7 steps per epoch and 0.8 warm-up epochs: 5.6 steps, the case that overshot to 1.071
    f = factors(["--schedule", schedule, "--warmup-epochs", "0.8", *extra], 7)
    assert 0 < f[0] < 1 and max(f) == 1.0 and f.index(1.0) == 5  # round(5.6) = 6 warm-up steps
    assert all(b > a for a, b in zip(f[:5], f[1:6], strict=True))


def test_one_cycle_and_cosine_end_at_zero_step_and_multistep_drop_at_their_milestones():
    for schedule in ("onecycle", "cosine"):
        f = factors(["--schedule", schedule, "--epochs", "10"], 97)
        assert f[-1] == 0.0 and 0 < f[-2] < 0.02
    step = factors(["--schedule", "step", "--epochs", "8", "--warmup-epochs", "1"], 10)  # milestones 4 and 6
    assert step[39] == 1.0 and step[40] == pytest.approx(0.1) and step[59] == pytest.approx(0.1)
    assert step[60] == pytest.approx(0.01)
    multi = factors(["--schedule", "multistep", "--milestones", "3,5", "--gamma", "0.5", "--epochs", "6",
                     "--warmup-epochs", "1"], 10)
    assert (multi[29], multi[30], multi[50]) == (1.0, 0.5, 0.25)


def test_the_measured_ten_epoch_recipe_keeps_its_exact_schedule():
    """ResNet-20, 10 epochs, full data at batch 512 (97 steps an epoch) reached 83.1 % with the
    schedule before the warm-up floor: the floor leaves that run's lr, step for step, as it was."""
    f = factors([], 97)
    warmup, total = 194, 970
    old = [(s + 1) / warmup if s < warmup else (total - s) / (total - warmup) for s in range(total + 1)]
    assert f == pytest.approx(old, abs=1e-12)


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("epochs, steps_per_epoch", [(1, 1), (2, 9), (2, 39), (10, 9), (10, 97), (50, 97)])
def test_the_default_lr_never_rises_faster_than_the_warm_up_floor(opt, epochs, steps_per_epoch):
    f = factors(["--opt", opt, "--epochs", str(epochs)], steps_per_epoch)
    assert all(b - a <= 1 / train.WARMUP_MIN_STEPS + 1e-12 for a, b in zip([0.0] + f[:-1], f, strict=True))
    if epochs * steps_per_epoch >= 5 * train.WARMUP_MIN_STEPS:
        assert max(f) == 1.0  # a long run reaches its peak, as before


# ---------------------------------------------------------------------------------------------
# What the metrics mean


class Batches(list):
    num_samples = property(lambda self: sum(len(labels) for _, labels in self))


def test_tta_logits_are_the_mean_of_both_views_and_eval_loss_has_no_smoothing():
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)
    result = train.evaluate(model, Batches([(images[:8], labels[:8]), (images[8:], labels[8:])]),
                            torch.device("cpu"), "fp32", torch.contiguous_format, 10, 8, True, 1)
    with torch.no_grad():
        mean = (model(images) + model(images.flip(3))) / 2
    assert result["loss"] == pytest.approx(F.cross_entropy(mean, labels).item(), rel=1e-5)
    assert result["preds"] == mean.argmax(1).tolist() and result["labels"] == labels.tolist()
    assert sum(map(sum, result["confusion"])) == 12


def test_training_loss_is_label_smoothed():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    args = train.parse_config(["--label-smoothing", "0.3", "--quiet"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with torch.no_grad():
        logits = model.train()(images)
    loss, _, first = train.train_one_epoch(model, [(images, labels)], optimizer, scheduler, scaler, "fp32",
                                           torch.contiguous_format, torch.device("cpu"), args, 1, "t")
    assert loss == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.3).item(), rel=1e-5)
    assert loss != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_weight_decay_skips_biases_and_batchnorm(opt):
    model = tiny_model()
    args = train.parse_config(["--opt", opt, "--wd", "0.01"])
    decay, no_decay = train.make_optimizer(model, args).param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "5.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "1.weight", "5.bias"]


def test_early_stop_reports_the_best_val_epoch_and_says_so(monkeypatch, tmp_path, synthetic_data):
    """Val accuracies scripted 0.5, 0.6, 0.4, ...: the best is epoch 2, patience 1 stops after epoch 3,
    and what is reported is epoch 2's test figures and weights."""
    real, scripted, calls = train.evaluate, iter([0.5, 0.6, 0.4, 0.3, 0.2, 0.1]), []

    def evaluate(*args, **kw):
        result = real(*args, **kw)
        calls.append(1)
        return {**result, "acc": next(scripted)} if len(calls) % 2 else result  # val, then test, each epoch

    monkeypatch.setattr(train, "evaluate", evaluate)
    assert run(tmp_path, synthetic_data, "--epochs", "6", "--val-split", "0.2", "--early-stop", "1",
               "--name", "es") == 0
    final = record(tmp_path, "es")["final"]
    history = record(tmp_path, "es")["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3] and final["stopped_early"] is True
    assert final["reported_epoch"] == final["best_val_epoch"] == 2 and final["best_val_acc"] == 0.6
    assert final["test_acc"] == history[1]["test_acc"] and final["last_epoch_test_acc"] == history[2]["test_acc"]
    assert final["reported_model"].startswith("best val epoch") and final["val_acc"] == 0.6
    weights = torch.load(tmp_path / "results" / final["weights"]["best_val"], weights_only=True)
    assert set(weights) == set(torch.load(tmp_path / "results" / final["weights"]["final"], weights_only=True))


def test_records_are_strict_json_even_when_a_loss_is_not_finite(tmp_path):
    import data
    data.save_json_atomic(tmp_path / "r.json", {"test_loss": math.nan, "h": [{"x": math.inf}], "t": (1.0, -math.inf)})
    assert json.loads((tmp_path / "r.json").read_text(), **STRICT) == {"test_loss": None, "h": [{"x": None}],
                                                                      "t": [1.0, None]}


def test_help_shows_the_real_defaults_and_the_conventional_aliases(capsys):
    with pytest.raises(SystemExit) as exit:
        train.parse_config(["--help"])
    text = capsys.readouterr().out
    assert exit.value.code == 0 and "object at" not in text
    for shown in ("--model", "-b BATCH_SIZE, --batch-size BATCH_SIZE",
                  "-j WORKERS, --workers WORKERS", "--weight-decay", "--output-dir", "(default: 512)"):
        assert shown in text, shown
    aliased = train.parse_config(["--model", "resnet20", "-b", "64", "-j", "1", "--weight-decay", "0.001",
                                  "--output-dir", "elsewhere"])
    assert (aliased.arch, aliased.batch_size, aliased.workers, aliased.wd, aliased.out) == \
        ("resnet20", 64, 1, 0.001, "elsewhere")
