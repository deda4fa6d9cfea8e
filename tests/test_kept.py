"""What a run leaves for its user (issue 15): the kept weights, --eval-only, TensorBoard event files.
Runs are in-process (train.main) on the tiny synthetic data set, with the fixed switches of TINY."""
from __future__ import annotations

import json

import data
import models
import pytest
import torch
import train
from conftest import TINY


def run(out, data_dir, *flags) -> int:
    return train.main([*TINY, "--data-dir", str(data_dir), "--out", str(out), *flags])


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory, synthetic_data):
    """A finished run with a val split, so both final and best-val weights are kept."""
    out = tmp_path_factory.mktemp("kept") / "results"
    assert run(out, synthetic_data, "--epochs", "3", "--val-split", "0.2", "--name", "kept") == 0
    return out, json.loads((out / "kept.json").read_text())


def test_build_from_config_rebuilds_the_network_with_its_custom_options():
    args = train.parse_config(["--arch", "resnet_custom", "--blocks", "1,2", "--channels", "8,16", "--head", "32",
                               "--dropout", "0.1", "--kernel-size", "5"])
    config = json.loads(json.dumps(vars(args), default=list))  # as the record holds it: tuples become lists
    rebuilt = models.build_from_config(config, num_classes=10)
    built = models.build_model("resnet_custom", num_classes=10, **train.model_options(args))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    assert any(isinstance(m, torch.nn.Dropout) for m in rebuilt.modules())


def test_kept_weights_load_with_weights_only_and_give_the_recorded_test_accuracy(kept_run, synthetic_data):
    out, record = kept_run
    assert set(record["final"]["weights"]) == {"final", "best_val"}
    # the README's three lines
    model = models.build_from_config(record["config"], num_classes=len(record["classes"]))
    state = torch.load(out / record["final"]["weights"]["final"], weights_only=True)
    model.load_state_dict(state)  # strict: every key of the config's network, and nothing else
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    assert all(t.device.type == "cpu" for t in state.values())
    # evaluated as the run did (batch 32, channels-last, fp32, eager)
    loader = data.make_loader("test", 32, "cpu", aug="none", data_dir=synthetic_data)
    model = model.to(memory_format=torch.channels_last)
    result = train.evaluate(model, loader, torch.device("cpu"), None, torch.channels_last, 10, 32, False, 1)
    assert result["acc"] == record["final"]["test_acc"] and result["loss"] == record["final"]["test_loss"]


# ---------------------------------------------------------------------------------------------
# --eval-only


def files_of(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def evaluate_saved(source, *flags) -> int:
    return train.main(["--eval-only", "--from", str(source), *flags])


def test_eval_only_gives_the_recorded_accuracy_prints_the_confusion_matrix_and_writes_nothing(kept_run, capsys):
    out, record = kept_run
    before = files_of(out)
    assert evaluate_saved(out / "kept.json") == 0  # --data-dir and the switches come from the record
    printed = capsys.readouterr().out
    assert files_of(out) == before  # no record, checkpoint, lock or weights written or touched
    final = record["final"]
    assert f"test acc {final['test_acc']:.2%}" in printed and ": identical" in printed
    assert "[amp off, channels-last, eager, batch 32, no tta]" in printed
    lines = printed.splitlines()
    header = lines.index("confusion matrix (rows: true class, columns: predicted):")
    for i, (name, row) in enumerate(zip(record["classes"], final["confusion"], strict=True)):
        assert lines[header + 2 + i].split() == [name, *map(str, row)]
        assert f"  {name}" in lines[lines.index("per-class accuracy:") + 1 + i]


def test_eval_only_best_val_weights_give_the_best_val_epochs_test_accuracy(kept_run, capsys):
    out, record = kept_run
    assert evaluate_saved(out / "kept.json", "--weights", "best-val") == 0
    printed = capsys.readouterr().out
    best = record["final"]["best_val_epoch"]
    assert "models/kept-best-val.pt" in printed and f"the record, epoch {best}:" in printed
    assert ": identical" in printed


def test_eval_only_with_tta_on_a_run_without_it_has_no_record_to_compare(kept_run, capsys):
    out, _ = kept_run
    assert evaluate_saved(out / "kept.json", "--tta") == 0
    printed = capsys.readouterr().out
    assert ", tta]" in printed and "the record" not in printed


def test_eval_only_matches_a_bf16_run_exactly(tmp_path, synthetic_data, capsys):
    out = tmp_path / "results"
    assert run(out, synthetic_data, "--epochs", "1", "--amp", "bf16", "--name", "bf16") == 0
    record = json.loads((out / "bf16.json").read_text())
    assert record["run"]["amp"] == "bfloat16"
    state = torch.load(out / record["final"]["weights"]["final"], weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())  # autocast keeps fp32
    capsys.readouterr()
    assert evaluate_saved(out / "bf16.json") == 0
    printed = capsys.readouterr().out
    assert "[amp bfloat16, channels-last, eager" in printed and ": identical" in printed


def planted(tmp_path, record: dict, **changes) -> str:
    path = tmp_path / "elsewhere" / "planted.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({**record, **changes}))
    return str(path)


def test_eval_only_refuses_in_one_line_what_it_cannot_evaluate(kept_run, tmp_path):
    out, record = kept_run
    no_best = {**record["final"], "weights": {"final": record["final"]["weights"]["final"]}}
    refusals = [
        ({"status": "running", "final": None}, r"keeps no weights \(status running\): finish it first.*--resume"),
        ({"status": "diverged", "final": None}, "keeps no weights.*lower --lr"),
        ({"final": {k: v for k, v in record["final"].items() if k != "weights"}},
         "keeps no weights.*run it again to completion.*--overwrite"),
        ({}, "kept.pt, the final weights of .*planted.json, is missing: run it again to completion"),
    ]
    for changes, message in refusals:
        with pytest.raises(SystemExit, match=message):
            evaluate_saved(planted(tmp_path, record, **changes))
    with pytest.raises(SystemExit, match="no best-val weights.*--val-split.*--weights final"):
        evaluate_saved(planted(tmp_path, record, final=no_best), "--weights", "best-val")
    with pytest.raises(SystemExit) as bad_usage:
        train.main(["--eval-only"])
    assert bad_usage.value.code == 2
