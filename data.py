"""CIFAR-10 -> FFCV .beton files -> normalised batches on the training device.

    python data.py                                  # download the official archive, convert
    python data.py --source cifar-10-python.tar.gz  # or a local copy (offline machines)
    python data.py --source ../shared/data/cifar10-jpeg.tar.gz   # or an image-folder tree / its .tar.gz
    python data.py --bench                          # our loader vs the torchvision DataLoader way

Conversion writes DIR/train.beton, DIR/test.beton and DIR/meta.json (classes, counts, mean/std of
the train split, source, sizes and sha256 of the betons). It is idempotent and atomic: files are
written under a temporary name and renamed, and a beton that does not match meta.json is rebuilt.

`make_loader(split, batch_size, device, ...)` is the one way training gets data: FFCV decodes and
does the cheap flip/translate in its compiled CPU pipeline; the transfer, dtype conversion,
normalisation and heavier augmentations run on `device` as batched tensor ops.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import pickle
import platform
import statistics
import sys
import tarfile
import tempfile
import time
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
# Augmentations a run can ask for. flip and translate run in FFCV's CPU pipeline; the rest are
# batched tensor ops on the training device.
AUGMENTATIONS = ("flip", "translate", "cutout", "rotate", "affine", "jitter", "vflip")
DEFAULT_AUG = "flip,translate"
MAX_WORKERS = 8


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers(local_ranks: int = 1) -> int:
    return max(1, min(MAX_WORKERS, usable_cpus() // max(1, local_ranks)))


def check_workers(requested: int | None, local_ranks: int = 1) -> tuple[int, str | None]:
    if requested is None:
        return default_workers(local_ranks), None
    if requested > usable_cpus():
        return usable_cpus(), f"--workers {requested} is more than the {usable_cpus()} CPU(s) this process may use: using {usable_cpus()}"
    return requested, None


DEFAULT_WORKERS = default_workers()
TRANSLATE_PX = 4
CUTOUT_PX = 8
ROTATE_DEG = 15.0
SHEAR_DEG, SCALE_RANGE = 10.0, (0.9, 1.1)
JITTER = 0.2  # brightness, contrast and saturation each drawn from [1 - JITTER, 1 + JITTER]
TORCH_THREADS: int | None = None  # torch's thread count before FFCV changed it
BENCH_REPS = 3  # timed passes per loader in the benchmark; the median is reported
MISSING_DATA_HINT = "run 'make data' (or 'python data.py --source PATH' offline) or pass --data-dir"


class DataError(Exception):
    """Bad or missing data: main() prints its message as a one-line error."""


def import_ffcv() -> None:
    """Import FFCV once, keeping torch's thread count.

    FFCV sets torch's thread count to 1 on import and to its worker count on every epoch; remember
    the count a training step should have, and restore it wherever FFCV changes it."""
    global TORCH_THREADS
    import torch
    if TORCH_THREADS is None:
        TORCH_THREADS = torch.get_num_threads()
    import ffcv.loader  # noqa: F401
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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


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


def decode_image(data: bytes, where: str) -> np.ndarray:
    from PIL import Image
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if image.shape != (32, 32, 3):
        raise DataError(f"{where} is {image.shape[1]}×{image.shape[0]}, not 32×32: CIFAR-10 images are 32×32")
    return image


def collect_image_folder(files: list[tuple[str, str, str, bytes | Path]]) -> tuple[dict, list[str]]:
    """files: (split, class name, where, bytes or path). Class order is sorted names, as ImageFolder."""
    from tqdm import tqdm
    classes = sorted({cls for split, cls, _, _ in files if split == "train"})
    test_classes = sorted({cls for split, cls, _, _ in files if split == "test"})
    if not classes or not test_classes:
        raise DataError("the image folder needs train/<class>/* and test/<class>/* images")
    if test_classes != classes:
        raise DataError(f"train and test class folders differ: {classes} vs {test_classes}")
    splits = {}
    for split in SPLITS:
        chosen = sorted((f for f in files if f[0] == split), key=lambda f: (f[1], f[2]))
        images = np.empty((len(chosen), 32, 32, 3), np.uint8)
        labels = np.empty(len(chosen), np.int64)
        for i, (_, cls, where, content) in enumerate(tqdm(chosen, desc=f"decode {split}", unit="img",
                                                         disable=len(chosen) < 2000)):
            data = content.read_bytes() if isinstance(content, Path) else content
            images[i] = decode_image(data, where)
            labels[i] = classes.index(cls)
        splits[split] = (images, labels)
    return splits, classes


def image_files_in_tree(root: Path) -> list:
    return [(p.relative_to(root).parts[0], p.parent.name, str(p), p)
            for split in SPLITS for p in sorted((root / split).glob("*/*")) if p.is_file()]


def image_files_in_tar(archive: Path) -> list:
    """Members under [prefix/]train/<class>/<file> and [prefix/]test/<class>/<file>."""
    files = []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in SPLITS:
                continue
            files.append((parts[-3], parts[-2], f"{archive}:{member.name}", tar.extractfile(member).read()))
    return files


def read_source(source: str | None, data_dir: Path) -> tuple[dict, list[str], str]:
    """Dispatch on what the source is; returns splits, classes and a description for meta.json."""
    if source is None:
        source = str(download_official(data_dir / "raw"))
    path = Path(source)
    if not path.exists():
        raise DataError(f"source {source} not found: pass --source PATH to cifar-10-python.tar.gz, "
                        "cifar-10-batches-py/ or an image-folder tree (train/<class>/*, test/<class>/*)")
    if path.is_dir():
        for folder in (path, path / "cifar-10-batches-py"):
            if (folder / "data_batch_1").exists():
                return (*read_official_batches(folder), str(path))
        if (path / "train").is_dir() and (path / "test").is_dir():
            return (*collect_image_folder(image_files_in_tree(path)), str(path))
        raise DataError(f"{path} holds neither cifar-10-batches-py/ nor train/ and test/ image folders")
    if not tarfile.is_tarfile(path):
        raise DataError(f"{path} is not a folder or a .tar.gz archive of CIFAR-10")
    with tarfile.open(path) as tar:
        names = tar.getnames()
    if any(Path(n).name == "data_batch_1" for n in names):
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")
            folder = next(Path(tmp).rglob("data_batch_1")).parent
            return (*read_official_batches(folder), f"{path} (md5 {md5_of(path)})")
    return (*collect_image_folder(image_files_in_tar(path)), f"{path} (sha256 {sha256_of(path)})")


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


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: a reader sees the old file or the
    new one, never half of one, and a failed write (a kill, a full disk) leaves the old one whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, workers: int) -> None:
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    fields = {"image": RGBImageField(write_mode="raw", max_resolution=32), "label": IntField()}
    write_atomically(path, lambda tmp: DatasetWriter(str(tmp), fields, num_workers=workers)
                     .from_indexed_dataset(ArrayDataset(images, labels)))


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


def load_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"{data_dir} holds no converted CIFAR-10 ({path.name} missing): {MISSING_DATA_HINT}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path} is not valid JSON: delete {data_dir} and run 'make data' again") from None


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


def convert(source: str | None, data_dir: Path, workers: int = DEFAULT_WORKERS) -> dict:
    """Read the source and write both betons and meta.json; meta.json goes last, as the seal."""
    data_dir.mkdir(parents=True, exist_ok=True)
    splits, classes, description = read_source(source, data_dir)
    (data_dir / "meta.json").unlink(missing_ok=True)  # the betons are not valid until meta.json says so
    mean, std = channel_stats(splits["train"][0])
    meta = {"version": META_VERSION, "classes": list(classes), "source": description,
            "requested_source": source, "mean": mean, "std": std, "betons": {},
            "counts": {s: len(splits[s][1]) for s in SPLITS},
            "class_counts": {s: np.bincount(splits[s][1], minlength=len(classes)).tolist() for s in SPLITS},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for split in SPLITS:
        path = data_dir / f"{split}.beton"
        write_beton(path, *splits[split], workers)
        meta["betons"][split] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    save_json_atomic(data_dir / "meta.json", meta)
    return meta


def prepare(source: str | None, data_dir: Path, force: bool = False) -> str:
    """Convert unless valid files from the same source are there; returns a one-line report."""
    meta_path = data_dir / "meta.json"
    if meta_path.exists() and not force:
        meta = load_meta(data_dir)
        problems = beton_problems(data_dir, meta)
        same_source = source is None or source == meta.get("requested_source")
        if not problems and same_source:
            return f"{data_dir}: train.beton and test.beton are valid ({meta['source']}); nothing to do"
        print(f"{data_dir}: rebuilding: {'; '.join(problems) or 'a different --source was given'}", file=sys.stderr)
    start = time.perf_counter()
    meta = convert(source, data_dir)
    counts = ", ".join(f"{meta['counts'][s]:,} {s}" for s in SPLITS)
    return f"{data_dir}: wrote {counts} images from {meta['source']} in {time.perf_counter() - start:.1f} s"


def ensure_valid(data_dir: str | Path) -> dict:
    """Refuse to train on missing or corrupted betons; checked once per process and directory."""
    key = str(Path(data_dir).resolve())
    if key not in _VALIDATED:
        meta = load_meta(Path(data_dir))
        problems = beton_problems(Path(data_dir), meta)
        if problems:
            raise DataError(f"{data_dir}: {'; '.join(problems)}: run 'python data.py --data-dir {data_dir}' to rebuild")
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
    x = x * factor()
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - gray.mean((2, 3), keepdim=True)) * factor() + gray.mean((2, 3), keepdim=True)
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - gray) * factor() + gray
    return x.clamp(0, 1)


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

def same_order_for_every_world_size():
    """A FFCV traversal order that gives the same global order however many processes share it.

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

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        import torch
        self.loader.next_epoch = self.epoch
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 100_003 + self.epoch)
        threads = torch.get_num_threads()
        batches = iter(self.loader)
        torch.set_num_threads(threads)  # FFCV's __iter__ just set it to its worker count
        if self.device.type == "cpu":
            # On a CPU, FFCV's threads and the training step share the cores, and side by side they
            # slow each other down (torch's OpenMP threads spin between ops): a resnet20 epoch took
            # 1.37x as long as from memory on 2 cores. So decode the whole epoch in one burst first,
            # on every core (~1 s for CIFAR-10's 50,000 images, 150 MB), then train. FFCV reuses its
            # buffers, hence the copies. On a GPU the loader runs alongside, hidden behind the GPU.
            batches = [(images.clone(), labels.clone()) for images, labels in batches]
        self.epoch += 1
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


def make_loader(split: str, batch_size: int, device: torch.device | str, aug: str = DEFAULT_AUG,
                fraction: float = 1.0, val_split: float = 0.0, seed: int = 0, workers: int = DEFAULT_WORKERS,
                distributed: bool = False, data_dir: str | Path = DATA_DIR) -> DeviceLoader:
    """Batches of (images float NCHW channels-last normalised, labels int64), both on `device`.

    split: "train" (random order, drop_last, augmented), "val" (a seeded part of the train set held
    out) or "test" (sequential, every image once). With `distributed`, each rank gets its share;
    batch_size is then per rank."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}: choose train, val or test")
    import torch
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage
    device = torch.device(device)
    meta = ensure_valid(data_dir)
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
    image_ops += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    label_ops = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True), Squeeze(1)]
    loader = Loader(str(path), batch_size=batch_size, num_workers=workers,
                    order=same_order_for_every_world_size() if split == "train" else OrderOption.SEQUENTIAL,
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


# ---------------------------------------------------------------------------------------------
# Benchmark: our loader against the way such comparisons are usually written.
# ---------------------------------------------------------------------------------------------

def time_epoch(batches, limit: int | None = None) -> float:
    """Images per second over one pass (or the first `limit` images)."""
    import torch
    start, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += len(images)
        if limit and seen >= limit:
            break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def torchvision_way(images: np.ndarray, labels: np.ndarray, mean: list[float], std: list[float], workers: int):
    """A DataLoader over PIL images, as torchvision.datasets.CIFAR10 serves them."""
    import torch
    import torchvision.transforms as T
    from PIL import Image
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    class PILDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(images[i])), int(labels[i])

    return torch.utils.data.DataLoader(PILDataset(), batch_size=128, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def in_memory_ceiling(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch_size: int):
    """The same augmentation as batched tensor ops on data already on the device: an upper bound."""
    import torch
    n = len(images)
    for _ in range(n // batch_size):
        x = images[torch.randint(0, n, (batch_size,), device=images.device)]
        x = torch.nn.functional.pad(x, (TRANSLATE_PX,) * 4)
        dy, dx = np.random.randint(0, 2 * TRANSLATE_PX + 1, 2)  # one shift per batch: a generous ceiling
        x = x[:, :, dy:dy + 32, dx:dx + 32]
        x = torch.where(torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        yield device_transform(x, mean, std, (), None), None


def benchmark(data_dir: Path, device: torch.device, batch_size: int = 512, workers: int = DEFAULT_WORKERS,
              aug: str = DEFAULT_AUG) -> dict:
    import torch
    meta = ensure_valid(data_dir)
    ours = make_loader("train", batch_size, device, aug, workers=workers, data_dir=data_dir)
    time_epoch(ours)  # the first epoch pays numba's JIT compilation
    ours_rate = statistics.median(time_epoch(ours) for _ in range(BENCH_REPS))
    n = meta["counts"]["train"]
    images = read_images(data_dir, "train", list(range(n)))
    labels = beton_labels(data_dir / "train.beton")
    tv = torchvision_way(images, labels, meta["mean"], meta["std"], workers=2)
    time_epoch(tv, limit=2048)  # start the workers
    tv_rate = statistics.median(time_epoch(tv, limit=min(n, 20_000)) for _ in range(BENCH_REPS))
    on_device = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    mean, std = channel_tensor(meta["mean"], device), channel_tensor(meta["std"], device)
    ceiling = statistics.median(time_epoch(in_memory_ceiling(on_device, mean, std, batch_size))
                                for _ in range(BENCH_REPS))
    return {"device": str(device), "host": platform.node(), "images": n, "batch_size": batch_size, "workers": workers,
            "ours_img_per_s": round(ours_rate), "torchvision_img_per_s": round(tv_rate),
            "ceiling_img_per_s": round(ceiling), "ratio": round(ours_rate / tv_rate, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default=None,
                        help="cifar-10-python.tar.gz, cifar-10-batches-py/, or an image-folder tree or its "
                             ".tar.gz; default: download the official archive")
    parser.add_argument("--data-dir", default=DATA_DIR, type=Path, help="where the betons and meta.json go")
    parser.add_argument("--force", action="store_true", help="convert again even if valid files are there")
    parser.add_argument("--bench", action="store_true", help="time our loader against the torchvision way")
    parser.add_argument("--device", default="auto", help="benchmark device: auto (cuda if there is one), cpu, cuda:N")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="FFCV loader workers (benchmark)")
    parser.add_argument("--json", type=Path, default=None, help="also write the benchmark figures here")
    args = parser.parse_args()
    try:
        if args.bench:
            import torch
            auto = "cuda" if torch.cuda.is_available() else "cpu"
            device = torch.device(auto if args.device == "auto" else args.device)
            result = benchmark(args.data_dir, device, workers=args.workers)
            print(f"ours {result['ours_img_per_s']:,} img/s | torchvision DataLoader "
                  f"{result['torchvision_img_per_s']:,} img/s | ratio {result['ratio']}x | "
                  f"in-memory ceiling {result['ceiling_img_per_s']:,} img/s")
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                save_json_atomic(args.json, result)
        else:
            print(prepare(args.source, args.data_dir, args.force))
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
