"""CIFAR-10 -> FFCV .beton files -> normalised batches on the training device.

    python data.py                                  # download the official archive, convert
    python data.py --source cifar-10-python.tar.gz  # or a local copy (offline machines)
    python data.py --source ../shared/data/cifar10-jpeg.tar.gz   # or an image-folder tree / its .tar.gz
    python data.py --check                          # is the data dir what training will accept?

Conversion writes DIR/{train,test}.beton, preview.npz and, last, the sealed meta.json, all under temporary
names until all are complete (docs/data.md). make_loader is the one way training gets data: FFCV only decodes;
normalisation and every augmentation are seeded, batched tensor ops on the training device.
"""
from __future__ import annotations

import argparse
import collections
import functools
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import sys
import tarfile
import tempfile
import time
import types
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numba
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
# Every augmentation is a batched tensor op on the training device, drawn from the run's seeded generator.
AUGMENTATIONS = ("flip", "translate", "cutout", "rotate", "affine", "jitter", "vflip")
DEFAULT_AUG = "flip,translate"
MAX_WORKERS = 8  # FFCV loader threads per process by default
TRANSLATE_PX = 4
CUTOUT_PX = 8
ROTATE_DEG = 15.0
SHEAR_DEG, SCALE_RANGE = 10.0, (0.9, 1.1)
JITTER = 0.2  # brightness, contrast and saturation each drawn from [1 - JITTER, 1 + JITTER]
# Image-folder sources: the files taken for images (torchvision's IMG_EXTENSIONS lacks .gif), and the
# modes whose conversion to RGB is exact.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
TORCH_THREADS: int | None = None  # torch's thread count before FFCV changed it
SOURCE_KINDS = ("cifar-10-python.tar.gz, cifar-10-batches-py/, or an image-folder tree (train/<class>/*, "
                "test/<class>/*) or its .tar.gz")


class DataError(Exception):
    """Bad or missing data: main() prints its message as a one-line error."""


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, Slurm, a cpuset), which numba, and so FFCV, holds its
    threads to; os.cpu_count() counts the whole machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call (macOS, Windows): the machine is all there is
        return os.cpu_count() or 1


def check_workers(requested: int | None, local_ranks: int = 1) -> tuple[int, str | None]:
    """FFCV workers for a requested count (None: the usable CPUs shared among the node's ranks, at most 8)
    and, when it had to be lowered (numba refuses more threads than the affinity allows), why."""
    if requested is None:
        return max(1, min(MAX_WORKERS, usable_cpus() // max(1, local_ranks))), None
    cpus = usable_cpus()
    if requested > cpus:
        return cpus, (f"--workers {requested} is more than the {cpus} CPU{'s' * (cpus > 1)} this process may use "
                      f"(taskset/Slurm/cgroup): using {cpus}")
    return requested, None


@functools.cache
def import_ffcv() -> None:
    """Import FFCV once. FFCV sets torch's thread count to 1 on import and to its worker count on every
    epoch: TORCH_THREADS keeps the count a training step should have, restored wherever FFCV changes it."""
    global TORCH_THREADS
    import numba.typed
    import torch
    TORCH_THREADS = torch.get_num_threads()
    # FFCV 1.0.2's rgb_image builds a numba typed Dict at import (IMAGE_MODES) that only Python code
    # reads; compiling numba's typed dict was 6.7 of the 9 s of the import. A plain dict does the same.
    typed_dict, numba.typed.Dict = numba.typed.Dict, dict
    try:
        import ffcv.loader  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict
    torch.set_num_threads(TORCH_THREADS)
    run_loader_thread_on_its_device()
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline.compiler import Compiler
    from numba.core.registry import CPUDispatcher
    # FFCV compiles its page-cache reader and every decoder anew in each process (1.7 s of a run's first
    # epoch and evaluation); our decoders (decoders()) read the page cache themselves, compiled once per
    # machine, and FFCV's compiler passes a function numba has compiled already through as it is.
    OSCacheManager.compile_reader = lambda manager: None
    ffcv_compile = Compiler.compile.__func__
    Compiler.compile = classmethod(lambda cls, code, signature=None: code if isinstance(code, CPUDispatcher)
                                   else ffcv_compile(cls, code, signature))


def decode_raw_images(batch_indices, destination, metadata, storage_state):
    """FFCV 1.0.2's SimpleRGBImageDecoder for the raw images convert writes, read from FFCV's page cache
    (storage_state: the mmapped beton, the samples' addresses in order, their sizes)."""
    beton, addresses, sizes = storage_state
    for i in numba.prange(len(batch_indices)):  # on FFCV's workers
        address = metadata[batch_indices[i]]["data_ptr"]
        size = sizes[np.searchsorted(addresses, address)]
        destination[i].reshape(-1)[:] = beton[address:address + size]
    return destination[:len(batch_indices)]


def decode_labels(batch_indices, destination, metadata, storage_state):
    """FFCV 1.0.2's IntDecoder: a label is its sample's metadata."""
    for i in range(len(batch_indices)):
        destination[i] = metadata[batch_indices[i]]
    return destination[:len(batch_indices)]


def jit_cached(function, parallel: bool = False):
    """`function` compiled as FFCV compiles its code, but once per machine into numba's cache (__pycache__
    here, or the user's cache folder); where numba finds no writable cache folder, in this process."""
    jit = functools.partial(numba.njit, fastmath=True, nogil=True, error_model="numpy", parallel=parallel)
    try:
        return jit(cache=True)(function)
    except RuntimeError:
        return jit(function)


@functools.cache
def decoders() -> tuple[type, type]:
    """FFCV's image and label decoders, running our cached decode_raw_images and decode_labels."""
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    images, labels = jit_cached(decode_raw_images, parallel=True), jit_cached(decode_labels)
    return (type("RawImageDecoder", (SimpleRGBImageDecoder,), {"generate_code": lambda self: images}),
            type("LabelDecoder", (IntDecoder,), {"generate_code": lambda self: labels}))


def run_loader_thread_on_its_device() -> None:
    """Make FFCV's loader thread work on the run's GPU, not GPU 0. FFCV 1.0.2 makes its CUDA streams on the
    rank's device, then enters them in a new thread, which starts on device 0: leaving torch.cuda.stream()
    there calls cudaSetDevice(0), and every rank but 0 makes a context on GPU 0 (memory per rank; a hang
    under exclusive-process mode). So the thread first sets the device its streams were made on."""
    import torch
    from ffcv.loader.epoch_iterator import EpochIterator
    ffcv_run = EpochIterator.run

    def run(self):
        streams = [s for s in getattr(self, "cuda_streams", None) or [] if s is not None]
        if streams:
            torch.cuda.set_device(streams[0].device)
        return ffcv_run(self)

    run.ffcv_run = ffcv_run
    EpochIterator.run = run


# --- sources: each gives {split: (images uint8 N×32×32×3, labels int64 N)}, the classes and a report ---

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest is Python 3.11's: read in 1 MiB blocks
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_official(raw_dir: Path) -> Path:
    """The official archive, fetched by torchvision's downloader, which checks its md5."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, download_url
    try:
        if not check_integrity(str(raw_dir / CIFAR10.filename), CIFAR10.tgz_md5):
            download_url(CIFAR10.url, str(raw_dir), CIFAR10.filename, CIFAR10.tgz_md5)
    except Exception as error:  # URLError, timeouts, md5 mismatch: all mean "no usable download"
        raise DataError(f"could not download CIFAR-10 ({type(error).__name__}: {error}); on an offline "
                        f"machine pass --source PATH (make data SOURCE=PATH) to {SOURCE_KINDS}") from None
    return raw_dir / CIFAR10.filename


def read_source(source: str | None, data_dir: Path, skip_bad: bool = False) -> tuple[dict, list[str], dict, str]:
    """The splits, the classes, what was skipped or converted and a description of the source (None: the
    official download). A folder or an archive is read as one tree {path: bytes, or a Path in a folder; None
    for a folder}: an archive in memory, as extracting 60,000 files takes longer than decoding them."""
    path = Path(source) if source is not None else download_official(data_dir / "raw")
    try:
        if path.is_dir():  # its own files, and what lies in its train/, test/ and cifar-10-batches-py/
            found = {*path.iterdir(), *(p for d in (*SPLITS, "cifar-10-batches-py") for p in (path / d).rglob("*"))}
            tree = {p.relative_to(path).as_posix(): None if p.is_dir() else p for p in sorted(found)}
            where, description = f"{path}/", str(path)
        elif path.exists() and tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:  # each member read as it comes: a gzip stream only reads forward
                tree = {m.name.rstrip("/"): tar.extractfile(m).read() if m.isfile() else None
                        for m in tar if m.isfile() or m.isdir()}
            where, description = f"{path}:", f"{path} (sha256 {sha256_of(path)})"
        else:
            problem = "is not a folder or a .tar.gz archive" if path.exists() else "not found"
            raise DataError(f"source {path} {problem}: pass --source PATH to {SOURCE_KINDS}")
    except PermissionError as error:
        raise DataError(f"cannot read {error.filename}: permission denied: fix its permissions") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{path} is damaged ({error}): download or pack it again") from None
    batch = next((k for k in tree if k.rpartition("/")[2] == "data_batch_1"), None)
    if batch is not None:
        return (*read_official({k.rpartition("/")[2]: v for k, v in tree.items() if v is not None
                                and k.rpartition("/")[0] == batch.rpartition("/")[0]}, path), {}, description)
    # An image folder's train/ and test/ may lie in a folder of their own (an archive often holds one).
    at = {k: next((i for i, part in enumerate(k.split("/")) if part in SPLITS), None) for k in tree}
    entries = [(tuple(k.split("/")[i:]), where + k, tree[k]) for k, i in at.items() if i is not None]
    if not entries:
        raise DataError(f"{path} holds neither cifar-10-batches-py/ nor train/ and test/ folders: "
                        f"pass --source PATH to {SOURCE_KINDS}")
    return (*read_image_folder(entries, skip_bad), description)


def read_official(files: dict[str, bytes | Path], source: Path) -> tuple[dict, list[str]]:
    """The official batches, read by torchvision's CIFAR10 from a temporary copy: it checks every file
    against the release's md5 before unpickling any (a pickle can run code when loaded)."""
    from torchvision.datasets import CIFAR10
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CIFAR10.base_folder).mkdir()
        for name, content in files.items():
            copy = content.read_bytes() if isinstance(content, Path) else content
            (Path(tmp) / CIFAR10.base_folder / name).write_bytes(copy)
        try:
            sets = [CIFAR10(tmp, train=split == "train") for split in SPLITS]
        except RuntimeError:
            raise DataError(f"{source}: a file is missing or does not match the official CIFAR-10 checksum; "
                            "refusing to unpickle it (pickles can run code): download the official archive again"
                            ) from None
    arrays = [(np.ascontiguousarray(d.data), np.array(d.targets, np.int64)) for d in sets]
    return dict(zip(SPLITS, arrays, strict=True)), sets[0].classes


def image_folder_files(entries: list[tuple[tuple[str, ...], str, bytes | Path | None]]
                       ) -> tuple[list[tuple[str, str, str, bytes | Path]], list[str]]:
    """docs/data.md's image-folder rules on a tree's (parts from the split folder on, where, content; None
    for a folder): (split, class, where, content) per image, and the files skipped."""
    images, skipped, folders = [], [], {split: {} for split in SPLITS}  # split -> class -> where
    for parts, where, content in entries:
        depth, is_file = len(parts), content is not None
        if any(part.startswith(".") for part in parts):  # .DS_Store, ._x.png, .ipynb_checkpoints/
            skipped += [where] * is_file
            continue
        if depth > 3 or (depth == 3 and not is_file):
            raise DataError(f"{where.rsplit('/', depth - 3)[0]} is a folder inside the class folder "
                            f"{'/'.join(parts[:2])}: the layout is {parts[0]}/<class>/<image>, one level; move its "
                            f"images into {'/'.join(parts[:2])}/ or out of the tree")
        if depth == 3 or (depth == 2 and not is_file):  # an archive may list a folder's files, not the folder
            folders[parts[0]].setdefault(parts[1], where.rsplit("/", 1)[0] if is_file else where)
        if not is_file:
            continue
        if Path(where).suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(where)
        elif depth == 2:
            raise DataError(f"{where} is not in a class folder: move it into {parts[0]}/<class>/ "
                            "(the folder's name is the label)")
        else:
            images.append((*parts[:2], where, content))
    empty = next((split for split in SPLITS if not folders[split]), None)
    if empty:
        raise DataError(f"the image folder has no {empty}/<class>/ folders: it needs train/<class>/* "
                        "and test/<class>/* images")
    with_images = {(split, cls) for split, cls, _, _ in images}
    for split, other in (("train", "test"), ("test", "train")):
        for cls, where in folders[split].items():
            if cls not in folders[other]:
                raise DataError(f"{where} has no matching {other}/{cls}: train/ and test/ need the same class "
                                "folders; rename or remove it")
            if (split, cls) not in with_images:
                raise DataError(f"{where} holds no images: add its images or remove the folder")
    return images, skipped


def decode_image(content: bytes | Path, where: str, skip_bad: bool) -> tuple[np.ndarray, str] | None:
    """A 32×32 RGB uint8 array and the file's own mode (converted from when it is not RGB); None for a
    file that cannot be decoded, with --skip-bad (the one refusal it skips)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():  # PIL warns about palette transparency, which RGB drops anyway
            warnings.simplefilter("ignore")
            image = Image.open(content if isinstance(content, Path) else io.BytesIO(content))
            image.load()  # open() reads the header only: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if skip_bad:
            return None
        reason = ("not an image PIL can read" if isinstance(error, UnidentifiedImageError)
                  else error.strerror if isinstance(error, OSError) and error.strerror else str(error))
        raise DataError(f"{where} cannot be read as an image ({reason}): replace or delete it, "
                        "or pass --skip-bad to skip broken images") from None
    if image.size != (32, 32):
        raise DataError(f"{where} is {image.width}×{image.height}, not 32×32: CIFAR-10 images are 32×32; "
                        "resize the folder yourself (data.py does not: resizing changes the task)")
    if image.mode not in EIGHT_BIT_MODES:
        raise DataError(f"{where} has mode {image.mode} (more than 8 bits per channel): save it as 8-bit RGB "
                        "(converting here would clip its values)")
    return np.asarray(image.convert("RGB")), image.mode


def read_image_folder(entries: list, skip_bad: bool = False) -> tuple[dict, list[str], dict]:
    """Decode an image folder's tree, classes in sorted order (as torchvision's ImageFolder), images by
    class, then name: the splits, the classes, and what was skipped or converted, for meta.json."""
    from tqdm import tqdm
    files, not_images = image_folder_files(entries)
    classes = sorted({cls for split, cls, _, _ in files if split == "train"})
    splits, broken, converted = {}, [], collections.Counter()
    for split in SPLITS:
        chosen = sorted((f for f in files if f[0] == split), key=lambda f: f[1:3])
        images, labels = [], []
        for _, cls, where, content in tqdm(chosen, desc=f"decode {split}", unit="img", disable=len(chosen) < 2000):
            decoded = decode_image(content, where, skip_bad)
            if decoded is None:
                broken.append(where)
                continue
            image, mode = decoded
            images.append(image)
            labels.append(classes.index(cls))
            if mode != "RGB":
                converted[mode] += 1
        emptied = [cls for i, cls in enumerate(classes) if i not in labels]
        if emptied:
            raise DataError(f"every image of {split}/{emptied[0]} is broken (skipped by --skip-bad): "
                            "replace them, or remove the class from train/ and test/")
        splits[split] = (np.stack(images), np.array(labels, np.int64))
    report = {"skipped_not_images": not_images, "skipped_broken": broken, "converted_to_rgb": dict(converted)}
    return splits, classes, report


def source_notes(report: dict) -> list[str]:
    """One line for each kind of thing the conversion skipped or changed."""
    def some(paths: list[str]) -> str:
        return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more (all in meta.json)" if len(paths) > 3 else "")
    not_images, broken, modes = (report.get(k) for k in ("skipped_not_images", "skipped_broken", "converted_to_rgb"))
    notes = [f"skipped {len(not_images)} files that are not images (hidden, or not "
             f"{'/'.join(sorted(IMAGE_EXTENSIONS))}): {some(not_images)}"] if not_images else []
    notes += [f"skipped {len(broken)} broken images (--skip-bad): {some(broken)}"] if broken else []
    return notes + ([f"converted {sum(modes.values())} images to RGB ("
                     + ", ".join(f"{n} {mode}" for mode, n in sorted(modes.items())) + ")"] if modes else [])


# --- conversion: arrays -> betons, preview and meta.json, atomically ---

def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 HWC images, in [0, 1] units (float64, exact)."""
    pixels = images.reshape(-1, 3)
    mean = pixels.mean(axis=0, dtype=np.float64) / 255
    sq = np.einsum("ij,ij->j", pixels.astype(np.float64), pixels) / len(pixels) / 255**2
    return mean.tolist(), np.sqrt(sq - mean**2).tolist()


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


def save_json_atomic(path: Path, payload: dict) -> None:
    """Strict JSON (no NaN or Infinity, which json.dumps writes by default): a non-finite number is null."""
    text = json.dumps(finite_or_null(payload), indent=1, allow_nan=False)
    write_atomically(Path(path), lambda tmp: tmp.write_text(text))


def finite_or_null(value):
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A beton of raw 32×32 RGB images and int labels, written in this process (a second or so): on a failed
    write (a full disk), FFCV's forked workers print a traceback, the writer hangs and its shared memory leaks."""
    import_ffcv()
    import ffcv.writer as ffcv_writer
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    fields = {"image": RGBImageField(write_mode="raw", max_resolution=32), "label": IntField()}
    writer = ffcv_writer.DatasetWriter(str(path), fields, num_workers=1)
    writer.num_samples = len(labels)
    # prepare() writes the header, then makes the table with shared_memory.SharedMemory(create=True, size=n)
    shared_memory, ffcv_writer.shared_memory = ffcv_writer.shared_memory, types.SimpleNamespace(
        SharedMemory=lambda create, size: types.SimpleNamespace(buf=bytearray(size)))
    try:
        writer.prepare()
    finally:
        ffcv_writer.shared_memory = shared_memory
    table = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
    allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
    with allocator:  # its __enter__ returns None; pages are written as they fill
        for i, sample in enumerate(zip(images, labels.tolist(), strict=True)):
            ffcv_writer.handle_sample(sample, i, writer.metadata_type.names, table, allocator, fields)
    writer.finalize(allocator.allocations)


def convert(source: str | None, data_dir: Path, skip_bad: bool = False) -> dict:
    """Read the whole source, then write both betons, the preview and meta.json, each under a temporary
    name, renamed over the old ones only once all are complete, meta.json last: a bad source leaves
    data_dir as it was (not even created), and a failed write (a full disk, a kill) the old data valid."""
    splits, classes, report, description = read_source(source, data_dir, skip_bad)
    mean, std = channel_stats(splits["train"][0])
    meta = {"version": META_VERSION, "classes": list(classes), "source": description,
            "requested_source": source, "mean": mean, "std": std, "betons": {},
            "counts": {s: len(splits[s][1]) for s in SPLITS},
            "class_counts": {s: np.bincount(splits[s][1], minlength=len(classes)).tolist() for s in SPLITS},
            "source_report": report, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    names = ("train.beton", "test.beton", PREVIEW_FILE, "meta.json")
    tmp = {name: temporary_name(data_dir / name) for name in names}
    _VALIDATED.pop(str(data_dir.resolve()), None)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            write_beton(tmp[f"{split}.beton"], *splits[split])
            meta["betons"][split] = {"bytes": tmp[f"{split}.beton"].stat().st_size,
                                     "sha256": sha256_of(tmp[f"{split}.beton"])}
        write_preview(tmp[PREVIEW_FILE], *splits["test"])
        tmp["meta.json"].write_text(json.dumps({**meta, "seal": seal_of(meta)}, indent=1))
        for name in names:
            os.replace(tmp[name], data_dir / name)
    except OSError as error:  # a full disk, a read-only folder
        raise DataError(f"could not write {error.filename or data_dir}: {error.strerror or error}: "
                        "free some space or pass another --data-dir") from None
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return meta


def prepare(source: str | None, data_dir: Path, force: bool = False, skip_bad: bool = False) -> str:
    """Convert unless valid files from the same source are there (a rebuild without --source converts
    the source meta.json records, so an offline machine does not download); returns a one-line report.
    What the conversion skipped or converted goes to stderr, a line for each kind."""
    meta, problems = read_meta(data_dir)
    if meta and not problems and not force and source in (None, meta["requested_source"]):
        return f"{data_dir}: train.beton and test.beton are valid ({meta['source']}); nothing to do"
    if meta is not None and not force:
        print(f"{data_dir}: rebuilding: {'; '.join(problems) or 'a different --source was given'}", file=sys.stderr)
    start = time.perf_counter()
    meta = convert(source if source is not None else (meta or {}).get("requested_source"), data_dir, skip_bad)
    for note in source_notes(meta["source_report"]):
        print(f"note: {note}", file=sys.stderr)
    counts = ", ".join(f"{meta['counts'][s]:,} {s}" for s in SPLITS)
    return f"{data_dir}: wrote {counts} images from {meta['source']} in {time.perf_counter() - start:.1f} s"


# --- validation: what training accepts ---

def seal_of(meta: dict) -> str:
    """sha256 of meta.json's content but the seal: while it matches, meta.json (the betons' checksums,
    counts, classes, mean and std) is what conversion wrote, and nothing in it needs checking again."""
    content = {k: v for k, v in meta.items() if k != "seal"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_meta(data_dir: Path) -> tuple[dict | None, list[str]]:
    """meta.json if it is what conversion wrote ({} if not, None if there is none) and what is wrong with it
    or the betons; DataError naming the fix when data_dir cannot be a data folder."""
    fix = "pass --data-dir a folder (data.py writes the betons there; the default is data/)"
    blocking = next((p for p in (data_dir, *data_dir.parents) if p.exists()), Path("."))
    if not blocking.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder: {fix}" if blocking == data_dir
                        else f"--data-dir {data_dir} lies inside {blocking}, which is a file: {fix}")
    path = data_dir / "meta.json"
    try:
        if not path.exists():
            return None, []
        meta = json.loads(path.read_text())
    except PermissionError as error:
        raise DataError(f"cannot read {error.filename} (permission denied): fix its permissions or {fix}") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return {}, ["meta.json is not valid JSON"]
    if not isinstance(meta, dict):
        return {}, [f"meta.json holds a JSON {type(meta).__name__}, not an object"]
    if meta.get("version") != META_VERSION:
        return {}, [f"meta.json is version {meta.get('version')}, this data.py reads version {META_VERSION}"]
    if meta.get("seal") != seal_of(meta):
        return {}, ["meta.json does not match its seal (edited after conversion)"]
    problems = []
    for split, expected in meta["betons"].items():
        beton = data_dir / f"{split}.beton"
        if not beton.exists():
            problems.append(f"{beton.name} is missing")
        elif beton.stat().st_size != expected["bytes"]:
            problems.append(f"{beton.name} has {beton.stat().st_size} bytes, meta.json says {expected['bytes']}")
        elif sha256_of(beton) != expected["sha256"]:
            problems.append(f"{beton.name} does not match its sha256 in meta.json (corrupted)")
    return meta, problems


def ensure_valid(data_dir: str | Path) -> dict:
    """meta.json of a data dir whose parts agree (read_meta), checked once per process and folder;
    DataError naming the fix otherwise."""
    data_dir = Path(data_dir)
    key = str(data_dir.resolve())
    if key not in _VALIDATED:
        meta, problems = read_meta(data_dir)
        if meta is None:
            raise DataError(f"{data_dir} holds no converted CIFAR-10 (meta.json missing): run 'make data' (or "
                            "'python data.py --source PATH' offline) or pass --data-dir")
        if problems:
            raise DataError(f"{data_dir}: {'; '.join(problems)}: rebuild with 'python data.py --data-dir "
                            f"{data_dir} --force' (add --source PATH offline) or 'make data'")
        _VALIDATED[key] = meta
    return _VALIDATED[key]


_VALIDATED: dict[str, dict] = {}


# --- splits, subsets and the preview ---

def beton_labels(path: Path) -> np.ndarray:
    """The labels, from the beton's metadata table (IntField values live there): nothing is decoded."""
    import_ffcv()
    from ffcv.reader import Reader
    return np.asarray(Reader(str(path)).metadata["f1"], dtype=np.int64)


def split_indices(labels: np.ndarray, fraction: float = 1.0, val_split: float = 0.0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced, seeded (train, val) indices into the train set. Per class, a seeded permutation:
    its first `val_split` part is the val set, the first `fraction` of the rest the training subset;
    so the val set does not depend on the fraction, and smaller fractions are subsets of larger ones."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(val_split * len(members))
        val.append(members[:n_val])
        train.append(members[n_val:][:max(1, round(fraction * (len(members) - n_val)))])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def preview_indices(labels, count: int = PREVIEW_COUNT, seed: int = 0) -> list[int]:
    """A fixed, seeded sample of a split, the same for every run (so figures compare): one image of
    each class in turn, as image folders store the test set in class order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    return [int(i) for i in itertools.chain.from_iterable(itertools.zip_longest(*by_class)) if i is not None][:count]


def write_preview(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The test split's preview: its indices (preview_indices), their labels and their images."""
    indices = np.asarray(preview_indices(labels), dtype=np.int64)
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary name
        np.savez_compressed(f, indices=indices, labels=labels[indices], images=images[indices])


def preview_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / PREVIEW_FILE


# --- augmentations on the device: batched tensor ops, seeded per epoch ---

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


def flip_and_translate(x: torch.Tensor, g: torch.Generator, flip: bool, px: int) -> torch.Tensor:
    """A horizontal flip of half the images and a shift of each by up to px pixels (as a random crop of
    the image padded by px), in one gather per axis; pixels shifted in are 0 (the mean, once normalised)."""
    import torch
    n, c, h, w = x.shape
    x = torch.nn.functional.pad(x, (px,) * 4)
    dy, dx = (torch.randint(0, 2 * px + 1, (n, 1), device=x.device, generator=g) for _ in range(2))
    cols = dx + torch.arange(w, device=x.device)
    if flip:  # a flipped image's column j is the padded image's column (w + 2px - 1) - j
        mirrored = torch.rand(n, 1, device=x.device, generator=g) < 0.5
        cols = torch.where(mirrored, w + 2 * px - 1 - cols, cols)
    rows = dy + torch.arange(h, device=x.device)
    x = x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * px))
    return x.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


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
    """(images/255 - mean) / std as a new channels-last float batch, each image one H*W*C row: a per-channel
    broadcast over NHWC memory (an inner dimension of 3) is ~5x slower on CPU."""
    import torch
    n, c, h, w = images.shape
    nhwc = images.permute(0, 2, 3, 1).contiguous()  # a view when the batch is channels-last already
    shift, scale = (mean * 255).view(c).repeat(h * w), (1 / (std * 255)).view(c).repeat(h * w)
    rows = nhwc.reshape(n, h * w * c).to(torch.float32, copy=True).sub_(shift).mul_(scale)
    return rows.view(n, h, w, c).permute(0, 3, 1, 2)


def device_transform(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, augs: tuple[str, ...],
                     g: torch.Generator | None) -> torch.Tensor:
    """uint8 NCHW (channels-last) -> normalised float, with the device-side augmentations; mean and std
    are in [0, 1] units, shaped 1×3×1×1."""
    import torch
    x = images
    if "jitter" in augs:
        x = color_jitter(x.float().div_(255), g).mul_(255)
    x = normalise(x, mean, std)
    if "flip" in augs or "translate" in augs:
        x = flip_and_translate(x, g, "flip" in augs, TRANSLATE_PX if "translate" in augs else 0)
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


# --- the loader ---

def register_sharded_order() -> str:
    """Register with FFCV (and return the key of) DistributedSampler's order for any world size, 1 too (FFCV's
    RANDOM uses numpy's alone): the ranks' first batches together are the 1-process first batch."""
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
        epoch = iter(self.loader)  # FFCV sets torch's threads to its worker count, here and in its thread's start
        self.epoch += 1
        try:
            batches = epoch
            if self.decode_first:
                # On a CPU, FFCV's threads and torch's spinning OpenMP threads slow each other down
                # (an epoch 1.37x as long on 2 cores): decode the epoch in one burst (~1 s), then train.
                # FFCV reuses its buffers, hence the copies.
                batches = [(images.clone(), labels.clone()) for images, labels in epoch]
            seen = 0
            for images, labels in batches:
                if torch.get_num_threads() != threads:  # once its thread has started, FFCV sets it no more
                    torch.set_num_threads(threads)
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
    """Batches of (images float NCHW channels-last normalised, labels int64), both on `device`, of split
    "train" (random order, drop_last, augmented), "val" (a seeded part of the train set held out) or
    "test" (sequential, every image once); with `distributed`, this rank's share (batch_size is per rank).
    workers: FFCV's threads (check_workers: None for the default, lowered with a note if too many)."""
    import torch
    image_decoder, label_decoder = decoders()
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
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
        train_indices, val_indices = split_indices(beton_labels(path), fraction, val_split, seed)
        indices = val_indices if split == "val" else train_indices
    if len(indices) == 0:
        raise ValueError(f"the {split} split is empty: raise --val-split")
    if split == "train" and batch_size > len(indices):
        raise ValueError(f"batch size {batch_size} is larger than the {len(indices)} training images: "
                         "lower --batch-size or raise --fraction")
    # A blocking copy, in FFCV's loader thread: FFCV reuses each pinned host buffer every batches_ahead + 2
    # batches, and a non-blocking copy is only queued on the GPU (behind the training steps it waits for);
    # nothing would then stop the thread from writing a later batch into the buffer before the GPU read
    # it (FFCV issues 37, 198). Blocking, the thread waits for the copy; the training loop does not.
    image_ops = [image_decoder(), ToTensor(), ToDevice(device, non_blocking=False),
                 ToTorchImage(channels_last=True)]
    label_ops = [label_decoder(), ToTensor(), ToDevice(device, non_blocking=False), Squeeze(1)]
    loader = Loader(str(path), batch_size=batch_size, num_workers=workers,
                    order=register_sharded_order() if split == "train" else OrderOption.SEQUENTIAL,
                    distributed=distributed, seed=seed, indices=indices, drop_last=split == "train",
                    os_cache=True,  # CIFAR fits the page cache: 48k img/s here against 37k with FFCV's own
                    pipelines={"image": image_ops, "label": label_ops})
    torch.set_num_threads(TORCH_THREADS)
    real = len(indices)
    if distributed and split != "train":
        real = len(range(torch.distributed.get_rank(), len(indices), torch.distributed.get_world_size()))
    return DeviceLoader(loader, len(indices), augs, channel_tensor(meta["mean"], device),
                        channel_tensor(meta["std"], device), device, seed, real)


def read_images(data_dir: str | Path, split: str, indices: list[int]) -> np.ndarray:
    """The raw uint8 images (N×32×32×3) at `indices` of a split's beton."""
    import torch
    image_decoder, label_decoder = decoders()
    from ffcv.loader import Loader, OrderOption
    order = np.argsort(indices)
    loader = Loader(str(Path(data_dir) / f"{split}.beton"), batch_size=len(indices), num_workers=1,
                    order=OrderOption.SEQUENTIAL, indices=np.asarray(indices)[order], drop_last=False,
                    os_cache=True, pipelines={"image": [image_decoder()], "label": [label_decoder()]})
    images = np.concatenate([np.array(batch[0]) for batch in loader])
    torch.set_num_threads(TORCH_THREADS)  # FFCV's Loader and its epoch set it to its worker count
    return images[np.argsort(order)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", help=f"{SOURCE_KINDS}; default: download the official archive")
    parser.add_argument("--data-dir", default=DATA_DIR, type=Path, help="where the betons and meta.json go")
    parser.add_argument("--force", action="store_true",
                        help="convert again even if valid files are there (from the recorded source unless --source)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip images that cannot be decoded (listed in meta.json) instead of stopping")
    parser.add_argument("--check", action="store_true",
                        help="check the data dir as training does (meta.json, the betons' checksums) and exit")
    args = parser.parse_args()
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
