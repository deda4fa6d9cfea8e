"""CIFAR-10 -> FFCV .beton files -> normalised batches on the training device.

    python data.py                                  # download the official archive, convert
    python data.py --source cifar-10-python.tar.gz  # or a local copy (offline machines)
    python data.py --source ../shared/data/cifar10-jpeg.tar.gz   # or an image-folder tree / its .tar.gz
    python data.py --check                          # is the data dir what training will accept?

Conversion writes DIR/train.beton, DIR/test.beton and DIR/meta.json (classes, counts, mean/std of
the train split, source, sizes and sha256 of the betons, what was skipped). It is idempotent and
atomic: the whole source is read and checked before anything is written, every file is written under
a temporary name and all are renamed once all are complete, meta.json last (so a rebuild that fails
leaves the previous data valid), and a beton that does not match meta.json is rebuilt (from the source
meta.json records, unless --source is given).

Image-folder sources (train/<class>/<image>, test/<class>/<image>, or a .tar.gz of them; the class is
the folder's name, classes in sorted order):
- skipped, counted in one line: hidden files and folders (.DS_Store, ._x.png) and files whose
  extension is not an image's (.png .jpg .jpeg .bmp .gif .webp .tif .tiff, any case): README.txt,
  Thumbs.db. The content decides the format: a PNG named .jpg is read as the PNG it is.
- converted to RGB, counted in one line: 8-bit grayscale, RGBA, palette and other 8-bit modes.
- refused, naming the file or folder: an image that cannot be read or decoded (truncated, empty,
  not an image; --skip-bad skips and lists those instead), an image that is not 32×32 (resizing would
  change the task), a 16-bit or float image, an image directly in train/ or test/, a folder inside
  a class folder, a class folder with no images, a class folder in only one of train/ and test/.

Training accepts only data whose parts agree (ensure_valid, or `data.py --check`): meta.json is a
JSON object of this version with every key in its form, the betons' sizes and sha256 match it, and
their headers match it too (images per split and class, labels within the classes, 32×32 images).
Anything else is refused in one line naming the fix: `python data.py --data-dir DIR --force`.

`make_loader(split, batch_size, device, ...)` is the one way training gets data: FFCV decodes and
does the cheap flip/translate in its compiled CPU pipeline; the transfer, dtype conversion,
normalisation and heavier augmentations run on `device` as batched tensor ops.
"""
from __future__ import annotations

import argparse
import ctypes
import gzip
import hashlib
import io
import functools
import itertools
import json
import math
import mmap
import multiprocessing
import os
import pickle
import queue
import sys
import tarfile
import tempfile
import time
import types
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch, torchvision and FFCV take ~9 s to import together, and the "already converted" check must
# answer in under a second, so the functions that need them import them (see import_ffcv).
if TYPE_CHECKING:
    import torch

DATA_DIR = "data"
SPLITS = ("train", "test")
META_VERSION = 1
# Test images whose predictions every run keeps, and predictions.png shows: a fixed class-balanced
# sample, saved at conversion (images, indices, labels) so that figures never need the betons.
PREVIEW_COUNT = 64
PREVIEW_FILE = "preview.npz"
# Augmentations a run can ask for. flip and translate run in FFCV's CPU pipeline; the rest are
# batched tensor ops on the training device.
AUGMENTATIONS = ("flip", "translate", "cutout", "rotate", "affine", "jitter", "vflip")
DEFAULT_AUG = "flip,translate"
MAX_WORKERS = 8  # FFCV loader threads per process by default
TRANSLATE_PX = 4
CUTOUT_PX = 8
ROTATE_DEG = 15.0
SHEAR_DEG, SCALE_RANGE = 10.0, (0.9, 1.1)
JITTER = 0.2  # brightness, contrast and saturation each drawn from [1 - JITTER, 1 + JITTER]
# Image-folder sources: the files taken for images, and the modes whose conversion to RGB is exact.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
TORCH_THREADS: int | None = None  # torch's thread count before FFCV changed it
SOURCE_KINDS = ("cifar-10-python.tar.gz, cifar-10-batches-py/, or an image-folder tree (train/<class>/*, "
                "test/<class>/*) or its .tar.gz")
MISSING_DATA_HINT = "run 'make data' (or 'python data.py --source PATH' offline) or pass --data-dir"


class DataError(Exception):
    """Bad or missing data: main() prints its message as a one-line error."""


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (taskset, Slurm, a container's cpuset), which
    numba, and so FFCV, holds its thread count to; os.cpu_count() counts the whole machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call (macOS, Windows): the machine is all there is
        return os.cpu_count() or 1


def default_workers(local_ranks: int = 1) -> int:
    """FFCV workers per process: the usable CPUs shared among this node's ranks, at most MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, usable_cpus() // max(1, local_ranks)))


def check_workers(requested: int | None, local_ranks: int = 1) -> tuple[int, str | None]:
    """The workers to use for a requested count (None: the default) and, when it had to be lowered,
    one line saying so and why. More threads than the affinity allows make numba refuse ("The number
    of threads must be between 1 and N") when the loader starts."""
    if requested is None:
        return default_workers(local_ranks), None
    if requested < 1:
        raise ValueError(f"--workers must be at least 1, got {requested}")
    cpus = usable_cpus()
    if requested > cpus:
        return cpus, (f"--workers {requested} is more than the {cpus} CPU{'s' * (cpus > 1)} this process may use "
                      f"(taskset/Slurm/cgroup): using {cpus}")
    return requested, None



def import_ffcv() -> None:
    """Import FFCV once, keeping torch's thread count.

    FFCV sets torch's thread count to 1 on import and to its worker count on every epoch; remember
    the count a training step should have, and restore it wherever FFCV changes it."""
    global TORCH_THREADS
    import numba.typed
    import torch
    if TORCH_THREADS is None:
        TORCH_THREADS = torch.get_num_threads()
    # FFCV 1.0.2's rgb_image module builds a numba typed Dict at import (IMAGE_MODES: "jpg" -> 0, "raw" -> 1)
    # that only Python code reads. Building it compiles numba's typed-dict code: 6.7 of the 9 s every
    # process spent importing FFCV here. A plain dict holds the same two entries.
    typed_dict, numba.typed.Dict = numba.typed.Dict, dict
    try:
        import ffcv.loader  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict
    torch.set_num_threads(TORCH_THREADS)
    run_loader_thread_on_its_device()


def run_loader_thread_on_its_device() -> None:
    """Make FFCV's loader thread work on the run's GPU, not GPU 0.

    FFCV 1.0.2 makes its CUDA streams on the current device (the rank's, cuda:N) in the main thread,
    then enters them in a new thread, which starts on device 0: leaving torch.cuda.stream() there
    restores cuda:0's stream, i.e. calls cudaSetDevice(0), and every rank but 0 makes a CUDA context
    on GPU 0 (memory on GPU 0 per rank; a hang under exclusive-process mode). So the thread first
    sets the device its streams were made on."""
    import torch
    from ffcv.loader.epoch_iterator import EpochIterator
    if getattr(EpochIterator.run, "sets_stream_device", False):
        return
    ffcv_run = EpochIterator.run

    def run(self):
        streams = [s for s in getattr(self, "cuda_streams", None) or [] if s is not None]
        if streams:
            torch.cuda.set_device(streams[0].device)
        return ffcv_run(self)

    run.sets_stream_device, run.ffcv_run = True, ffcv_run
    EpochIterator.run = run


def cifar10_release():
    """torchvision's record of the official release: url, file names and md5 checksums."""
    from torchvision.datasets import CIFAR10
    return CIFAR10


# ---------------------------------------------------------------------------------------------
# Sources: each reader returns {split: (images uint8 N×32×32×3, labels int64 N)} and class names.
# ---------------------------------------------------------------------------------------------

def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)  # hashlib.file_digest is Python 3.11's: read in 1 MiB blocks
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def md5_of(path: Path) -> str:
    return file_digest(path, "md5")


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")


def download_official(raw_dir: Path) -> Path:
    """Fetch the official archive with torchvision's downloader, which checks its md5."""
    from torchvision.datasets.utils import download_url
    CIFAR10 = cifar10_release()
    archive = raw_dir / CIFAR10.filename
    if archive.exists() and md5_of(archive) == CIFAR10.tgz_md5:
        return archive
    try:
        download_url(CIFAR10.url, str(raw_dir), CIFAR10.filename, CIFAR10.tgz_md5)
    except Exception as error:  # URLError, timeouts, md5 mismatch: all mean "no usable download"
        raise DataError(f"could not download CIFAR-10 ({type(error).__name__}: {error}); "
                        "on an offline machine pass --source PATH (make data SOURCE=PATH) to "
                        "cifar-10-python.tar.gz, cifar-10-batches-py/ or an image-folder tree") from None
    return archive


def read_official_batches(folder: Path) -> tuple[dict, list[str]]:
    """Read the official pickles, after checking each file against the release's md5.

    Pickles can run code when loaded, so a file whose checksum differs is never unpickled."""
    CIFAR10 = cifar10_release()
    expected = dict(CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]])
    for name, md5 in expected.items():
        path = folder / name
        if not path.exists():
            raise DataError(f"{path} is missing: pass the complete cifar-10-batches-py/ folder or archive")
        if md5_of(path) != md5:
            raise DataError(f"{path} does not match the official CIFAR-10 checksum; refusing to unpickle it "
                            "(pickles can run code): download the official archive again")

    def load(name: str) -> dict:
        with open(folder / name, "rb") as f:
            return pickle.load(f, encoding="latin1")

    classes = load(CIFAR10.meta["filename"])["label_names"]
    splits = {}
    for split, files in (("train", CIFAR10.train_list), ("test", CIFAR10.test_list)):
        batches = [load(name) for name, _ in files]
        images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.concatenate([b["labels"] for b in batches]).astype(np.int64)
        splits[split] = (np.ascontiguousarray(images), labels)
    return splits, classes


class BrokenImage(DataError):
    """An image file that cannot be decoded: --skip-bad skips these, nothing else."""


def decode_image(content: bytes | Path, where: str) -> tuple[np.ndarray, str]:
    """A 32×32 RGB uint8 array and the file's own mode (converted from when it is not RGB)."""
    import warnings

    from PIL import Image, UnidentifiedImageError
    try:
        data = content.read_bytes() if isinstance(content, Path) else content
        with warnings.catch_warnings():  # PIL warns about palette transparency, which RGB drops anyway
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            image.load()  # open() reads the header only: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = ("not an image PIL can read" if isinstance(error, UnidentifiedImageError)
                  else error.strerror if isinstance(error, OSError) and error.strerror else str(error))
        raise BrokenImage(f"{where} cannot be read as an image ({reason}): replace or delete it, "
                          "or pass --skip-bad to skip broken images") from None
    if image.size != (32, 32):
        raise DataError(f"{where} is {image.width}×{image.height}, not 32×32: CIFAR-10 images are 32×32; "
                        "resize the folder yourself (data.py does not: resizing changes the task)")
    if image.mode not in EIGHT_BIT_MODES:
        raise DataError(f"{where} has mode {image.mode} (more than 8 bits per channel): save it as 8-bit RGB "
                        "(converting here would clip its values)")
    return np.asarray(image.convert("RGB")), image.mode


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def image_folder_files(entries: list[tuple[tuple[str, ...], str, bytes | Path | None]]
                       ) -> tuple[list[tuple[str, str, str, bytes | Path]], list[str]]:
    """Apply the image-folder rules (see the module docstring) to every file and folder of the tree.

    entries: (parts from the split folder on, where, content: bytes, a Path, or None for a folder).
    Returns (split, class, where, content) per image, and the files skipped as not images; raises
    DataError on a layout only the user can mend."""
    images, skipped = [], []
    class_folders: dict[str, dict[str, str]] = {split: {} for split in SPLITS}  # split -> class -> where
    for parts, where, content in entries:
        if len(parts) < 2:
            continue  # the split folder itself
        split, is_folder = parts[0], content is None
        if any(part.startswith(".") for part in parts):  # .DS_Store, ._x.png, .ipynb_checkpoints/
            skipped += [] if is_folder else [where]
        elif len(parts) == 2 and is_folder:
            class_folders[split].setdefault(parts[1], where)
        elif len(parts) == 2:
            if is_image_name(where):
                raise DataError(f"{where} is not in a class folder: move it into {split}/<class>/ "
                                "(the folder's name is the label)")
            skipped.append(where)
        elif len(parts) == 3 and not is_folder:
            class_folders[split].setdefault(parts[1], where.rsplit("/", 1)[0])
            if is_image_name(where):
                images.append((split, parts[1], where, content))
            else:
                skipped.append(where)
        else:
            nested = where.rsplit("/", len(parts) - 3)[0]
            raise DataError(f"{nested} is a folder inside the class folder {split}/{parts[1]}: the layout is "
                            f"{split}/<class>/<image>, one level; move its images into {split}/{parts[1]}/ "
                            "or out of the tree")
    for split in SPLITS:
        if not class_folders[split]:
            raise DataError(f"the image folder has no {split}/<class>/ folders: it needs train/<class>/* "
                            "and test/<class>/* images")
    for split, other in (("train", "test"), ("test", "train")):
        for cls, where in class_folders[split].items():
            if cls not in class_folders[other]:
                raise DataError(f"{where} has no matching {other}/{cls}: train/ and test/ need the same class "
                                "folders; rename or remove it")
    with_images = {(split, cls) for split, cls, _, _ in images}
    for split in SPLITS:
        for cls, where in class_folders[split].items():
            if (split, cls) not in with_images:
                raise DataError(f"{where} holds no images: add its images or remove the folder")
    return images, skipped


def collect_image_folder(entries: list, skip_bad: bool = False) -> tuple[dict, list[str], dict]:
    """Decode an image folder's tree; class order is sorted names, as torchvision's ImageFolder.

    Returns the splits, the classes and a report of what was skipped or converted, for meta.json."""
    from tqdm import tqdm
    files, not_images = image_folder_files(entries)
    classes = sorted({cls for split, cls, _, _ in files if split == "train"})
    splits, broken, converted = {}, [], {}
    for split in SPLITS:
        chosen = sorted((f for f in files if f[0] == split), key=lambda f: (f[1], f[2]))
        images = np.empty((len(chosen), 32, 32, 3), np.uint8)
        labels = np.empty(len(chosen), np.int64)
        kept = 0
        for _, cls, where, content in tqdm(chosen, desc=f"decode {split}", unit="img", disable=len(chosen) < 2000):
            try:
                images[kept], mode = decode_image(content, where)
            except BrokenImage:
                if not skip_bad:
                    raise
                broken.append(where)
                continue
            if mode != "RGB":
                converted[mode] = converted.get(mode, 0) + 1
            labels[kept] = classes.index(cls)
            kept += 1
        splits[split] = (images[:kept], labels[:kept])
        emptied = [cls for i, cls in enumerate(classes) if not (labels[:kept] == i).any()]
        if emptied:
            raise DataError(f"every image of {split}/{emptied[0]} is broken (skipped by --skip-bad): "
                            "replace them, or remove the class from train/ and test/")
    return splits, classes, {"skipped_not_images": not_images, "skipped_broken": broken,
                             "converted_to_rgb": converted}


def source_notes(report: dict) -> list[str]:
    """One line for each kind of thing the conversion skipped or changed."""
    def some(paths: list[str]) -> str:
        return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more (all in meta.json)" if len(paths) > 3 else "")
    notes = []
    if report.get("skipped_not_images"):
        paths = report["skipped_not_images"]
        notes.append(f"skipped {len(paths)} files that are not images (hidden, or not "
                     f"{'/'.join(sorted(IMAGE_EXTENSIONS))}): {some(paths)}")
    if report.get("skipped_broken"):
        paths = report["skipped_broken"]
        notes.append(f"skipped {len(paths)} broken images (--skip-bad): {some(paths)}")
    if report.get("converted_to_rgb"):
        modes = report["converted_to_rgb"]
        notes.append(f"converted {sum(modes.values())} images to RGB (" +
                     ", ".join(f"{n} {mode}" for mode, n in sorted(modes.items())) + ")")
    return notes


def image_files_in_tree(root: Path) -> list:
    """Every file and folder under root/train and root/test, as image_folder_files takes them."""
    return [(path.relative_to(root).parts, str(path), None if path.is_dir() else path)
            for split in SPLITS for path in sorted((root / split).rglob("*"))]


def image_files_in_tar(archive: Path) -> list:
    """Members under [prefix/]train/ and [prefix/]test/, as image_folder_files takes them."""
    entries = []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            at = next((i for i, part in enumerate(parts) if part in SPLITS), None)
            if at is None or not (member.isfile() or member.isdir()):
                continue
            content = tar.extractfile(member).read() if member.isfile() else None
            entries.append((parts[at:], f"{archive}:{member.name.rstrip('/')}", content))
    return entries


def read_source(source: str | None, data_dir: Path, skip_bad: bool = False) -> tuple[dict, list[str], str, dict]:
    """Dispatch on what the source is: splits, classes, a description and a report for meta.json."""
    if source is None:
        source = str(download_official(data_dir / "raw"))
    path = Path(source)
    try:
        return read_source_at(path, data_dir, skip_bad)
    except PermissionError as error:
        raise DataError(f"cannot read {error.filename}: permission denied: fix its permissions") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{path} is damaged ({error}): download or pack it again") from None


def read_source_at(path: Path, data_dir: Path, skip_bad: bool) -> tuple[dict, list[str], str, dict]:
    if not path.exists():
        raise DataError(f"source {path} not found: pass --source PATH to {SOURCE_KINDS}")
    if path.is_dir():
        for folder in (path, path / "cifar-10-batches-py"):
            if (folder / "data_batch_1").exists():
                return (*read_official_batches(folder), str(path), {})
        if (path / "train").is_dir() and (path / "test").is_dir():
            splits, classes, report = collect_image_folder(image_files_in_tree(path), skip_bad)
            return splits, classes, str(path), report
        raise DataError(f"{path} holds neither cifar-10-batches-py/ nor train/ and test/ folders: "
                        f"pass --source PATH to {SOURCE_KINDS}")
    if not tarfile.is_tarfile(path):
        raise DataError(f"{path} is not a folder or a .tar.gz archive: pass --source PATH to {SOURCE_KINDS}")
    with tarfile.open(path) as tar:
        names = tar.getnames()
    if any(Path(n).name == "data_batch_1" for n in names):
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")
            folder = next(Path(tmp).rglob("data_batch_1")).parent
            return (*read_official_batches(folder), f"{path} (md5 {md5_of(path)})", {})
    splits, classes, report = collect_image_folder(image_files_in_tar(path), skip_bad)
    return splits, classes, f"{path} (sha256 {sha256_of(path)})", report


# ---------------------------------------------------------------------------------------------
# Conversion: arrays -> betons + meta.json, atomically.
# ---------------------------------------------------------------------------------------------

def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 HWC images, in [0, 1] units (float64, exact)."""
    pixels = images.reshape(-1, 3)
    mean = pixels.mean(axis=0, dtype=np.float64) / 255
    sq = np.einsum("ij,ij->j", pixels.astype(np.float64), pixels) / len(pixels) / 255**2
    return mean.tolist(), np.sqrt(sq - mean**2).tolist()


class ArrayDataset:
    """The indexed-dataset interface FFCV's writer reads: (image HWC uint8, label int)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def temporary_name(path: Path) -> Path:
    """Where a new `path` is written before it is renamed over the old one: beside it, so that the
    rename is atomic, hidden, and named for this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: a reader sees the old file or the
    new one, never half of one, and a failed write (a kill, a full disk) leaves the old one whole."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, workers: int) -> None:
    """A beton at `path` itself: convert() gives it a temporary name."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    fields = {"image": RGBImageField(write_mode="raw", max_resolution=32), "label": IntField()}
    beton_writer(path, fields, workers).from_indexed_dataset(ArrayDataset(images, labels))


def beton_writer(path: Path, fields: dict, workers: int):
    """FFCV's DatasetWriter, made to fail in one piece when a write fails (a full disk, a quota).

    FFCV 1.0.2's own, on a failed write: a worker prints a traceback and the main process waits for
    its samples forever; a failure in the main process leaks the metadata's shared-memory block (the
    resource tracker warns at exit); and one while sizing that block (ftruncate counts against a
    file-size limit) has the tracker print a KeyError traceback, as Python 3.11's SharedMemory then
    unregisters a name it never registered. Here the metadata lives in an anonymous shared mapping
    that the forked workers inherit (no name: nothing to leak or track), and a worker hands its
    OSError to the main process, which stops the other workers and raises it."""
    import ffcv.writer as ffcv_writer
    from ffcv.memory_allocator import MemoryAllocator

    class BetonWriter(ffcv_writer.DatasetWriter):
        def prepare(self):
            # FFCV's prepare() makes the block with shared_memory.SharedMemory(create=True, size=...)
            named = ffcv_writer.shared_memory
            ffcv_writer.shared_memory = types.SimpleNamespace(SharedMemory=anonymous_block)
            try:
                super().prepare()
            finally:
                ffcv_writer.shared_memory = named

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            fork = multiprocessing.get_context("fork")  # so that the workers inherit the anonymous block
            todo, results, done = fork.Queue(), fork.Queue(), fork.Value(ctypes.c_uint64, 0)
            for chunk in queue_content:
                todo.put(chunk)
            for _ in range(self.num_workers):
                todo.put(None)  # one stop for each worker
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (todo, self.metadata_sm, self.metadata_type, self.fields, allocator, done, results,
                    *extra_worker_args)
            workers = [fork.Process(target=report_failure, args=(work_fn, results, args))
                       for _ in range(self.num_workers)]
            try:
                for worker in workers:
                    worker.start()
                self.finalize(collect_allocations(results, workers, done, num_samples))
            finally:
                for worker in workers:
                    if worker.is_alive():  # after another's failure: writing, or waiting for its page
                        worker.terminate()
                    worker.join()
                todo.cancel_join_thread()  # what stopped workers left unread need not reach them
                self.metadata_sm.buf.close()

    return BetonWriter(str(path), fields, num_workers=workers)


def anonymous_block(create: bool, size: int) -> types.SimpleNamespace:
    """A stand-in for SharedMemory(create=True, size=size): mmap(-1) is shared and anonymous."""
    return types.SimpleNamespace(buf=mmap.mmap(-1, size))


def report_failure(work_fn, results, args) -> None:
    """Run one of FFCV's writer workers; a failed write goes to the main process, not to stderr."""
    try:
        work_fn(*args)
    except OSError as error:
        results.put(error)


def collect_allocations(results, workers: list, done, total: int) -> list:
    """Every worker's allocations, with a progress bar; raises a worker's OSError as soon as it comes,
    and stops if a worker ends without a result (killed), where FFCV 1.0.2 would wait forever."""
    from tqdm import tqdm
    allocations, finished = [], 0
    with tqdm(total=total) as progress:
        while finished < len(workers):
            progress.update(done.value - progress.n)
            try:
                result = results.get(timeout=0.1)
            except queue.Empty:
                ended = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if ended:
                    raise RuntimeError(f"an FFCV writer process ended with exit code {ended[0]}") from None
                continue
            if isinstance(result, OSError):
                raise result
            allocations.extend(result)
            finished += 1
        progress.update(done.value - progress.n)
    return allocations


def save_json_atomic(path: Path, payload: dict) -> None:
    """Strict JSON (no NaN or Infinity, which json.dumps writes by default): a non-finite number is null."""
    text = json.dumps(finite_or_null(payload), indent=1, allow_nan=False)
    write_atomically(Path(path), lambda tmp: tmp.write_text(text))


def finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def unreadable(error: PermissionError) -> DataError:
    return DataError(f"cannot read {error.filename} (permission denied): fix its permissions "
                     "or pass another --data-dir")


def rebuild_hint(data_dir: Path) -> str:
    return (f"rebuild with 'python data.py --data-dir {data_dir} --force' (add --source PATH offline) "
            "or 'make data'")


def data_dir_problem(data_dir: Path) -> str | None:
    """Why data_dir cannot be a data folder at all (a file, inside a file, unreadable), with the fix."""
    fix = "pass --data-dir a folder (data.py writes the betons there; the default is data/)"
    try:
        if data_dir.exists() and not data_dir.is_dir():
            return f"--data-dir {data_dir} is a file, not a folder: {fix}"
        if data_dir.is_dir():
            os.listdir(data_dir)
            return None
        blocking = next((p for p in data_dir.parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            return f"--data-dir {data_dir} lies inside {blocking}, which is a file: {fix}"
    except PermissionError:
        return f"--data-dir {data_dir} cannot be read (permission denied): fix its permissions or {fix}"
    return None


def read_meta(data_dir: Path) -> tuple[dict, list[str]]:
    """meta.json's content and what is wrong with it on its own; DataError naming the fix if it is missing."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"{data_dir} holds no converted CIFAR-10 ({path.name} missing): {MISSING_DATA_HINT}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}, [f"{path.name} is not valid JSON"]
    if not isinstance(meta, dict):
        return {}, [f"{path.name} holds a JSON {type(meta).__name__}, not an object"]
    return meta, meta_problems(meta)


def is_per_split(value, check) -> bool:
    return isinstance(value, dict) and all(split in value and check(value[split]) for split in SPLITS)


def is_three_numbers(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)


# What convert() writes and the loader reads, with the form of each value: a meta.json from another
# version or edited by hand is refused before a run trains on numbers it misreads.
META_FIELDS = {
    "classes": lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(c, str) for c in v),
    "counts": lambda v: is_per_split(v, lambda n: isinstance(n, int) and n > 0),
    "class_counts": lambda v: is_per_split(v, lambda c: isinstance(c, list) and all(isinstance(n, int) for n in c)),
    "mean": is_three_numbers,
    "std": is_three_numbers,
    "betons": lambda v: is_per_split(v, lambda b: isinstance(b, dict) and isinstance(b.get("bytes"), int)
                                     and isinstance(b.get("sha256"), str)),
}


def meta_problems(meta: dict) -> list[str]:
    """What is wrong with meta.json on its own: version, missing or malformed keys, counts that disagree."""
    if meta.get("version") != META_VERSION:
        return [f"meta.json is version {meta.get('version')}, this data.py reads version {META_VERSION}"]
    missing = [key for key in META_FIELDS if key not in meta]
    if missing:
        return [f"meta.json lacks {', '.join(missing)}"]
    malformed = [key for key, check in META_FIELDS.items() if not check(meta[key])]
    if malformed:
        return [f"meta.json's {', '.join(malformed)} {'is' if len(malformed) == 1 else 'are'} not in data.py's form"]
    return [f"meta.json's class_counts of {split} do not add up to its {len(meta['classes'])} classes and "
            f"{meta['counts'][split]} images" for split in SPLITS
            if len(meta["class_counts"][split]) != len(meta["classes"])
            or sum(meta["class_counts"][split]) != meta["counts"][split]]


def beton_problems(data_dir: Path, meta: dict, checksum: bool = True) -> list[str]:
    """What is wrong with the betons against meta.json; empty when they are complete and intact."""
    problems = []
    for split in SPLITS:
        path, expected = Path(data_dir) / f"{split}.beton", meta.get("betons", {}).get(split, {})
        if not path.exists():
            problems.append(f"{path.name} is missing")
        elif path.stat().st_size != expected.get("bytes"):
            problems.append(f"{path.name} has {path.stat().st_size} bytes, meta.json says {expected.get('bytes')}")
        elif checksum and sha256_of(path) != expected.get("sha256"):
            problems.append(f"{path.name} does not match its sha256 in meta.json (corrupted)")
    return problems


def beton_content_problems(data_dir: Path, meta: dict) -> list[str]:
    """What the betons' own headers say against meta.json: fields, images, labels per class, image sizes.

    Reads the header and the metadata table only (labels and image sizes live there), not the images."""
    import_ffcv()
    from ffcv.reader import Reader
    problems = []
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.beton"
        try:
            reader = Reader(str(path))
        except Exception as error:  # a header FFCV cannot parse raises anything from AssertionError to KeyError
            problems.append(f"{path.name} is not a beton FFCV can read ({type(error).__name__}: {error})")
            continue
        fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
        if fields != {"image": "RGBImageField", "label": "IntField"}:
            problems.append(f"{path.name} holds the fields {fields}, not an RGB image and an int label")
            continue
        n, expected = int(reader.num_samples), meta["counts"][split]
        labels, images = reader.metadata["f1"], reader.metadata["f0"]
        if n != expected:
            problems.append(f"{path.name} holds {n} images, meta.json says {expected}")
        elif n and not 0 <= labels.min() <= labels.max() < len(meta["classes"]):
            problems.append(f"{path.name}'s labels go from {labels.min()} to {labels.max()}, but meta.json names "
                            f"{len(meta['classes'])} classes (labels 0 to {len(meta['classes']) - 1})")
        elif np.bincount(labels, minlength=len(meta["classes"])).tolist() != meta["class_counts"][split]:
            problems.append(f"{path.name}'s images per class differ from meta.json's class_counts")
        sizes = set(zip(images["width"].tolist(), images["height"].tolist(), strict=True)) - {(32, 32)}
        if sizes:
            width, height = sorted(sizes)[0]
            problems.append(f"{path.name} holds {width}×{height} images, not 32×32")
    return problems


def source_to_rebuild(source: str | None, data_dir: Path) -> str | None:
    """The source to convert: the one given, else the one the data dir was made from (a rebuild from a
    local copy must not download), else None (download)."""
    if source is not None:
        return source
    try:
        meta, _ = read_meta(data_dir)
    except (DataError, OSError):
        return None
    return meta.get("requested_source") if isinstance(meta.get("requested_source"), str) else None


def convert(source: str | None, data_dir: Path, workers: int | None = None, skip_bad: bool = False) -> dict:
    """Read the source and write both betons and meta.json; meta.json goes last, as the seal.

    The whole source is read and checked before anything is written: a bad source leaves data_dir
    as it was (not even created)."""
    splits, classes, description, report = read_source(source, data_dir, skip_bad)
    mean, std = channel_stats(splits["train"][0])
    meta = {"version": META_VERSION, "classes": list(classes), "source": description,
            "requested_source": source, "mean": mean, "std": std, "betons": {},
            "counts": {s: len(splits[s][1]) for s in SPLITS},
            "class_counts": {s: np.bincount(splits[s][1], minlength=len(classes)).tolist() for s in SPLITS},
            "source_report": report, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # Every file is written under a temporary name, and only once all are complete renamed over the
    # old ones, meta.json last as the seal: a rebuild that fails (a full disk, a kill) leaves the old
    # data as valid as it was. Between two renames, old and new files disagree in their checksums.
    files = [data_dir / name for name in ("train.beton", "test.beton", PREVIEW_FILE, "meta.json")]
    staged = {path.name: temporary_name(path) for path in files}
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            tmp = staged[f"{split}.beton"]
            write_beton(tmp, *splits[split], workers or default_workers())
            meta["betons"][split] = {"bytes": tmp.stat().st_size, "sha256": sha256_of(tmp)}
        test_images, test_labels = splits["test"]
        write_preview(staged[PREVIEW_FILE], test_labels, lambda indices: test_images[indices])
        save_json_atomic(staged["meta.json"], meta)
        for path in files:
            os.replace(staged[path.name], path)
    except OSError as error:  # a full disk, a read-only folder
        raise DataError(f"could not write {error.filename or data_dir}: {error.strerror or error}: "
                        "free some space or pass another --data-dir") from None
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return meta


def prepare(source: str | None, data_dir: Path, force: bool = False, skip_bad: bool = False) -> str:
    """Convert unless valid files from the same source are there; returns a one-line report.

    Notes on what the conversion skipped or converted go to stderr, one line each."""
    problem = data_dir_problem(data_dir)
    if problem:
        raise DataError(problem)
    if (data_dir / "meta.json").exists() and not force:
        try:
            meta, problems = read_meta(data_dir)
            problems = problems or beton_problems(data_dir, meta)
        except PermissionError as error:
            raise unreadable(error) from None
        same_source = source is None or source == meta.get("requested_source")
        if not problems and same_source:
            return f"{data_dir}: train.beton and test.beton are valid ({meta['source']}); nothing to do"
        print(f"{data_dir}: rebuilding: {'; '.join(problems) or 'a different --source was given'}", file=sys.stderr)
    start = time.perf_counter()
    meta = convert(source_to_rebuild(source, data_dir), data_dir, skip_bad=skip_bad)
    for note in source_notes(meta["source_report"]):
        print(f"note: {note}", file=sys.stderr)
    counts = ", ".join(f"{meta['counts'][s]:,} {s}" for s in SPLITS)
    return f"{data_dir}: wrote {counts} images from {meta['source']} in {time.perf_counter() - start:.1f} s"


def ensure_valid(data_dir: str | Path) -> dict:
    """Refuse to train on data whose parts disagree: meta.json against itself, the betons' sizes and
    sha256 against meta.json, and their headers (images, labels, image size) against meta.json.
    Checked once per process and directory."""
    data_dir = Path(data_dir)
    key = str(data_dir.resolve())
    if key not in _VALIDATED:
        problem = data_dir_problem(data_dir)
        if problem:
            raise DataError(problem)
        try:
            meta, problems = read_meta(data_dir)
            problems = problems or beton_problems(data_dir, meta) or beton_content_problems(data_dir, meta)
        except PermissionError as error:
            raise unreadable(error) from None
        if problems:
            raise DataError(f"{data_dir}: {'; '.join(problems)}: {rebuild_hint(data_dir)}")
        _VALIDATED[key] = meta
    return _VALIDATED[key]


_VALIDATED: dict[str, dict] = {}


# ---------------------------------------------------------------------------------------------
# Splits and subsets of the train set.
# ---------------------------------------------------------------------------------------------

def beton_labels(path: Path) -> np.ndarray:
    """IntField values live in the beton's metadata table, so labels are read without decoding."""
    import_ffcv()
    from ffcv.reader import Reader
    return np.asarray(Reader(str(path)).metadata["f1"], dtype=np.int64)


def preview_indices(labels, count: int = PREVIEW_COUNT, seed: int = 0) -> list[int]:
    """A fixed, seeded, class-balanced sample of a split's images, the same for every run (so figures
    compare): one image of each class in turn. Image folders store the test set in class order, so
    the first images would all be of one class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    turns = itertools.zip_longest(*by_class)
    return [int(i) for i in itertools.chain.from_iterable(turns) if i is not None][:count]


def write_preview(path: Path, labels: np.ndarray, sample_images) -> None:
    """The preview of a test split as .npz: its indices (preview_indices of the split's labels), their
    labels, and `sample_images(indices)`, those images (uint8, N×32×32×3)."""
    indices = np.asarray(preview_indices(labels), dtype=np.int64)
    arrays = {"indices": indices, "labels": np.asarray(labels)[indices], "images": sample_images(indices)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary name
            np.savez_compressed(f, **arrays)
    write_atomically(path, write)


def preview_path(data_dir: str | Path) -> Path:
    """DATA_DIR/preview.npz, written now from the test beton if the data was converted before previews were."""
    path = Path(data_dir) / PREVIEW_FILE
    if not path.exists():
        labels = beton_labels(Path(data_dir) / "test.beton")
        write_preview(path, labels, lambda indices: read_images(data_dir, "test", indices.tolist()))
    return path


def split_indices(labels: np.ndarray, fraction: float = 1.0, val_split: float = 0.0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced, seeded (train, val) indices into the train set.

    Per class: a seeded permutation; its first `val_split` part is the validation set, and the
    first `fraction` of the rest is the training subset. So the val set does not depend on the
    fraction, and smaller fractions are subsets of larger ones."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not 0 <= val_split < 1:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(val_split * len(members))
        rest = members[n_val:]
        val.append(members[:n_val])
        train.append(rest[:max(1, round(fraction * len(rest)))])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ---------------------------------------------------------------------------------------------
# Augmentations on the device: batched tensor ops, seeded per epoch.
# ---------------------------------------------------------------------------------------------

def parse_aug(aug: str) -> tuple[str, ...]:
    names = () if aug in ("", "none") else tuple(a.strip() for a in aug.split(","))
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}: choose from none, {', '.join(AUGMENTATIONS)}")
    return names


def color_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation on images in [0, 1], one factor each per image."""
    import torch
    n = x.shape[0]
    factor = lambda: torch.empty(n, 1, 1, 1, device=x.device).uniform_(1 - JITTER, 1 + JITTER, generator=g)  # noqa: E731
    luma = luma_weights(x.device)
    x = x * factor()
    gray = (x * luma).sum(1, keepdim=True)
    x = (x - gray.mean((2, 3), keepdim=True)) * factor() + gray.mean((2, 3), keepdim=True)
    gray = (x * luma).sum(1, keepdim=True)
    x = (x - gray) * factor() + gray
    return x.clamp(0, 1)


@functools.cache
def luma_weights(device: torch.device) -> torch.Tensor:
    """ITU-R 601 luma weights, made once per device: a tensor built from a Python list in every step
    is a blocking host-to-device copy on CUDA."""
    return channel_tensor([0.299, 0.587, 0.114], device)


def random_affine(x: torch.Tensor, g: torch.Generator, rotate_deg: float, shear_deg: float,
                  scale_range: tuple[float, float]) -> torch.Tensor:
    """Rotation, shear and scale about the centre; uncovered pixels become 0 (the mean, once normalised)."""
    import torch
    n = x.shape[0]
    uniform = lambda lo, hi: torch.empty(n, device=x.device).uniform_(lo, hi, generator=g)  # noqa: E731
    angle = torch.deg2rad(uniform(-rotate_deg, rotate_deg))
    shear = torch.deg2rad(uniform(-shear_deg, shear_deg))
    scale = uniform(*scale_range)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin + torch.tan(shear) * cos, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos + torch.tan(shear) * sin, torch.zeros_like(cos)], 1)], 1)
    theta[:, :, :2] /= scale.view(n, 1, 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """Zero one size×size square per image (centre anywhere in the image, as DeVries & Taylor)."""
    import torch
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device, generator=g)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device, generator=g)
    ys, xs = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return x * (~inside).unsqueeze(1)


def channel_tensor(values: list[float], device: "torch.device") -> "torch.Tensor":
    import torch
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(images/255 - mean) / std as a new float batch in channels-last layout.

    Channels-last memory is NHWC, so a per-channel broadcast runs over an inner dimension of 3,
    which CPU kernels do ~5x slower than a broadcast over a whole row: view each image as one
    H*W*C row and broadcast a row of means and scales instead (0.8 ms against 4 ms per batch of 512)."""
    import torch
    n, c, h, w = images.shape
    nhwc = images.permute(0, 2, 3, 1).contiguous()  # a view when the batch is channels-last already
    shift, scale = (mean * 255).view(c).repeat(h * w), (1 / (std * 255)).view(c).repeat(h * w)
    rows = nhwc.reshape(n, h * w * c).to(torch.float32, copy=True).sub_(shift).mul_(scale)
    return rows.view(n, h, w, c).permute(0, 3, 1, 2)


def device_transform(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, augs: tuple[str, ...],
                     g: torch.Generator | None) -> torch.Tensor:
    """uint8 NCHW (channels-last) -> normalised float, with the device-side augmentations.

    mean and std are in [0, 1] units, shaped 1×3×1×1."""
    import torch
    x = images
    if "jitter" in augs:
        x = color_jitter(x.float().div_(255), g).mul_(255)
    x = normalise(x, mean, std)
    if "rotate" in augs or "affine" in augs:
        rotate = ROTATE_DEG if "rotate" in augs else 0.0
        shear, scale = (SHEAR_DEG, SCALE_RANGE) if "affine" in augs else (0.0, (1.0, 1.0))
        x = random_affine(x, g, rotate, shear, scale)
    if "vflip" in augs:
        flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=g) < 0.5
        x = torch.where(flip, x.flip(2), x)
    if "cutout" in augs:
        x = cutout(x, g, CUTOUT_PX)
    return x.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# The loader.
# ---------------------------------------------------------------------------------------------

def register_sharded_order() -> str:
    """Register with FFCV a traversal order that gives the same global order however many processes
    share it, and return its key for Loader(order=...).

    FFCV's RANDOM order permutes with numpy alone but with torch's DistributedSampler under
    distributed=True, so a 2-process run would see other batches than a 1-process run. This order
    is DistributedSampler's for any world size (1 included): rank r takes every world-th image of
    one seeded permutation, so the union of the ranks' first batches is the 1-process first batch."""
    import torch
    from ffcv.loader import loader as ffcv_loader
    from ffcv.traversal_order.base import TraversalOrder
    from torch.utils.data import DistributedSampler

    class ShardedRandom(TraversalOrder):
        def __init__(self, loader):
            super().__init__(loader)
            world, rank = ((torch.distributed.get_world_size(), torch.distributed.get_rank())
                           if self.distributed else (1, 0))
            self.sampler = DistributedSampler(self.indices, num_replicas=world, rank=rank, shuffle=True,
                                              seed=self.seed, drop_last=False)

        def sample_order(self, epoch: int):
            self.sampler.set_epoch(epoch)
            return self.indices[np.array(list(self.sampler))]

    # FFCV 1.0.2 takes a custom order only through this table (its isinstance branch cannot work).
    ffcv_loader.ORDER_MAP.setdefault("sharded_random", ShardedRandom)
    return "sharded_random"


class DeviceLoader:
    """Iterates (images, labels) on the device; `epoch` picks the order (set it when resuming)."""

    def __init__(self, loader, num_samples: int, augs: tuple[str, ...], mean: torch.Tensor,
                 std: torch.Tensor, device: torch.device, seed: int, real_samples: int):
        self.loader, self.num_samples, self.augs = loader, num_samples, augs
        self.mean, self.std, self.device, self.seed = mean, std, device, seed
        self.real_samples = real_samples  # this rank's samples before the distributed sampler's padding
        self.epoch = 0
        self.decode_first = device.type == "cpu"  # see __iter__

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        import torch
        self.loader.next_epoch = self.epoch
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 100_003 + self.epoch)
        threads = torch.get_num_threads()
        epoch = iter(self.loader)
        torch.set_num_threads(threads)  # FFCV's __iter__ just set it to its worker count
        self.epoch += 1
        try:
            batches = epoch
            if self.decode_first:
                # On a CPU, FFCV's threads and the training step share the cores, and side by side they
                # slow each other down (torch's OpenMP threads spin between ops): a resnet20 epoch took
                # 1.37x as long as from memory on 2 cores. So decode the whole epoch in one burst first,
                # on every core (~1 s for CIFAR-10's 50,000 images, 150 MB), then train. FFCV reuses its
                # buffers, hence the copies. On a GPU the loader runs alongside, hidden behind the GPU.
                batches = [(images.clone(), labels.clone()) for images, labels in epoch]
            seen = 0
            for images, labels in batches:
                keep = min(len(labels), self.real_samples - seen)
                if keep <= 0:
                    break
                seen += keep
                # The slice drops the padding of FFCV's distributed sampler, which repeats images.
                # Labels are copied out of FFCV's reused buffer, so a caller may keep them.
                yield (device_transform(images[:keep], self.mean, self.std, self.augs, generator),
                       labels[:keep].to(torch.int64, copy=True))
        finally:
            # A consumer that leaves the epoch early (an interrupt, a divergence, a benchmark's cut)
            # would leave FFCV's loader thread spinning on its full queue with its buffers (FFCV #345).
            epoch.close()


def make_loader(split: str, batch_size: int, device: torch.device | str, aug: str = DEFAULT_AUG,
                fraction: float = 1.0, val_split: float = 0.0, seed: int = 0, workers: int | None = None,
                distributed: bool = False, data_dir: str | Path = DATA_DIR) -> DeviceLoader:
    """Batches of (images float NCHW channels-last normalised, labels int64), both on `device`.

    split: "train" (random order, drop_last, augmented), "val" (a seeded part of the train set held
    out) or "test" (sequential, every image once). With `distributed`, each rank gets its share;
    batch_size is then per rank. workers: FFCV's threads, None for default_workers(); more than this
    process may use are lowered to that, with a note on stderr."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}: choose train, val or test")
    import torch
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage
    device = torch.device(device)
    meta = ensure_valid(data_dir)
    workers, note = check_workers(workers)
    if note:
        print(f"note: {note}", file=sys.stderr)
    augs = parse_aug(aug) if split == "train" else ()
    path = Path(data_dir) / ("test.beton" if split == "test" else "train.beton")
    if split == "test":
        indices = np.arange(meta["counts"]["test"])
    else:
        train_idx, val_idx = split_indices(beton_labels(path), fraction, val_split, seed)
        indices = train_idx if split == "train" else val_idx
    if len(indices) == 0:
        raise ValueError(f"the {split} split is empty: raise --val-split")
    if split == "train" and batch_size > len(indices):
        raise ValueError(f"batch size {batch_size} is larger than the {len(indices)} training images: "
                         "lower --batch-size or raise --fraction")
    mean_255 = [255 * m for m in meta["mean"]]
    image_ops = [SimpleRGBImageDecoder()]
    if "flip" in augs:
        image_ops.append(RandomHorizontalFlip())
    if "translate" in augs:
        image_ops.append(RandomTranslate(padding=TRANSLATE_PX, fill=tuple(int(round(m)) for m in mean_255)))
    # A blocking copy, in FFCV's loader thread: FFCV reuses each pinned host buffer every batches_ahead + 2
    # batches, and a non-blocking copy is only queued on the GPU (behind the training steps it waits for);
    # nothing would then stop the thread from writing a later batch into the buffer before the GPU read
    # it (FFCV issues 37, 198). Blocking, the thread waits for the copy; the training loop does not.
    image_ops += [ToTensor(), ToDevice(device, non_blocking=False), ToTorchImage(channels_last=True)]
    label_ops = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=False), Squeeze(1)]
    loader = Loader(str(path), batch_size=batch_size, num_workers=workers,
                    order=register_sharded_order() if split == "train" else OrderOption.SEQUENTIAL,
                    distributed=distributed, seed=seed, indices=indices, drop_last=split == "train",
                    os_cache=True,  # CIFAR fits the page cache: 48k img/s here against 37k with FFCV's own
                    pipelines={"image": image_ops, "label": label_ops})
    torch.set_num_threads(TORCH_THREADS)
    real = len(indices)
    if distributed and split != "train":
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        real = len(range(rank, len(indices), world))
    return DeviceLoader(loader, len(indices), augs, channel_tensor(meta["mean"], device),
                        channel_tensor(meta["std"], device), device, seed, real)


def read_images(data_dir: str | Path, split: str, indices: list[int]) -> np.ndarray:
    """The raw uint8 images (N×32×32×3) at `indices` of a split's beton, for figures."""
    import torch
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    order = np.argsort(indices)
    loader = Loader(str(Path(data_dir) / f"{split}.beton"), batch_size=len(indices), num_workers=1,
                    order=OrderOption.SEQUENTIAL, indices=np.asarray(indices)[order], drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    torch.set_num_threads(TORCH_THREADS)
    images = np.concatenate([np.array(batch[0]) for batch in loader])
    torch.set_num_threads(TORCH_THREADS)
    return images[np.argsort(order)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default=None,
                        help="cifar-10-python.tar.gz, cifar-10-batches-py/, or an image-folder tree or its "
                             ".tar.gz; default: download the official archive")
    parser.add_argument("--data-dir", default=DATA_DIR, type=Path, help="where the betons and meta.json go")
    parser.add_argument("--force", action="store_true",
                        help="convert again even if valid files are there (from the recorded source unless --source)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip images that cannot be decoded (listed in meta.json) instead of stopping")
    parser.add_argument("--check", action="store_true",
                        help="check the data dir as training does (meta.json, betons, their headers) and exit")
    parser.add_argument("--bench", action="store_true", help=argparse.SUPPRESS)  # moved to bench.py
    args = parser.parse_args()
    if args.bench:
        parser.error("the loader benchmark moved: run 'python bench.py --loader-only'")
    try:
        if args.check:
            meta = ensure_valid(args.data_dir)
            print(f"{args.data_dir}: valid: {meta['counts']['train']:,} train and {meta['counts']['test']:,} test "
                  f"images of {len(meta['classes'])} classes ({meta['source']})")
        else:
            print(prepare(args.source, args.data_dir, args.force, args.skip_bad))
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
