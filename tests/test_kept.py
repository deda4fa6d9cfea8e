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
