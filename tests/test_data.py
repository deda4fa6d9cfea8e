"""data.py: sources, conversion, integrity checks and the loader, on synthetic data."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (CLASSES, ROOT, SHARED_JPEG, TEST_PER_CLASS, TRAIN_PER_CLASS, label_of_red, run_env,
                      write_image_folder)

import data


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader], strict=True)
    return torch.cat(images), torch.cat(labels)


def test_image_folder_converts_to_betons_with_meta_and_numpys_statistics(synthetic_data, image_folder):
    from PIL import Image
    meta = json.loads((synthetic_data / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES)
    assert meta["counts"] == {"train": 10 * TRAIN_PER_CLASS, "test": 10 * TEST_PER_CLASS}
    assert meta["class_counts"]["train"] == [TRAIN_PER_CLASS] * 10
    for split in ("train", "test"):
        beton = synthetic_data / f"{split}.beton"
        assert meta["betons"][split]["bytes"] == beton.stat().st_size
        assert meta["betons"][split]["sha256"] == hashlib.sha256(beton.read_bytes()).hexdigest()
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(image_folder.glob("train/*/*.png"))]) / 255.0
    np.testing.assert_allclose(meta["mean"], pixels.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(meta["std"], pixels.std(axis=(0, 1, 2)), rtol=1e-9)


def test_second_run_finds_valid_files_and_says_so_in_one_line(synthetic_data, image_folder, capsys):
    report = data.prepare(str(image_folder), synthetic_data)
    assert "\n" not in report and "nothing to do" in report and capsys.readouterr().err == ""


def test_truncated_beton_is_detected_and_rebuilt(fresh_data, image_folder, synthetic_data, capsys):
    beton = fresh_data / "train.beton"
    good = beton.read_bytes()
    beton.write_bytes(good[: len(good) // 2])
    with pytest.raises(data.DataError, match="rebuild"):
        data.ensure_valid(fresh_data)
    assert "wrote" in data.prepare(str(image_folder), fresh_data)
    assert "rebuilding: train.beton has" in capsys.readouterr().err
    # FFCV's parallel writer lays pages out in no fixed order, so compare contents, not bytes.
    assert data.ensure_valid(fresh_data)["counts"]["train"] == 240
    np.testing.assert_array_equal(data.read_images(fresh_data, "train", list(range(240))),
                                  data.read_images(synthetic_data, "train", list(range(240))))


def test_bit_flipped_beton_is_refused_before_training(fresh_data):
    beton = fresh_data / "test.beton"
    content = bytearray(beton.read_bytes())
    content[len(content) // 2] ^= 0x01
    beton.write_bytes(bytes(content))
    with pytest.raises(data.DataError, match="sha256"):
        data.ensure_valid(fresh_data)


class RunsCode:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def pickle_folder(root: Path, content) -> Path:
    """root/cifar-10-batches-py with the official file names, each holding pickle.dumps(content(name))."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name in (*BATCHES, "batches.meta"):
        (folder / name).write_bytes(pickle.dumps(content(name)))
    return folder


def test_pickle_source_with_wrong_checksum_is_refused_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    folder = pickle_folder(tmp_path, lambda name: RunsCode(marker))
    with pytest.raises(data.DataError, match="does not match the official CIFAR-10 checksum"):
        data.prepare(str(folder), tmp_path / "d")
    assert not marker.exists()
    assert not (tmp_path / "d" / "meta.json").exists()


def test_official_pickle_format_is_read_once_checksums_match(tmp_path, monkeypatch):
    """The pickle reader on files in the official layout, with their checksums declared official."""
    rng = np.random.default_rng(0)
    files = {name: {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
             for name in BATCHES}
    folder = pickle_folder(tmp_path, lambda name: files.get(name, {"label_names": list(CLASSES)}))
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    from torchvision.datasets import CIFAR10
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    for source in (tmp_path, tmp_path / "cifar-10-python.tar.gz"):  # the folder above, and the archive
        splits, classes, report, _ = data.read_source(str(source), tmp_path / "d")
        assert classes == list(CLASSES) and report == {}
        assert splits["train"][0].shape == (50, 32, 32, 3) and splits["test"][0].shape == (10, 32, 32, 3)
        first = files["data_batch_1"]["data"][3].reshape(3, 32, 32).transpose(1, 2, 0)
        np.testing.assert_array_equal(splits["train"][0][3], first)
    assert "wrote 50 train, 10 test images" in data.prepare(str(source), tmp_path / "d")


def test_loader_yields_normalised_channels_last_float_batches_on_the_device(synthetic_data):
    loader = data.make_loader("train", 16, torch.device("cpu"), aug="none", data_dir=synthetic_data)
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and images.device.type == labels.device.type == "cpu"
    images, _ = all_batches(data.make_loader("train", 240, "cpu", aug="none", data_dir=synthetic_data))
    np.testing.assert_allclose(images.mean((0, 2, 3)).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(images.std((0, 2, 3)).numpy(), 1, atol=1e-2)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_normalise_is_the_per_channel_formula_whatever_the_input_layout(layout):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=layout)
    mean, std = data.channel_tensor([0.49, 0.48, 0.45], "cpu"), data.channel_tensor([0.25, 0.24, 0.26], "cpu")
    out = data.normalise(images, mean, std)
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert images.dtype == torch.uint8  # the input is left alone (it may be FFCV's reused buffer)


@pytest.mark.parametrize("aug", ["none", "flip,translate"])
def test_every_image_arrives_with_its_own_label(synthetic_data, aug):
    meta = json.loads((synthetic_data / "meta.json").read_text())
    loader = data.make_loader("train", 8, "cpu", aug=aug, data_dir=synthetic_data)
    images, labels = all_batches(loader)
    red = images[:, 0, 16, 16] * meta["std"][0] * 255 + meta["mean"][0] * 255  # centre: never translated away
    decoded = torch.tensor([label_of_red(r) for r in red.tolist()])
    assert torch.equal(decoded, labels)
    assert len(labels) == (10 * TRAIN_PER_CLASS // 8) * 8  # drop_last


def test_test_split_is_sequential_and_complete(synthetic_data):
    _, labels = all_batches(data.make_loader("test", 7, "cpu", data_dir=synthetic_data))
    assert labels.tolist() == sorted(labels.tolist())  # the image folder is written class by class
    assert torch.bincount(labels).tolist() == [TEST_PER_CLASS] * 10


def test_fraction_and_val_split_are_class_balanced_disjoint_and_nested():
    labels = np.repeat(np.arange(10), 100)
    train, val = data.split_indices(labels, fraction=0.5, val_split=0.2, seed=3)
    assert len(val) == 200 and len(train) == 400
    assert np.bincount(labels[val]).tolist() == [20] * 10 and np.bincount(labels[train]).tolist() == [40] * 10
    assert not set(train) & set(val)
    full, val_again = data.split_indices(labels, fraction=1.0, val_split=0.2, seed=3)
    assert np.array_equal(val, val_again) and set(train) <= set(full)
    other, _ = data.split_indices(labels, fraction=0.5, val_split=0.2, seed=4)
    assert not np.array_equal(train, other)


def test_same_seed_gives_the_same_order_and_another_seed_another(synthetic_data):
    def order(seed):
        return all_batches(data.make_loader("train", 8, "cpu", aug="none", seed=seed, data_dir=synthetic_data))[1]
    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))


def test_flip_and_translate_give_each_image_one_of_its_mirrored_or_shifted_copies():
    """Every output image is its input, mirrored or not, shifted by (dy, dx) in [-4, 4]² with zeros
    shifted in; over 256 images both orientations and every shift occur."""
    x = torch.randn(256, 3, 32, 32)
    out = data.flip_and_translate(x, torch.Generator().manual_seed(0), flip=True, px=4)
    padded = torch.nn.functional.pad(x, (4,) * 4)
    candidates = {(m, dy, dx): (padded.flip(3) if m else padded)[:, :, dy:dy + 32, dx:dx + 32]
                  for m in (0, 1) for dy in range(9) for dx in range(9)}
    found = [next(key for key, c in candidates.items() if torch.equal(c[i], out[i])) for i in range(len(x))]
    assert {m for m, _, _ in found} == {0, 1}
    assert {dy for _, dy, _ in found} == set(range(9)) and {dx for _, _, dx in found} == set(range(9))
    unshifted = data.flip_and_translate(x, torch.Generator().manual_seed(0), flip=False, px=0)
    assert torch.equal(unshifted, x)


def test_device_augmentations_are_seeded_per_epoch(synthetic_data):
    def first_batch(epoch):
        loader = data.make_loader("train", 8, "cpu", aug="flip,translate,rotate,cutout,jitter,vflip,affine",
                                  data_dir=synthetic_data)
        loader.epoch = epoch
        return next(iter(loader))[0]
    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_unknown_augmentation_lists_the_choices():
    with pytest.raises(ValueError, match="choose from none, flip, translate"):
        data.parse_aug("flip,blur")


def test_batch_larger_than_the_data_is_refused(synthetic_data):
    with pytest.raises(ValueError, match="lower --batch-size"):
        data.make_loader("train", 10_000, "cpu", data_dir=synthetic_data)


class LaggingDevice:
    """A device that runs behind the host, as a GPU does: work queued on it (a non-blocking copy, a
    step that reads the batch) runs only at the next synchronize. A blocking copy first waits for
    what is queued, then copies, as cudaMemcpy on a stream does."""

    def __init__(self):
        self.queue, self.lock = [], threading.Lock()

    def enqueue(self, work) -> None:
        with self.lock:
            self.queue.append(work)

    def synchronize(self) -> None:
        with self.lock:  # the device runs one queue, in order: a second caller waits for it to empty
            for step in self.queue:
                step()
            self.queue = []


def lagging_to_device(device: LaggingDevice):
    from ffcv.transforms import ToDevice

    class LaggingToDevice(ToDevice):  # FFCV's ToDevice (its allocation and state), the copy as a late GPU does it
        def generate_code(self):
            non_blocking = self.non_blocking

            def to_device(inp, dst):
                dst = dst[:inp.shape[0]]
                if non_blocking:
                    device.enqueue(lambda: dst.copy_(inp))  # reads the host buffer when the device gets to it
                else:
                    device.synchronize()
                    dst.copy_(inp)
                return dst
            return to_device
    return LaggingToDevice


def test_every_batch_is_the_betons_even_when_the_device_reads_it_late(synthetic_data, monkeypatch):
    """FFCV reuses each host buffer every batches_ahead + 2 batches. Drive FFCV's real epoch iterator
    with a device that syncs only every 10 batches (the loop's host syncs are 25 steps apart): each
    batch the device receives must still be the beton's, in order."""
    import ffcv.transforms
    data.import_ffcv()
    device = LaggingDevice()
    monkeypatch.setattr(ffcv.transforms, "ToDevice", lagging_to_device(device))
    loader = data.make_loader("test", 5, "cpu", data_dir=synthetic_data).loader  # FFCV's Loader: 20 batches
    received = []
    for b, (images, labels) in enumerate(loader):
        device.enqueue(lambda images=images, labels=labels: received.append((images.clone(), labels.clone())))
        if b % 10 == 9:
            device.synchronize()
    device.synchronize()
    images = torch.cat([x for x, _ in received])
    labels = torch.cat([y for _, y in received]).flatten()
    expected = [i // TEST_PER_CLASS for i in range(10 * TEST_PER_CLASS)]
    assert labels.tolist() == expected
    assert [label_of_red(red) for red in images[:, 0].float().mean((1, 2)).tolist()] == expected


def test_leaving_an_epoch_early_stops_ffcvs_loader_thread(synthetic_data):
    """A break out of the epoch (an interrupt, a divergence, a benchmark's cut) on the streaming path a
    GPU takes: FFCV's thread must not go on spinning on its full queue with its buffers."""
    from ffcv.loader.epoch_iterator import EpochIterator
    loader = data.make_loader("train", 8, "cpu", aug="none", data_dir=synthetic_data)
    loader.decode_first = False
    for _ in loader:
        break
    threads = [t for t in threading.enumerate() if isinstance(t, EpochIterator)]
    for thread in threads:
        thread.join(timeout=5)
    assert threads and not any(t.is_alive() for t in threads)


def test_color_jitter_builds_no_tensor_from_python_values_per_step(monkeypatch):
    """On CUDA a tensor made from a Python list is a blocking host-to-device copy: not in every step."""
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    mean, std = data.channel_tensor([0.5] * 3, "cpu"), data.channel_tensor([0.25] * 3, "cpu")
    generator = torch.Generator().manual_seed(0)
    data.device_transform(images, mean, std, ("jitter",), generator)  # the first step may make its constants
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    out = data.device_transform(images, mean, std, ("jitter",), generator)
    assert made == [] and out.shape == images.shape


def test_loader_keeps_torch_thread_count(synthetic_data):
    """FFCV sets torch's threads to its worker count, also from its loader thread as that starts: every
    batch must reach the training step with the count taken before FFCV's import."""
    data.import_ffcv()
    threads = data.TORCH_THREADS
    workers = 1 if threads > 1 else min(2, data.usable_cpus())  # another count than the one to keep
    torch.set_num_threads(threads)
    for _ in range(2):
        for _ in data.make_loader("train", 8, "cpu", aug="none", workers=workers, data_dir=synthetic_data):
            assert torch.get_num_threads() == threads


def test_ffcv_is_imported_without_compiling_numbas_typed_dict():
    """data.import_ffcv gives FFCV's IMAGE_MODES a plain dict (read by Python code only), which saves
    every process the compilation of numba's typed dict; conversion and decoding (every test here) work."""
    data.import_ffcv()
    from ffcv.fields import rgb_image
    import numba.typed
    assert type(rgb_image.IMAGE_MODES) is dict and rgb_image.IMAGE_MODES == {"jpg": 0, "raw": 1}
    assert numba.typed.Dict is not dict  # numba's own is put back for everyone else


def test_decoders_read_each_sample_with_or_without_a_cache_folder(monkeypatch):
    """The image decoder numba keeps on disk copies each sample's bytes out of FFCV's page-cache state;
    where numba finds no writable cache folder (a read-only checkout, no home), it is compiled in the process."""
    from numba.core import caching
    beton = np.arange(40, dtype=np.uint8)
    state = (beton, np.array([0, 12, 24], np.uint64), np.array([12, 12, 12], np.uint64))  # (mmap, ptrs, sizes)
    metadata = np.array([(0,), (12,), (24,)], dtype=[("data_ptr", "<u8")])
    cached = data.jit_cached(data.decode_raw_images, parallel=True)
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    uncached = data.jit_cached(data.decode_raw_images, parallel=True)
    assert type(cached._cache).__name__ == "FunctionCache" and type(uncached._cache).__name__ == "NullCache"
    for decode in cached, uncached:
        images = decode(np.array([2, 0]), np.zeros((3, 2, 2, 3), np.uint8), metadata, state)
        assert images.reshape(2, 12).tolist() == [list(range(24, 36)), list(range(12))]


def test_ffcv_compiles_nothing_of_an_epoch(synthetic_data):
    """A loader's epoch runs our cached decoders, as numba compiled them, not code FFCV compiles in each
    process (1.7 s of a run's first epoch and evaluation)."""
    from ffcv.pipeline.compiler import Compiler
    image_decoder, label_decoder = data.decoders()
    images, labels = next(iter(data.make_loader("test", 5, "cpu", data_dir=synthetic_data)))
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == [0] * 5
    for decoder in image_decoder, label_decoder:
        decode = decoder().generate_code()
        assert Compiler.compile(decode) is decode and decode.signatures  # passed through, and it ran


def test_read_images_returns_the_raw_pixels_in_the_order_asked(synthetic_data, image_folder):
    from PIL import Image
    images = data.read_images(synthetic_data, "test", [12, 0, 5])
    expected = [np.asarray(Image.open(image_folder / "test" / CLASSES[i // 10] / f"{i % 10:04d}.png"))
                for i in (12, 0, 5)]
    np.testing.assert_array_equal(images, np.stack(expected))


def test_conversion_keeps_a_class_balanced_preview_of_the_test_images(synthetic_data, image_folder):
    from PIL import Image
    with np.load(data.preview_path(synthetic_data)) as preview:
        indices, labels, images = preview["indices"], preview["labels"], preview["images"]
    assert len(indices) == data.PREVIEW_COUNT == 64 and len(set(indices.tolist())) == 64
    assert np.bincount(labels, minlength=10).tolist() == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]  # one class after another
    assert labels.tolist() == [i // TEST_PER_CLASS for i in indices]  # an image folder's test set: class by class
    first = int(indices[0])
    folder = image_folder / "test" / CLASSES[first // TEST_PER_CLASS]
    expected = Image.open(folder / f"{first % TEST_PER_CLASS:04d}.png")
    np.testing.assert_array_equal(images[0], np.asarray(expected))


@pytest.mark.skipif(not SHARED_JPEG.exists(), reason="../shared/data/cifar10-jpeg.tar.gz not present")
def test_real_cifar10_jpeg_copy_converts_completely(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "data.py"), "--source", str(SHARED_JPEG), "--data-dir",
                             str(tmp_path)], capture_output=True, text=True, env=run_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["counts"] == {"train": 50_000, "test": 10_000}
    assert meta["class_counts"]["train"] == [5_000] * 10 and meta["class_counts"]["test"] == [1_000] * 10
    np.testing.assert_allclose(meta["mean"], (0.4914, 0.4822, 0.4465), atol=0.003)


# --- image-folder rules (issue 14): what is skipped, converted or refused; refusals are in test_bad_inputs.py ---

def untidy_folder(root):
    """A valid one-image-per-class folder plus what real folders collect: notes, OS litter, hidden folders."""
    write_image_folder(root, 1, 1)
    cat = root / "train" / "cat"
    (cat / "README.txt").write_text("cats")
    (cat / "._0000.png").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble: hidden, and no PNG
    (root / "train" / ".DS_Store").write_bytes(b"\x00")
    (root / "train" / "labels.csv").write_text("a,b")
    (root / "test" / "dog" / "Thumbs.db").write_bytes(b"\x00")
    (cat / ".ipynb_checkpoints").mkdir()
    (cat / ".ipynb_checkpoints" / "0000.png").write_bytes(b"")
    (cat / "0001.jpg").write_bytes((cat / "0000.png").read_bytes())  # a PNG under a .jpg name
    (cat / "0002.PNG").write_bytes((cat / "0000.png").read_bytes())
    return root


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tar.gz"])
def test_hidden_and_non_image_files_are_skipped_and_counted_in_one_line(tmp_path, packed):
    source = untidy_folder(tmp_path / "src")
    if packed:
        with tarfile.open(tmp_path / "src.tar.gz", "w:gz") as tar:
            tar.add(source, arcname="cifar")
        source = tmp_path / "src.tar.gz"
    splits, classes, report, _ = data.read_source(str(source), tmp_path / "d")
    assert classes == list(CLASSES)
    assert np.bincount(splits["train"][1]).tolist() == [1, 1, 1, 3, 1, 1, 1, 1, 1, 1]
    assert sorted(Path(p).name for p in report["skipped_not_images"]) == [
        ".DS_Store", "._0000.png", "0000.png", "README.txt", "Thumbs.db", "labels.csv"]
    notes = data.source_notes(report)
    assert len(notes) == 1 and notes[0].startswith("skipped 6 files that are not images")
    assert not (tmp_path / "d").exists()  # reading a source writes nothing


def test_grayscale_rgba_and_palette_images_become_rgb_and_are_counted(tmp_path):
    from PIL import Image
    source = write_image_folder(tmp_path / "src", 1, 1)
    gray = np.full((32, 32), 77, np.uint8)
    Image.fromarray(gray).save(source / "train" / "cat" / "0000.png")
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(source / "train" / "dog" / "0000.png")
    Image.fromarray(rgb).convert("P").save(source / "test" / "dog" / "0000.png")
    splits, _, report, _ = data.read_source(str(source), tmp_path / "d")
    assert report["converted_to_rgb"] == {"L": 1, "P": 1, "RGBA": 1}
    assert data.source_notes(report) == ["converted 3 images to RGB (1 L, 1 P, 1 RGBA)"]
    images, labels = splits["train"]
    assert (images[labels == CLASSES.index("cat")] == 77).all()
    np.testing.assert_array_equal(images[labels == CLASSES.index("dog")][0], rgb)


def test_skip_bad_skips_broken_images_lists_them_and_keeps_the_rest(tmp_path):
    source = write_image_folder(tmp_path / "src", 3, 1)
    truncated = (source / "train" / "cat" / "0001.png").read_bytes()[:100]
    (source / "train" / "cat" / "0001.png").write_bytes(truncated)
    (source / "train" / "dog" / "0002.jpg").write_text("<html>not found</html>")
    with pytest.raises(data.DataError, match="--skip-bad"):
        data.read_source(str(source), tmp_path / "d")
    splits, _, report, _ = data.read_source(str(source), tmp_path / "d", skip_bad=True)
    assert np.bincount(splits["train"][1]).tolist() == [3, 3, 3, 2, 3, 3, 3, 3, 3, 3]
    assert sorted(Path(p).name for p in report["skipped_broken"]) == ["0001.png", "0002.jpg"]
    assert data.source_notes(report)[-1].startswith("skipped 2 broken images (--skip-bad): ")


def test_conversion_prints_its_notes_and_records_them_in_meta(tmp_path, capsys):
    source = untidy_folder(tmp_path / "src")
    (source / "test" / "cat" / "bad.png").write_bytes(b"")
    report = data.prepare(str(source), tmp_path / "d", skip_bad=True)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]  # not FFCV's bars
    assert len(notes) == 2 and "6 files that are not images" in notes[0] and "1 broken images" in notes[1]
    assert "wrote 12 train, 10 test images" in report
    meta = data.ensure_valid(tmp_path / "d")
    assert meta["source_report"]["skipped_broken"] == [str(source / "test" / "cat" / "bad.png")]


def test_check_accepts_valid_data_in_one_line(synthetic_data, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["data.py", "--check", "--data-dir", str(synthetic_data)])
    data.main()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "valid: 240 train and 100 test images of 10 classes" in out


def test_rebuild_without_source_converts_the_recorded_source_not_a_download(fresh_data, image_folder, monkeypatch):
    def no_download(raw_dir):
        raise AssertionError("downloaded although meta.json records a local source")
    monkeypatch.setattr(data, "download_official", no_download)
    (fresh_data / "test.beton").write_bytes(b"")
    assert "wrote" in data.prepare(None, fresh_data)
    assert data.ensure_valid(fresh_data)["requested_source"] == str(image_folder)


# --- workers against the CPUs this process may use (issue 12) ---------------------------------------

def test_default_workers_follow_the_cpu_affinity_not_the_machine(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    def default(local_ranks=1):
        return data.check_workers(None, local_ranks)[0]
    assert data.usable_cpus() == 1 and default() == 1 and default(4) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert data.usable_cpus() == 16
    assert default() == 8  # capped
    assert default(local_ranks=4) == 4 and default(local_ranks=32) == 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert data.usable_cpus() == 64


def test_check_workers_lowers_a_count_above_the_usable_cpus_and_says_why(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert data.check_workers(8) == (1, "--workers 8 is more than the 1 CPU this process may use "
                                        "(taskset/Slurm/cgroup): using 1")
    assert data.check_workers(None) == (1, None) and data.check_workers(1) == (1, None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert data.check_workers(2) == (2, None) and data.check_workers(None, local_ranks=2) == (2, None)
    assert data.check_workers(6)[1].startswith("--workers 6 is more than the 4 CPUs")


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_loader_on_one_allowed_cpu_runs_with_default_and_too_many_workers(synthetic_data):
    """Under Slurm --cpus-per-task=1 or taskset -c 0, numba allows one thread: before, every run died
    with "The number of threads must be between 1 and 1"."""
    code = ("import sys, data\n"
            "for workers in (None, 8):\n"
            "    loader = data.make_loader('train', 8, 'cpu', aug='none', workers=workers, data_dir=sys.argv[1])\n"
            "    images, _ = next(iter(loader))\n"
            "    print(workers, loader.loader.num_workers, tuple(images.shape))\n")
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code, str(synthetic_data)],
                            capture_output=True, text=True, env=run_env(), timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["None 1 (8, 3, 32, 32)", "8 1 (8, 3, 32, 32)"]
    assert "note: --workers 8 is more than the 1 CPU this process may use" in result.stderr
