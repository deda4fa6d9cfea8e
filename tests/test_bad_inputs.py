"""Every input a user can get wrong gets one clear line, and nothing is written half-way (issue 14).

One table. Each row builds a bad input under tmp_path, runs one command line on it, and expects: a
non-zero exit (2 for argparse's errors, 1 for ours), a last stderr line "error: ..." holding a fragment
that names the thing to fix, no traceback, and every file under tmp_path as it was (names, sizes,
mtimes), with no temporary file left. data.py rows run in-process (data.main with sys.argv, a few ms);
rows for any other script, and rows under a file-size limit (a full disk, as the process sees it), run
as a subprocess (see run_script), so train.py rows can join the table.
"""
from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_env, write_image_folder

import bench
import data
import train

# scripts whose main() a row may call in this process
IN_PROCESS = {"data.py": data.main, "train.py": lambda: sys.exit(train.main()),
              "bench.py": lambda: sys.exit(bench.main())}


# --- building bad inputs --------------------------------------------------------------------------

class Inputs:
    """What a row's builder gets: the test's tmp dir, and a private copy of valid converted data."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest):
        self.tmp, self.request = tmp, request

    def folder(self) -> Path:
        """A valid image folder, one image per class and split, at tmp/src."""
        return write_image_folder(self.tmp / "src", train_per_class=1, test_per_class=1)

    def data_dir(self) -> Path:
        """A copy of the session's valid converted data at tmp/d."""
        return Path(shutil.copytree(self.request.getfixturevalue("synthetic_data"), self.tmp / "d"))


def image_bytes(fmt: str = "PNG", size: int = 32, mode: str = "RGB") -> bytes:
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def replace_image(i: Inputs, content: bytes, name: str = "0000.png") -> None:
    """The source's first airplane training image becomes `name` holding `content`."""
    folder = i.folder() / "train" / "airplane"
    (folder / "0000.png").unlink()
    (folder / name).write_bytes(content)


def dangling_symlink(i: Inputs) -> None:
    image = i.folder() / "train" / "airplane" / "0000.png"
    image.unlink()
    image.symlink_to(i.tmp / "gone.png")


def sixteen_bit_png() -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 40_000, np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def tar_of_folder(i: Inputs) -> None:
    """src.tar.gz of the image folder at tmp/src, which is then removed."""
    with tarfile.open(i.tmp / "src.tar.gz", "w:gz") as tar:
        tar.add(i.tmp / "src", arcname="src")
    shutil.rmtree(i.tmp / "src")


def broken_image_in_tar(i: Inputs) -> None:
    replace_image(i, b"")
    tar_of_folder(i)


def damaged_tar(i: Inputs) -> None:
    i.folder()
    tar_of_folder(i)
    archive = i.tmp / "src.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-200])


def every_airplane_broken(i: Inputs) -> None:
    for path in i.folder().glob("train/airplane/*"):
        path.write_bytes(b"not an image")


def edit_meta(i: Inputs, change: Callable[[dict], object]) -> None:
    """A valid data copy whose meta.json `change` has edited in place."""
    path = i.data_dir() / "meta.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def fewer_classes(meta: dict) -> None:
    """Eight class names, the last two classes' counts folded into the eighth: consistent on its own."""
    meta["classes"] = meta["classes"][:8]
    for split, counts in meta["class_counts"].items():
        meta["class_counts"][split] = counts[:7] + [sum(counts[7:])]


def more_images(meta: dict) -> None:
    meta["counts"]["train"] += 10
    meta["class_counts"]["train"][0] += 10


def beton_of_64px_images(i: Inputs) -> None:
    """test.beton of 64×64 images, its size and sha256 recorded in meta.json as if written for it."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    d = i.data_dir()
    meta = json.loads((d / "meta.json").read_text())
    labels = np.repeat(np.arange(10), meta["class_counts"]["test"][0])
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 64, 64, 3), dtype=np.uint8)
    (d / "test.beton").unlink()
    DatasetWriter(str(d / "test.beton"), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(list(zip(images, labels.tolist(), strict=True)))
    meta["betons"]["test"] = {"bytes": (d / "test.beton").stat().st_size, "sha256": data.sha256_of(d / "test.beton")}
    (d / "meta.json").write_text(json.dumps(meta))


def swap_betons(i: Inputs) -> None:
    d = i.data_dir()
    (d / "train.beton").rename(d / "x")
    (d / "test.beton").rename(d / "train.beton")
    (d / "x").rename(d / "test.beton")


def unreadable_data_dir(i: Inputs) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads through chmod 000 (the 'inside a file' row covers an unusable path)")
    d = i.data_dir()
    d.chmod(0)
    i.request.addfinalizer(lambda: d.chmod(0o755))


# --- the table ------------------------------------------------------------------------------------

SRC, DIR = "{tmp}/src", "{tmp}/d"
CONVERT = ["data.py", "--source", SRC, "--data-dir", DIR]
CHECK = ["data.py", "--check", "--data-dir", DIR]


def row(id: str, build: Callable[[Inputs], object], command: list[str], fragment: str, code: int = 1,
        max_file_bytes: int | None = None):
    return pytest.param(build, command, fragment, code, max_file_bytes, id=id)


ROWS = [
    # 1. Image-folder sources.
    row("image_outside_class_folder", lambda i: (i.folder() / "train" / "stray.png").write_bytes(image_bytes()),
        CONVERT, "train/stray.png is not in a class folder"),
    row("nested_folder", lambda i: (i.folder() / "train" / "cat" / "more").mkdir(),
        CONVERT, "train/cat/more is a folder inside the class folder"),
    row("empty_class_folder", lambda i: [(i.folder() / s / "zebra").mkdir() for s in ("train", "test")],
        CONVERT, "train/zebra holds no images"),
    row("class_folder_of_non_images", lambda i: [(i.folder() / "train" / "cat" / "0000.png").unlink(),
                                                 (i.tmp / "src" / "train" / "cat" / "README.txt").write_text("x")],
        CONVERT, "train/cat holds no images"),
    row("class_in_test_not_train", lambda i: (i.folder() / "test" / "zebra").mkdir(),
        CONVERT, "test/zebra has no matching train/zebra"),
    row("class_in_train_not_test", lambda i: shutil.rmtree(i.folder() / "test" / "truck"),
        CONVERT, "train/truck has no matching test/truck"),
    row("truncated_jpeg", lambda i: replace_image(i, image_bytes("JPEG")[:300], "0000.jpg"),
        CONVERT, "train/airplane/0000.jpg cannot be read as an image (Truncated File Read)"),
    row("zero_byte_image", lambda i: replace_image(i, b""), CONVERT, "0000.png cannot be read as an image"),
    row("text_named_jpg", lambda i: replace_image(i, b"<html>404</html>", "0000.jpg"),
        CONVERT, "0000.jpg cannot be read as an image (not an image PIL can read)"),
    row("dangling_symlink", dangling_symlink, CONVERT,
        "0000.png cannot be read as an image (No such file or directory)"),
    row("image_64x64", lambda i: replace_image(i, image_bytes(size=64)), CONVERT, "0000.png is 64×64, not 32×32"),
    row("image_16_bit", lambda i: replace_image(i, sixteen_bit_png()), CONVERT, "has mode I;16"),
    row("broken_image_in_tar", broken_image_in_tar, ["data.py", "--source", "{tmp}/src.tar.gz", "--data-dir", DIR],
        "src.tar.gz:src/train/airplane/0000.png cannot be read as an image"),
    row("damaged_tar", damaged_tar, ["data.py", "--source", "{tmp}/src.tar.gz", "--data-dir", DIR],
        "src.tar.gz is damaged"),
    row("skip_bad_empties_a_class", every_airplane_broken, [*CONVERT, "--skip-bad"],
        "every image of train/airplane is broken"),
    row("force_from_broken_source_keeps_old_data", lambda i: (i.data_dir(), replace_image(i, b"")),
        [*CONVERT, "--force"], "0000.png cannot be read as an image"),
    row("force_onto_a_full_disk_keeps_old_data", lambda i: (i.data_dir(), i.folder()), [*CONVERT, "--force"],
        "File too large: free some space", max_file_bytes=4096),  # past the header: a writer worker's page fails
    row("source_missing", lambda i: None, CONVERT, "src not found: pass --source"),
    row("source_not_an_archive", lambda i: (i.tmp / "src").write_text("hello"), CONVERT,
        "is not a folder or a .tar.gz"),
    row("data_dir_is_a_file", lambda i: (i.folder(), (i.tmp / "d").write_text("")), CONVERT, "d is a file"),
    row("workers_zero", lambda i: i.data_dir(), ["bench.py", "--loader-only", "--data-dir", DIR, "--workers", "0"],
        "--workers: must be at least 1", code=2),
    # 2. Converted data whose parts disagree: what training would read, checked as training does. Any edit
    # of meta.json (by hand, or to seal a beton of other images) breaks its seal: one row per kind of edit.
    row("meta_not_json", lambda i: (i.data_dir() / "meta.json").write_text("{"), CHECK, "meta.json is not valid JSON"),
    row("meta_not_an_object", lambda i: (i.data_dir() / "meta.json").write_text("[{}]"), CHECK,
        "holds a JSON list, not an object"),
    row("meta_other_version", lambda i: edit_meta(i, lambda m: m.update(version=0)), CHECK,
        "meta.json is version 0, this data.py reads version 1"),
    row("labels_beyond_classes", lambda i: edit_meta(i, fewer_classes), CHECK,
        "meta.json does not match its seal"),
    row("counts_differ_from_beton", lambda i: edit_meta(i, more_images), CHECK,
        "meta.json does not match its seal"),
    row("beton_images_64x64", beton_of_64px_images, CHECK, "meta.json does not match its seal"),
    row("betons_swapped", swap_betons, CHECK, "train.beton has"),
    row("check_data_dir_is_a_file", lambda i: (i.tmp / "d").write_text(""), CHECK, "d is a file, not a folder"),
    row("data_dir_inside_a_file", lambda i: (i.tmp / "f").write_text(""),
        ["data.py", "--check", "--data-dir", "{tmp}/f/d"], "lies inside"),
    row("data_dir_unreadable", unreadable_data_dir, CHECK, "permission denied"),
    row("data_dir_missing", lambda i: None, CHECK, "holds no converted CIFAR-10"),
]


TRAIN = ["train.py", "--data-dir", DIR, "--out", "{tmp}/results", "--quiet", "--device", "cpu"]
TINY_RUN = [*TRAIN, "--arch", "resnet20", "--batch-size", "32", "--aug", "none", "--no-compile", "--amp", "fp32"]


def record_file(i: Inputs, text: str) -> None:
    i.data_dir()
    (i.tmp / "r.json").write_text(text)


def foreign_checkpoint(i: Inputs) -> None:
    """A checkpoint of this run's name that another program (or an old train.py) wrote."""
    import torch
    i.data_dir()
    folder = i.tmp / "results" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"epoch": 1, "weights": torch.zeros(3)}, folder / "x.pt")


def finished_run_keeping(i: Inputs, weights) -> None:
    """A finished resnet20 run's record, tmp/results/x.json, cut to what --eval-only reads, whose kept
    weights file, models/x.pt, holds `weights` (bytes are written as they are, anything else torch.saved)."""
    import torch
    classes = json.loads((i.data_dir() / "meta.json").read_text())["classes"]
    results = i.tmp / "results"
    (results / "models").mkdir(parents=True)
    config = {"arch": "resnet20", "pool": "avg", "stem": "cifar", "pool_norm": False, "batch_size": 32}
    record = {"schema_version": 1, "name": "x", "status": "finished", "config": config, "given": config,
              "run": {"amp": "fp32", "channels_last": True, "world_size": 1}, "classes": classes,
              "final": {"weights": {"final": "models/x.pt"}}, "history": []}
    (results / "x.json").write_text(json.dumps(record))
    if isinstance(weights, bytes):
        (results / "models" / "x.pt").write_bytes(weights)
    else:
        torch.save(weights, results / "models" / "x.pt")


def weights_of(arch: str) -> dict:
    import models
    return models.build_model(arch).state_dict()


def checkpoint_of(arch: str) -> dict:
    """A training checkpoint as train.py writes it, cut to its epoch and model."""
    return {"epoch": 3, "model": weights_of(arch)}


EVAL_ONLY = ["train.py", "--eval-only", "--from", "{tmp}/results/x.json", "--data-dir", DIR, "--device", "cpu"]

ROWS += [
    # 3. Flags: each bad value under its own name, impossible combinations refused before any work.
    row("batch_size_zero", Inputs.data_dir, [*TRAIN, "--batch-size", "0"], "--batch-size must be at least 1", 2),
    row("epochs_zero", Inputs.data_dir, [*TRAIN, "--epochs", "0"], "--epochs must be at least 1", 2),
    row("lr_negative", Inputs.data_dir, [*TRAIN, "--lr", "-0.1"], "--lr must be positive", 2),
    row("fraction_above_one", Inputs.data_dir, [*TRAIN, "--fraction", "1.5"], "--fraction must be in (0, 1]", 2),
    row("val_split_one", Inputs.data_dir, [*TRAIN, "--val-split", "1"], "--val-split must be in [0, 1)", 2),
    row("label_smoothing_one", Inputs.data_dir, [*TRAIN, "--label-smoothing", "1"], "--label-smoothing", 2),
    row("warmup_beyond_epochs", Inputs.data_dir, [*TRAIN, "--epochs", "2", "--warmup-epochs", "3"],
        "--warmup-epochs must be in [0, --epochs 2]", 2),
    row("momentum_with_adam", Inputs.data_dir, [*TRAIN, "--opt", "adam", "--momentum", "0.8"],
        "--momentum and --nesterov are for --opt sgd", 2),
    row("betas_with_sgd", Inputs.data_dir, [*TRAIN, "--betas", "0.9,0.99"], "--betas are for --opt adam or adamw", 2),
    row("one_beta", Inputs.data_dir, [*TRAIN, "--opt", "adamw", "--betas", "0.9"], "--betas takes two values", 2),
    row("milestones_without_step_schedule", Inputs.data_dir, [*TRAIN, "--milestones", "3"],
        "--milestones are for --schedule multistep or step", 2),
    row("milestone_beyond_epochs", Inputs.data_dir,
        [*TRAIN, "--schedule", "multistep", "--milestones", "5,20", "--epochs", "10"],
        "--milestones must lie in (0, --epochs 10]", 2),
    row("early_stop_without_val_split", Inputs.data_dir, [*TRAIN, "--early-stop", "3"],
        "--early-stop watches the val accuracy: add --val-split", 2),
    row("imagenet_stem_on_cifar_resnet", Inputs.data_dir, [*TRAIN, "--arch", "resnet20", "--stem", "imagenet"],
        "--stem imagenet is for the torchvision ResNets", 2),
    row("pretrained_without_weights", Inputs.data_dir, [*TRAIN, "--arch", "resnet9", "--pretrained"],
        "--pretrained: resnet9 has no ImageNet weights", 2),
    row("custom_option_on_another_arch", Inputs.data_dir, [*TRAIN, "--arch", "resnet18", "--blocks", "2,2"],
        "--blocks: for --arch resnet_custom only", 2),
    row("custom_lists_mismatch", Inputs.data_dir,
        [*TINY_RUN, "--arch", "resnet_custom", "--blocks", "2,2", "--channels", "32"], "one positive entry per stage"),
    row("unknown_augmentation", Inputs.data_dir, [*TRAIN, "--aug", "flip,mixup"], "--aug: unknown augmentation", 2),
    row("name_with_a_slash", Inputs.data_dir, [*TRAIN, "--name", "a/b"], "--name 'a/b': use letters", 2),
    row("resume_and_overwrite", Inputs.data_dir, [*TRAIN, "--resume", "--overwrite"], "pick one", 2),
    row("device_unknown", Inputs.data_dir, [*TRAIN[:-2], "--device", "tpu"], "--device 'tpu' is not a device"),
    row("cuda_without_a_gpu", Inputs.data_dir, [*TRAIN[:-2], "--device", "cuda"],
        "--device cuda but no CUDA device is visible"),
    row("batch_larger_than_the_data", Inputs.data_dir, [*TINY_RUN, "--batch-size", "4096"],
        "batch size 4096 is larger than the 240 training images"),
    row("train_on_missing_data", lambda i: None, TRAIN, "holds no converted CIFAR-10"),
    # 4. Switches a device would run pathologically.
    row("fp16_autocast_on_cpu", Inputs.data_dir, [*TRAIN, "--amp", "fp16"], "--amp fp16 on a CPU is emulated"),
    row("sync_bn_without_torchrun", Inputs.data_dir, [*TRAIN, "--sync-bn"], "--sync-bn needs torchrun"),
    # 5. Files a run reads.
    row("from_truncated_record", lambda i: record_file(i, '{"config": {"arch": "res'),
        [*TRAIN, "--from", "{tmp}/r.json"], "not a readable JSON file", 2),
    row("from_foreign_json", lambda i: record_file(i, '{"loss": [1, 2]}'),
        [*TRAIN, "--from", "{tmp}/r.json"], "not a run record of train.py", 2),
    row("from_future_schema", lambda i: record_file(i, '{"schema_version": 9, "config": {"arch": "resnet20"}}'),
        [*TRAIN, "--from", "{tmp}/r.json"], "written by another train.py (schema 9", 2),
    row("from_missing_file", Inputs.data_dir, [*TRAIN, "--from", "{tmp}/nope.json"], "not a readable JSON file", 2),
    row("resume_a_foreign_checkpoint", foreign_checkpoint, [*TINY_RUN, "--name", "x", "--resume"],
        "was not written by this train.py (schema None"),
    row("out_is_a_file", lambda i: (i.data_dir(), (i.tmp / "results").write_text("")), TINY_RUN,
        "cannot make the results folder there"),
    row("eval_only_weights_of_another_arch", lambda i: finished_run_keeping(i, weights_of("resnet32")), EVAL_ONLY,
        "models/x.pt does not hold the weights of x's network (--arch resnet20 --pool avg): its tensors do not "
        "match (layer1.3.conv1.weight is not in the network; 188 tensors there, 116 in the network): point --from "
        "to the record of the run that made it"),
    row("eval_only_weights_of_another_width", lambda i: finished_run_keeping(i, weights_of("resnet18")), EVAL_ONLY,
        "its tensors do not match (conv1.weight is 64×3×3×3 there, 16×3×3×3 in the network;"),
    row("eval_only_checkpoint_for_weights", lambda i: finished_run_keeping(i, checkpoint_of("resnet20")), EVAL_ONLY,
        "models/x.pt does not hold the weights of x's network (--arch resnet20 --pool avg): it holds a dict, not a "
        "state dict of tensors (a training checkpoint?): point --from to the record of the run that made it, "
        "or make x's weights again: python train.py --from"),
    row("eval_only_weights_unreadable", lambda i: finished_run_keeping(i, b"PK\x03\x04 cut short"), EVAL_ONLY,
        "models/x.pt, the weights of"),
]


# --- running a row --------------------------------------------------------------------------------

def run_in_process(main: Callable[[], None], argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """main() as `python argv...` would run it: SystemExit("text") prints text to stderr and exits 1."""
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    try:
        main()
    except SystemExit as exit:
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_script(argv: list[str], max_file_bytes: int | None = None, timeout: float = 600) -> tuple[int, str, str]:
    """`python ROOT/argv[0] argv[1:]` as a subprocess (train.py rows: it sets up devices and threads),
    whose writes past max_file_bytes fail with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    result = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True,
                            env=run_env(), timeout=timeout, preexec_fn=limit if max_file_bytes else None)
    return result.returncode, result.stdout, result.stderr


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: files by size and mtime; folders by name only (a temporary file
    written and removed inside one changes its mtime, and that is allowed)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
            for p in sorted(root.rglob("*")) if p.suffix != ".lock"}  # a run's empty lock file claims its name


@pytest.mark.parametrize("build, command, fragment, code, max_file_bytes", ROWS)
def test_bad_input_gives_one_line_naming_the_fix_and_writes_nothing(build, command, fragment, code, max_file_bytes,
                                                                   tmp_path, request, monkeypatch, capsys):
    build(Inputs(tmp_path, request))
    before = snapshot(tmp_path)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
    monkeypatch.chdir(tmp_path)  # a relative default (data/) would land here, and be seen
    if argv[0] in IN_PROCESS and max_file_bytes is None:
        returncode, out, err = run_in_process(IN_PROCESS[argv[0]], argv, monkeypatch, capsys)
    else:
        returncode, out, err = run_script(argv, max_file_bytes)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert returncode == code, out + err
    assert re.match(r"(\S+\.py: )?error: ", last), err  # argparse puts the program's name first
    assert fragment in last, last
    assert "Traceback" not in out + err
    assert snapshot(tmp_path) == before
