"""How fast does each config train on this machine, and where does the time go? docs/speed.md reads the figures.

    python bench.py              # everything, batch 512 (meant for a GPU; long on a CPU)
    python bench.py --quick      # a few minutes on a laptop CPU (see --help)
    python bench.py --loader-only

Measured in one run on the same data, each figure the median of --reps timed repetitions after warm-up:
1. the loader alone: ours, the usual torchvision DataLoader over PIL images, and an in-memory ceiling;
2. train.py's training step per arch label and mode (eager fp32, each switch alone, and train.py's default
   as its auto decides it here), compile time apart; 3. an epoch of resnet20 fed by our loader against the
   same batches from memory; 4. FLOPs per image, achieved FLOP/s and the fraction of a matmul's peak.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # the imports below take seconds: the start-up line's "imports"

import argparse
import gc
import itertools
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data
import models
import speed
import train

IMPORTS_S = time.perf_counter() - STARTED
ARCHS = ("resnet18", "resnet18-imagenet", "resnet34", "resnet50", "resnet20", "resnet9")
BATCH_SIZE = 512
REPS = 5  # timed repetitions per figure; the median is reported
STEPS_PER_REP = 10  # steps in one timed repetition, so the sync that ends it is small beside them
WARMUP_STEPS = 3  # untimed steps after the first (compiling) one
EPOCH_ARCH, EPOCH_MODE = "resnet20", "default"
FLOP_COUNT_BATCH = 8  # FLOPs are linear in the batch: a small one counts the same per image
PEAK_MATMUL_SIZE = 2048
PEAK_REP_S = 0.1  # enough matmuls per repetition to last this long (a GPU does one in well under 1 ms)
LOADER_REPS = 3  # timed passes per loader; the median is reported
OUT = Path("results/bench")
# What --quick changes, each unless its own flag is given.
QUICK = {"batch_size": 64, "reps": 3, "steps_per_rep": 2, "warmup_steps": 1,
         "archs": ("resnet20", "resnet18-imagenet"), "epoch_fraction": 0.1}
# The usual way, each switch alone, and train.py's default (None: what its auto decides per arch here), in
# the table's order, in speed.choose_switches's vocabulary; amp_fp16 only on a GPU without bf16.
MODES = {name: dict(zip(("channels_last", "amp", "compile"), switches, strict=True)) for name, *switches in (
    ("eager_fp32", False, "fp32", False), ("channels_last", True, "fp32", False), ("amp_bf16", False, "bf16", False),
    ("amp_fp16", False, "fp16", False), ("compile", False, "fp32", True), ("default", None, None, None))}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device, dict[str, dict]]:
    """The flags over --quick's values over the full run's, the device and the modes to time there; a bad
    flag stops here, before any work. The loader part keeps the full run's batch under --quick."""
    quick = (f"batch {QUICK['batch_size']}, {QUICK['reps']} reps of {QUICK['steps_per_rep']} steps after "
             f"{QUICK['warmup_steps']} warm-up step, archs {', '.join(QUICK['archs'])}, the epoch part on "
             f"{QUICK['epoch_fraction'] * 100:g}%% of the train set, each unless its own flag is given; the loader "
             f"comparison is unchanged (the whole train set, batch {BATCH_SIZE} unless --batch-size is given)")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=data.DATA_DIR, type=Path, help=f"converted data (default {data.DATA_DIR})")
    p.add_argument("--device", default="auto", help="auto (the default: cuda if there is one), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"batch size (default {BATCH_SIZE})")
    p.add_argument("--archs", type=train.csv_of(str), default=ARCHS, help="comma list of models.py's archs, "
                   f"'-imagenet' added for the imagenet stem (default {','.join(ARCHS)})")
    p.add_argument("--reps", type=int, default=REPS, help=f"timed repetitions per figure (default {REPS})")
    p.add_argument("--modes", type=train.csv_of(str), help=f"comma list of the modes to time (default all: "
                   f"{','.join(MODES)}, amp_fp16 only on a GPU without bf16)")
    p.add_argument("--epoch-fraction", type=float, default=1.0, help="of the train set in the epoch part (default 1)")
    p.add_argument("--aug", default=data.DEFAULT_AUG, help="augmentation of the loader and epoch parts (train.py's)")
    p.add_argument("--workers", type=int, help="FFCV loader workers (default: the usable CPUs, at most 8)")
    p.add_argument("--quick", action="store_true", help=f"a few minutes on a CPU: {quick}")
    p.add_argument("--loader-only", action="store_true", help="time only the loaders, into OUT/loader/")
    p.add_argument("--out", type=Path, default=OUT, help=f"folder for <host>-<YYYY-MM-DD>.json (default {OUT})")
    p.set_defaults(steps_per_rep=STEPS_PER_REP, warmup_steps=WARMUP_STEPS)  # --quick's, without flags
    args = full = p.parse_args(argv)
    if full.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    args.loader_batch_size, args.command = full.batch_size, sys.argv[1:] if argv is None else argv
    for ok, problem in ((args.batch_size >= 2, "--batch-size: must be at least 2 (train-mode BatchNorm)"),
                        (args.reps >= 1, "--reps: must be at least 1"),
                        (0 < args.epoch_fraction <= 1, "--epoch-fraction: must be in (0, 1]"),
                        (args.workers is None or args.workers >= 1, "--workers: must be at least 1")):
        if not ok:
            p.error(problem)
    for label in args.archs:
        try:
            build(label, torch.device("cpu"))
        except ValueError as error:
            p.error(f"--archs {label}: {error}")
    device = speed.resolve_device(args.device, None)
    here = [name for name in MODES if name != "amp_fp16" or device.type == "cuda" and not speed.has_real_bf16()]
    for name in set(args.modes or ()) - set(here):
        p.error(f"--modes {name}: choose from {', '.join(here)}")
    return args, device, {name: MODES[name] for name in here if name in (args.modes or here)}


def timed(work, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of work(), this device only (not another GPU's work) synchronised at both ends."""
    speed.synchronize(device)
    start = time.perf_counter()
    result = work()
    speed.synchronize(device)
    return time.perf_counter() - start, result


def build(label: str, device: torch.device) -> torch.nn.Module:
    """'resnet18-imagenet' is resnet18 with the imagenet stem; 'resnet20' has the cifar stem."""
    arch, stem = next(((label[: -len(s) - 1], s) for s in models.STEMS if label.endswith(f"-{s}")), (label, "cifar"))
    torch.manual_seed(0)
    return models.build_model(arch, stem=stem).to(device)


def ready(label: str, mode: dict, device: torch.device, recipe: argparse.Namespace, nominal_steps: int):
    """A fresh model of `label` in `mode` with train.py's optimiser, schedule and loss scaling, as (epoch(batches)
    -> seconds of train.py's epoch over them, the mode, and for the default mode the switches speed.py's auto
    chooses for train.py here: fixed on CUDA, by its probes on CPU, timing steady steps only)."""
    torch._dynamo.reset()  # each model compiles from scratch, and no stale graph holds memory
    raw, switches = build(label, device), None
    if mode["compile"] is None:  # as train.py decides: its probes leave the model as it was
        probe_start = time.perf_counter()
        switches = speed.choose_switches(recipe, raw, device)
        raw = raw.to(memory_format=speed.memory_format(switches["channels_last"]))
        if switches["compile"] is None:
            speed.keep_compile_if_faster(switches, torch.compile(raw, dynamic=False), raw, raw, device,
                                         recipe.batch_size_per_rank)
        switches["probe_time_s"] = time.perf_counter() - probe_start
        mode = {k: switches[k] for k in mode}
        torch._dynamo.reset()
    memory = speed.memory_format(mode["channels_last"])
    raw = raw.to(memory_format=memory)
    model = torch.compile(raw, dynamic=False) if mode["compile"] else raw
    optimizer = train.make_optimizer(raw, recipe)
    scheduler = train.make_scheduler(optimizer, recipe, nominal_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=mode["amp"] == "fp16")

    def epoch(batches) -> float:
        seconds, (loss, *_) = timed(lambda: train.train_one_epoch(
            model, batches, optimizer, scheduler, scaler, mode["amp"], memory, device, recipe, 1, "bench"), device)
        if not math.isfinite(loss):  # train_one_epoch stops a diverged epoch early: its time would be short
            raise RuntimeError("the loss diverged while timing: the figure would be of a shortened epoch")
        return seconds
    return epoch, mode, switches


def time_epochs(epoch, loader: data.DeviceLoader, args: argparse.Namespace) -> dict:
    """Epoch time fed by our loader and fed the same batches from the device's memory, interleaved."""
    # The loader's first epoch loads (or compiles) its numba decoders; its batches, kept, feed the in-memory epochs.
    in_memory = [(images.clone(), labels.clone()) for images, labels in loader]
    epoch(in_memory[:1])  # compiles, if this model has not run yet
    loader_s, memory_s = map(list, zip(*((epoch(loader), epoch(in_memory)) for _ in range(args.reps)), strict=True))
    return {"arch": EPOCH_ARCH, "mode": EPOCH_MODE, "batches": len(in_memory), "images": loader.num_samples,
            "loader_s": statistics.median(loader_s), "in_memory_s": statistics.median(memory_s),
            "loader_rep_s": loader_s, "in_memory_rep_s": memory_s, "batch_size": args.batch_size,
            "fraction": args.epoch_fraction}


def measure_label(record: dict, label: str, modes: dict, device: torch.device, args: argparse.Namespace,
                  epoch_loader: data.DeviceLoader) -> None:
    """Parts 2 and 3 for one label, a line per mode (out of memory, a dtype the device lacks: its failure);
    the epoch as soon as its mode's model is compiled and warm."""
    model = build(label, device)
    images, labels = speed.dummy_batch(FLOP_COUNT_BATCH, device, torch.contiguous_format)
    with FlopCounterMode(display=False) as counter:  # forward+backward of a training step
        F.cross_entropy(model.train()(images), labels).backward()
    record["flops_per_image"][label] = counter.get_total_flops() / FLOP_COUNT_BATCH
    details = record["archs"][label] = {"params": models.count_parameters(model), "modes": {},
                                        "forward_flops": models.forward_flops(model), "default_switches": None}
    for name, mode in modes.items():
        epoch = None  # the last mode's model and graphs go before this one's
        release_memory(device)
        try:
            epoch, mode, switches = ready(label, mode, device, args.recipe, args.nominal_steps)
            details["default_switches"] = switches or details["default_switches"]
            batch = speed.dummy_batch(args.batch_size, device, speed.memory_format(mode["channels_last"]))
            first, _ = epoch([batch]), epoch([batch] * args.warmup_steps)  # the first step compiles, if any
            reps = [epoch([batch] * args.steps_per_rep) / args.steps_per_rep for _ in range(args.reps)]
            result = details["modes"][name] = {
                "img_per_s": round(args.batch_size / statistics.median(reps), 1), "step_s": statistics.median(reps),
                "first_step_s": first, "rep_step_s": reps, **mode,
                **({"peak_memory_mb": speed.peak_memory_mb(device)} if device.type == "cuda" else {})}
            if (label, name) == (EPOCH_ARCH, EPOCH_MODE):
                record["epoch"] = time_epochs(epoch, epoch_loader, args)
            line = f"{result['img_per_s']:>10,.0f} img/s  first step {result['first_step_s']:.1f} s"
        except RuntimeError as error:
            details["modes"].pop(name, None)
            record["failed"][f"{label} {name}"] = first_line(error)
            line = f"failed: {first_line(error)}"
        print(f"{label:<18} {name:<14} {line}", flush=True)


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int) -> float:
    """FLOP/s of a square matmul: the ceiling this device reaches in this dtype."""
    n = PEAK_MATMUL_SIZE
    a, b, out = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
    def run(count: int) -> float:
        return timed(lambda: [torch.matmul(a, b, out=out) for _ in range(count)], device)[0]
    count = max(1, round(PEAK_REP_S / min(run(1), run(1))))  # the first pays the warm-up
    return 2 * n**3 * count / statistics.median(run(count) for _ in range(reps))


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    speed.reset_peak_memory(device)


# --- 1. the loader alone, against the way such comparisons are usually written ---

def images_per_s(batches, device: torch.device, count: int | None = None) -> float:
    """Images per second over one pass (or its first `count` batches), until `device` has them all."""
    seconds, seen = timed(lambda: sum(len(images) for images, _ in itertools.islice(batches, count)), device)
    return seen / seconds


def torchvision_way(images: np.ndarray, labels: np.ndarray, mean: list[float], std: list[float], workers: int,
                    batch_size: int, device: torch.device):
    """A DataLoader over PIL images, as torchvision.datasets.CIFAR10 serves them, with our workers, batch
    size and pinned memory on CUDA."""
    import torchvision.transforms as T  # only here: the usual way is what this measures
    from PIL import Image
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    class PILDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(images[i])), int(labels[i])

    return torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0, pin_memory=device.type == "cuda")


def in_memory_ceiling(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch_size: int):
    """The same augmentation as batched tensor ops on data already on the device: an upper bound."""
    n = len(images)
    for _ in range(n // batch_size):
        x = F.pad(images[torch.randint(0, n, (batch_size,), device=images.device)], (data.TRANSLATE_PX,) * 4)
        dy, dx = np.random.randint(0, 2 * data.TRANSLATE_PX + 1, 2)  # one shift per batch: a generous ceiling
        x = x[:, :, dy:dy + 32, dx:dx + 32]
        x = torch.where(torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        yield data.device_transform(x, mean, std, (), None), None


def benchmark_loader(data_dir: Path, device: torch.device, batch_size: int, workers: int | None, aug: str) -> dict:
    """Part 1, at the full run's batch even under --quick (a small batch times FFCV's per-batch overhead)."""
    meta = data.ensure_valid(data_dir)
    workers, note = data.check_workers(workers)  # resolved here, so the record holds the count used
    if note:
        print(f"note: {note}", file=sys.stderr)
    ours = data.make_loader("train", batch_size, device, aug, workers=workers, data_dir=data_dir)
    first_s, _ = timed(lambda: images_per_s(ours, device), device)  # the first epoch loads or compiles the decoders
    ours_rate = statistics.median(images_per_s(ours, device) for _ in range(LOADER_REPS))
    n = meta["counts"]["train"]
    images, labels = data.read_images(data_dir, "train", list(range(n))), data.beton_labels(data_dir / "train.beton")
    way = torchvision_way(images, labels, meta["mean"], meta["std"], workers, batch_size, device)
    def tv():  # each pass copies to the device, non_blocking from the fresh (pinned) tensors each batch gets
        return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in way)
    images_per_s(tv(), device, -(-2048 // batch_size))  # starts the workers
    tv_rate = statistics.median(images_per_s(tv(), device, -(-min(n, 20_000) // batch_size))
                                for _ in range(LOADER_REPS))
    on_device = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    mean, std = data.channel_tensor(meta["mean"], device), data.channel_tensor(meta["std"], device)
    ceiling = statistics.median(images_per_s(in_memory_ceiling(on_device, mean, std, batch_size), device)
                                for _ in range(LOADER_REPS))
    return {"images": n, "batch_size": batch_size, "workers": workers, "ours_img_per_s": round(ours_rate),
            "torchvision_img_per_s": round(tv_rate), "ceiling_img_per_s": round(ceiling),
            "ratio": round(round(ours_rate) / round(tv_rate), 2),  # the ratio of the figures shown
            "first_epoch_s": first_s, "jit_s": max(0.0, first_s - ours.num_samples / ours_rate)}


# --- the record ---

def summarise(record: dict) -> None:
    """The figures plot.py and readers look for, derived from the measured ones."""
    archs, flops, peaks = record["archs"], record["flops_per_image"], record["peak_flops"]
    def per_mode(value) -> dict:  # {label: {mode: value(label, that mode's result)}}
        return {label: {name: value(label, r) for name, r in a["modes"].items()} for label, a in archs.items()}
    steps = record["train_step"] = per_mode(lambda label, r: r["img_per_s"])
    record["achieved_flops"] = per_mode(lambda label, r: flops[label] * r["img_per_s"])
    record["peak_fraction"] = per_mode(lambda label, r: flops[label] * r["img_per_s"] / peaks[r["amp"]])
    if record["device"].startswith("cuda"):
        record["peak_memory_mb"] = per_mode(lambda label, r: r["peak_memory_mb"])
    # A compiled mode's first step minus a steady one: the first such mode's, as the default's graphs may
    # already sit in Inductor's cache from its compile probe.
    compiled = {label: [r for r in a["modes"].values() if r["compile"]] for label, a in archs.items()}
    record["compile_time_s"] = {label: max(0.0, c[0]["first_step_s"] - c[0]["step_s"])
                                for label, c in compiled.items() if c}
    record["speedup"] = {label: m["default"] / m["eager_fp32"] for label, m in steps.items()
                         if "default" in m and "eager_fp32" in m}
    record["loader_ratio"] = record["loader"]["ratio"]
    if record["epoch"]:  # missing only when the epoch failed (see "failed"); plot.py then draws without it
        record["loader_overhead"] = record["epoch"]["loader_s"] / record["epoch"]["in_memory_s"]


def startup(record: dict, imports_s: float, checks_s: float, loader_s: float) -> dict | None:
    """What train.py's run.startup_s splits, for the epoch part's arch in the default mode: the loader's JIT
    is its first epoch less a steady one, the compile time its first step less a steady one."""
    default = record["archs"].get(EPOCH_ARCH, {}).get("modes", {}).get(EPOCH_MODE)
    if default is None:
        return None
    probes = record["archs"][EPOCH_ARCH]["default_switches"]["probe_time_s"]  # set wherever the default ran
    return {"arch": EPOCH_ARCH, "imports": imports_s, "data_checks": checks_s, "loaders": loader_s,
            "jit": record["loader"]["jit_s"], "probes": probes,
            "compile": max(0.0, default["first_step_s"] - default["step_s"]) if default["compile"] else 0.0}


def loader_line(loader: dict) -> str:
    return (f"loader, {loader['images']:,} images, batch {loader['batch_size']}, {loader['workers']} workers: ours "
            f"{loader['ours_img_per_s']:,} img/s | torchvision DataLoader {loader['torchvision_img_per_s']:,} img/s | "
            f"ratio {loader['ratio']:.2f}x | in-memory ceiling {loader['ceiling_img_per_s']:,} img/s")


def print_table(record: dict) -> None:
    """The train-step table, a row per label with its columns sized to fit, then the rest of the figures."""
    modes, memory, epoch = list(record["modes"]), record["peak_memory_mb"], record["epoch"]
    def cell(value, template: str, scale: float = 1) -> str:
        return "-" if value is None else template.format(value / scale)
    rows = [["arch", *modes, "speedup", "default is", "compile_s", "GFLOP/img", "TFLOP/s", "% peak", "GB"]]
    for label, rates in record["train_step"].items():
        d = record["archs"][label]["modes"].get("default")
        rows.append([label, *(cell(rates.get(m), "{:,.0f}") for m in modes),
                     cell(record["speedup"].get(label), "{:.2f}x"),
                     f"{d['amp']} {'channels-last' if d['channels_last'] else 'NCHW'} "
                     f"{'compiled' if d['compile'] else 'eager'}" if d else "-",
                     cell(record["compile_time_s"].get(label), "{:.1f}"),
                     cell(record["flops_per_image"][label], "{:.3f}", 1e9),
                     cell(record["achieved_flops"][label].get("default"), "{:.3f}", 1e12),
                     cell(record["peak_fraction"][label].get("default"), "{:.1%}"),
                     cell(memory.get(label, {}).get("default"), "{:.2f}", 1024)])
    print(f"\n{record['device_name']} ({record['device']}), {record['threads']} threads, batch {record['batch_size']}"
          + ", quick" * record["quick"] + "\n" + loader_line(record["loader"]))
    print(f"\ntrain step, images/s (median of {record['reps']} reps; compile time excluded, shown apart)")
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    for row in rows:  # text columns to the left, figures to the right; GB on CUDA only
        print("  ".join(c.ljust(w) if i in (0, len(modes) + 2) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row[:None if memory else -1], widths, strict=False))))
    for label, problem in record["failed"].items():
        print(f"  failed: {label}: {problem}")
    print("  (TFLOP/s and % peak: the default mode's, every mode's in the JSON; a default of fp32 NCHW eager is "
          "eager_fp32 timed again)")
    if epoch:
        print(f"\nepoch of {epoch['arch']} {epoch['mode']}, {epoch['batches']} batches: fed by our loader "
              f"{epoch['loader_s']:.2f} s | from memory {epoch['in_memory_s']:.2f} s | loader overhead "
              f"{record['loader_overhead']:.2f}x")
    if record["startup_s"]:
        print(f"start-up of train.py's default mode, {EPOCH_ARCH}: " + ", ".join(
            f"{k.replace('_', ' ')} {v:.1f} s" for k, v in record["startup_s"].items() if k != "arch"))
    peaks = " | ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in record["peak_flops"].items())
    print(f"peak, {PEAK_MATMUL_SIZE}x{PEAK_MATMUL_SIZE} matmul: {peaks}")


def save(folder: Path, record: dict) -> int:
    record["load_average"]["end"] = os.getloadavg()[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{platform.node()}-{time.strftime('%Y-%m-%d')}.json"
    data.save_json_atomic(path, record)
    print(f"\n-> {path}")
    return 0


# --- the run ---

def main(argv: list[str] | None = None) -> int:
    speed.check_torch()
    args, device, modes = parse_args(argv)
    env, threads, load = train.environment(device), torch.get_num_threads(), os.getloadavg()[0]
    default = "all on (auto on CUDA)" if device.type == "cuda" else "train.py's auto, probed per arch"
    print(f"bench: {env['device_name']} ({device}), {threads} threads, batch {args.batch_size}, modes "
          f"{', '.join(modes)}; default mode {default}; load average {load:.2f}", flush=True)
    if device.type == "cpu" and load > 0.5:
        print(f"bench: warning: load average {load:.1f} over the last minute: CPU figures will be noisy, and far "
              "too slow whenever another process holds a core that one of torch's threads waits for", flush=True)
    record = {"created_at": train.now(), "host": platform.node(), "device": str(device), "env": env,
              "device_name": env["device_name"], "threads": threads, "load_average": {"start": load, "end": None},
              "command": args.command}
    try:  # first: a bad data dir or fraction fails before any timing
        checks_s, _ = timed(lambda: data.ensure_valid(args.data_dir), device)
        loader_s, epoch_loader = timed(lambda: data.make_loader(
            "train", args.batch_size, device, args.aug, fraction=args.epoch_fraction, workers=args.workers,
            data_dir=args.data_dir), device)
    except ValueError as error:
        raise SystemExit(f"error: epoch part: {error} (bench.py's flag is --epoch-fraction)") from None
    except data.DataError as error:
        raise SystemExit(f"error: {error}") from None
    record["loader"] = benchmark_loader(args.data_dir, device, args.loader_batch_size, args.workers, args.aug)
    print(loader_line(record["loader"]), flush=True)
    if args.loader_only:
        return save(args.out / "loader", record)
    record.update({k: getattr(args, k) for k in ("batch_size", "quick", "reps", "steps_per_rep", "warmup_steps")},
                  modes={name: {k: "auto" if v is None else v for k, v in m.items()} for name, m in modes.items()},
                  flops_per_image={}, peak_flops={}, epoch=None, peak_memory_mb={}, archs={}, failed={})
    # train.py's own defaults at this batch: optimiser, lr for this batch size, warm-up, label smoothing
    args.recipe = train.parse_config(["--batch-size", str(args.batch_size), "--quiet"])
    args.recipe.batch_size_per_rank = args.batch_size
    args.nominal_steps = record["loader"]["images"] // args.batch_size or 1  # one epoch, for the lr warm-up
    if any(mode["compile"] for mode in modes.values()):
        try:  # torch.compile's one-time start-up (imports, workers) first, so each model's compile time is its own
            torch.compile(lambda x: torch.relu(x) * 2, dynamic=False)(torch.randn(8, device=device))
        except RuntimeError:
            pass  # no working compiler here: each compiled mode reports it as its failure
    for label in args.archs:
        measure_label(record, label, modes, device, args, epoch_loader)
    if record["epoch"] is None and f"{EPOCH_ARCH} {EPOCH_MODE}" not in record["failed"]:  # arch or mode left out
        try:
            epoch = ready(EPOCH_ARCH, MODES[EPOCH_MODE], device, args.recipe, args.nominal_steps)[0]
            record["epoch"] = time_epochs(epoch, epoch_loader, args)
        except RuntimeError as error:
            record["failed"]["epoch"] = first_line(error)
    release_memory(device)
    used = {r["amp"] for a in record["archs"].values() for r in a["modes"].values()} | {"fp32"}
    record["peak_flops"] = {name: matmul_peak(device, speed.AMP_DTYPES[name] or torch.float32, args.reps)
                            for name in sorted(used)}
    record["startup_s"] = startup(record, IMPORTS_S, checks_s, loader_s)
    summarise(record)
    print_table(record)
    return save(args.out, record)


if __name__ == "__main__":
    sys.exit(main())
