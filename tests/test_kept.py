"""What a run leaves for its user (issue 15): the kept weights, --eval-only, TensorBoard event files.
Runs are in-process (train.main) on the tiny synthetic data set, with the fixed switches of TINY."""
from __future__ import annotations

import json

import data
import models
import numpy as np
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
    config = json.loads(json.dumps(train.config_of(args), default=list))  # as the record holds it: lists
    rebuilt = models.build_from_config(config, num_classes=10)
    built = models.build_model("resnet_custom", num_classes=10, blocks=(1, 2), channels=(8, 16), head=(32,),
                               dropout=0.1, kernel_size=5)
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
    result = train.evaluate(model, loader, torch.device("cpu"), "fp32", torch.channels_last, 10, 32, False, 1)
    assert result["acc"] == record["final"]["test_acc"] and result["loss"] == record["final"]["test_loss"]


def test_a_finished_run_keeps_the_preview_images_its_predictions_index(kept_run, synthetic_data):
    out, record = kept_run
    predictions = record["final"]["predictions"]
    with np.load(out / predictions["images"]) as preview:
        assert preview["indices"].tolist() == predictions["indices"]  # the same sample, in the same order
        assert preview["labels"].tolist() == predictions["labels"]
        with np.load(synthetic_data / data.PREVIEW_FILE) as source:
            np.testing.assert_array_equal(preview["images"], source["images"])


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
    assert "[amp fp32, channels-last, eager, batch 32, no tta]" in printed
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
    assert record["run"]["amp"] == "bf16"
    state = torch.load(out / record["final"]["weights"]["final"], weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())  # autocast keeps fp32
    capsys.readouterr()
    assert evaluate_saved(out / "bf16.json") == 0
    printed = capsys.readouterr().out
    assert "[amp bf16, channels-last, eager" in printed and ": identical" in printed


def planted(tmp_path, record: dict, **changes) -> str:
    path = tmp_path / "elsewhere" / "planted.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({**record, **changes}))
    return str(path)


def test_eval_only_refuses_in_one_line_what_it_cannot_evaluate(kept_run, tmp_path):
    out, record = kept_run
    no_best = {**record["final"], "weights": {"final": record["final"]["weights"]["final"]}}
    another_arch = tmp_path / "elsewhere" / "models" / "resnet32.pt"
    another_arch.parent.mkdir(parents=True)
    torch.save(models.build_model("resnet32").state_dict(), another_arch)
    refusals = [
        ({"final": {**record["final"], "weights": {"final": "models/resnet32.pt"}}},
         r"resnet32.pt does not hold the weights of kept's network \(--arch resnet20 --pool avg\): its tensors do "
         r"not match .*: point --from to the record of the run that made it, or .*--overwrite$"),
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


# ---------------------------------------------------------------------------------------------
# TensorBoard


def board(out, name: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(out / "tensorboard" / name))
    accumulator.Reload()
    return accumulator


def assert_scalars_are_the_history(accumulator, record: dict) -> None:
    """Every history column at step = epoch, as the float32 TensorBoard stores, and nothing else."""
    logged = accumulator.Tags()["scalars"]
    for key, tag in train.BOARD_TAGS.items():
        expected = [(row["epoch"], np.float32(row[key])) for row in record["history"] if row.get(key) is not None]
        found = [(e.step, np.float32(e.value)) for e in accumulator.Scalars(tag)] if tag in logged else []
        assert found == expected, tag


def test_tensorboard_scalars_are_the_records_history_and_hparams_its_config(kept_run):
    from tensorboard.plugins.hparams import api_pb2, metadata
    out, record = kept_run
    accumulator = board(out, "kept")
    assert_scalars_are_the_history(accumulator, record)
    last = record["history"][-1]["epoch"]
    for key in train.BOARD_FINAL:
        assert [(e.step, e.value) for e in accumulator.Scalars(f"final/{key}")] == [
            (last, np.float32(record["final"][key]))]
    sessions = accumulator.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(sessions[metadata.SESSION_START_INFO_TAG])
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hparams["arch"] == "resnet20" and hparams["lr"] == record["config"]["lr"] and hparams["seed"] == 0
    assert hparams["amp"] == "fp32" and hparams["channels_last"] == "True" and hparams["compile"] == "False"
    assert not {"name", "out", "data_dir", "quiet", "workers"} & set(hparams)
    end = metadata.parse_session_end_info_plugin_data(sessions[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS


class Killed(Exception):
    pass


def test_a_resumed_run_appends_to_its_tensorboard_folder_with_no_epoch_twice(monkeypatch, tmp_path, synthetic_data):
    """Killed after epoch 2 was logged but before its checkpoint was written: the resumed run redoes
    epoch 2, and TensorBoard's readers keep only the redone one (the writer's purge_step)."""
    out, flags = tmp_path / "results", ["--epochs", "3", "--fraction", "0.5", "--name", "cut"]
    save, saved = train.save_checkpoint, []

    def die_at_second_checkpoint(path, state):
        if len(saved) == 1:
            raise Killed
        saved.append(path)
        save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", die_at_second_checkpoint)
    with pytest.raises(Killed):
        run(out, synthetic_data, *flags)
    monkeypatch.undo()
    assert [e.step for e in board(out, "cut").Scalars("loss/train")] == [1, 2]
    assert run(out, synthetic_data, *flags, "--resume") == 0
    record = json.loads((out / "cut.json").read_text())
    assert [row["epoch"] for row in record["history"]] == [1, 2, 3]
    assert len(list((out / "tensorboard" / "cut").glob("events.out.tfevents.*"))) == 2  # appended, one per process
    assert_scalars_are_the_history(board(out, "cut"), record)
    # a fresh run of the same name (--overwrite) starts the folder anew
    assert run(out, synthetic_data, "--epochs", "1", "--fraction", "0.5", "--name", "cut", "--overwrite") == 0
    assert [e.step for e in board(out, "cut").Scalars("loss/train")] == [1]


# tensorboard's writer thread also prints its error's traceback (threading's excepthook) as it dies
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_event_writer_says_so_once_and_the_run_finishes(monkeypatch, tmp_path, synthetic_data, capsys):
    """The disk fills after the run's first few events: the writer's thread fails, and the next call
    re-raises its error."""
    from tensorboard.summary.writer.record_writer import RecordWriter
    write, written = RecordWriter.write, []

    def fill_up(self, data):
        if len(written) > 3:
            raise OSError(28, "No space left on device")
        written.append(data)
        write(self, data)

    monkeypatch.setattr(RecordWriter, "write", fill_up)
    assert run(tmp_path / "results", synthetic_data, "--epochs", "2", "--fraction", "0.5", "--name", "full") == 0
    printed = capsys.readouterr().out
    assert printed.count("warning: TensorBoard logging stopped (OSError") == 1 and "JSON record" in printed
    record = json.loads((tmp_path / "results" / "full.json").read_text())
    assert record["status"] == "finished" and len(record["history"]) == 2
    assert (tmp_path / "results" / record["final"]["weights"]["final"]).exists()


def test_eval_report_names_compiled_kernels_when_a_compiled_runs_accuracy_differs():
    result = {"acc": 0.5, "loss": 0.69, "confusion": [[3, 2], [3, 2]]}  # 5 of 10 right
    recorded = {"epoch": 2, "acc": 0.7, "loss": 0.6}
    compiled = train.evaluation_report(result, ["a", "b"], {**recorded, "compiled": True}).splitlines()[1]
    assert compiled.endswith("2 images differ: the run was evaluated by compiled kernels, which round differently "
                             "from eager ones")
    eager = train.evaluation_report(result, ["a", "b"], {**recorded, "compiled": False}).splitlines()[1]
    assert eager.endswith("differs: another device, torch build or data?")
