"""How fast does each config train on this machine, and where does the time go?

    python bench.py                        # everything, batch 512 (meant for a GPU; long on a CPU)
    python bench.py --quick                # a few minutes on a laptop CPU (see --help)
    python bench.py --archs resnet18,resnet18-imagenet --device cuda:1
    python bench.py --loader-only          # our loader against the torchvision DataLoader way, alone

Measured in one run on the same data, into results/bench/<host>-<date>.json, each figure the median
of --reps timed repetitions after warm-up, the device synchronised around each:
1. the loader alone: ours, the usual torchvision DataLoader over PIL images (the same workers, batch and
   copy to the device) and an in-memory ceiling, in images/s; `loader_ratio` = ours / torchvision.
2. train.py's training step per label ("resnet18-imagenet": the imagenet stem) on batches already on
   the device, in images/s: eager_fp32, each switch alone (channels_last, amp_bf16, amp_fp16 on a GPU
   without bf16, compile) and default, what train.py's auto runs here (archs.<label>.default_switches);
   `speedup` = default / eager_fp32; compile time is kept out of every rate, shown as `compile_s`.
3. an epoch of resnet20 in default mode fed by our loader and by the same batches from memory:
   `loader_overhead` = the first / the second (1.00: the loader hides behind the device's work).
4. FLOPs per image (FlopCounterMode, forward+backward), achieved FLOP/s, and `% peak` of a 2048² matmul
   in the mode's dtype (fp32 convolutions run in TF32 on Ampere and later: fp32 can pass 100%).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data
import models
import speed
import train

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
LOADER_ONLY_KEYS = ("created_at", "host", "device", "device_name", "threads", "load_average", "env", "command",
                    "loader")


def build_parser() -> argparse.ArgumentParser:
    quick = (f"batch {QUICK['batch_size']}, {QUICK['reps']} reps of {QUICK['steps_per_rep']} steps after "
             f"{QUICK['warmup_steps']} warm-up step, archs {', '.join(QUICK['archs'])}, the epoch part on "
             f"{QUICK['epoch_fraction'] * 100:g}%% of the train set, each unless its own flag is given; the loader "
             f"comparison is unchanged (the whole train set, batch {BATCH_SIZE} unless --batch-size is given)")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=data.DATA_DIR, type=Path,
                   help=f"folder with train.beton, test.beton, meta.json (default {data.DATA_DIR})")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one; the default), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default {BATCH_SIZE})")
    p.add_argument("--archs", type=train.csv_of(str), default=None,
                   help=f"comma list of labels: an arch of models.py, plus '-imagenet' for its imagenet stem "
                        f"(default {', '.join(ARCHS)})")
    p.add_argument("--reps", type=int, default=None, help=f"timed repetitions per figure (default {REPS})")
    p.add_argument("--modes", type=train.csv_of(str), default=None,
                   help="comma list of the modes to time, from eager_fp32, channels_last, amp_bf16, compile, default "
                        "(and amp_fp16 on a GPU without bf16); default all")
    p.add_argument("--epoch-fraction", type=float, default=None,
                   help="class-balanced fraction of the train set in the epoch part (default 1)")
    p.add_argument("--aug", default=data.DEFAULT_AUG,
                   help="augmentation of the loader and epoch parts (as train.py's --aug)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="FFCV loader workers (default: the CPUs this process may use, at most 8)")
    p.add_argument("--quick", action="store_true", help=f"a few minutes on a CPU: {quick}")
    p.add_argument("--loader-only", action="store_true",
                   help="time only the loaders (part 1); writes OUT/loader/<host>-<YYYY-MM-DD>.json")
    p.add_argument("--out", type=Path, default=OUT, help=f"folder for <host>-<YYYY-MM-DD>.json (default {OUT})")
    return p


def positive_int(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return int(text)


class Mode(NamedTuple):
    channels_last: bool
    dtype: str  # "fp32", "bf16" or "fp16", as train.py's --amp
    compile: bool


AUTO = Mode(None, None, None)  # the default mode before train.py's auto has decided it for an arch


class Setup(NamedTuple):
    """A model ready to train in one mode, with train.py's optimiser, schedule and loss scaling."""
    model: torch.nn.Module  # compiled or not
    mode: Mode
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def modes_for(device: torch.device) -> dict[str, Mode]:
    """The usual way, each switch alone, and train.py's default, in the order the table shows them."""
    modes = {"eager_fp32": Mode(False, "fp32", False), "channels_last": Mode(True, "fp32", False),
             "amp_bf16": Mode(False, "bf16", False)}
    if device.type == "cuda" and not speed.has_real_bf16():
        modes["amp_fp16"] = Mode(False, "fp16", False)
    return {**modes, "compile": Mode(False, "fp32", True), "default": AUTO}


def build(label: str, device: torch.device) -> torch.nn.Module:
    """'resnet18-imagenet' is resnet18 with the imagenet stem; 'resnet20' has the cifar stem."""
    arch, stem = next(((label[: -len(s) - 1], s) for s in models.STEMS if label.endswith(f"-{s}")), (label, "cifar"))
    torch.manual_seed(0)
    return models.build_model(arch, stem=stem).to(device)


def ready(label: str, mode: Mode, device: torch.device, args: argparse.Namespace, batch_size: int,
          nominal_steps: int) -> tuple[Setup, dict | None]:
    """A fresh model of `label` set up in `mode`; for AUTO, in what train.py's own functions choose for
    it here (fixed on CUDA; on CPU its probes), returned too."""
    torch._dynamo.reset()  # each model compiles from scratch, and no stale graph holds memory
    switches = None
    if mode == AUTO:
        model = build(label, device)
        switches = speed.choose_switches(args, model, device)
        if switches["compile"] is None:
            model = model.to(memory_format=speed.memory_format(switches["channels_last"]))
            speed.keep_compile_if_faster(switches, torch.compile(model, dynamic=False), model, model, device,
                                         batch_size)
        mode = Mode(switches["channels_last"], switches["amp"], switches["compile"])
        torch._dynamo.reset()
    raw = build(label, device).to(memory_format=speed.memory_format(mode.channels_last))
    optimizer = train.make_optimizer(raw, args)
    return Setup(torch.compile(raw, dynamic=False) if mode.compile else raw, mode, optimizer,
                 train.make_scheduler(optimizer, args, nominal_steps),
                 torch.amp.GradScaler(device.type, enabled=mode.dtype == "fp16")), switches


def timed_epoch(setup: Setup, batches, device: torch.device, args: argparse.Namespace) -> float:
    """Seconds for train.py's epoch over `batches`, the device synchronised at both ends."""
    speed.synchronize(device)
    start = time.perf_counter()
    loss = train.train_one_epoch(setup.model, batches, setup.optimizer, setup.scheduler, setup.scaler, setup.mode.dtype,
                                 speed.memory_format(setup.mode.channels_last), device, args, 1, "bench")[0]
    speed.synchronize(device)
    if not math.isfinite(loss):  # train_one_epoch stops a diverged epoch early: its time would be short
        raise RuntimeError("the loss diverged while timing: the figure would be of a shortened epoch")
    return time.perf_counter() - start


def time_train_step(setup: Setup, device: torch.device, args: argparse.Namespace, plan: dict) -> dict:
    """img/s of the steady step (median over reps) and the first step's time (compiling, if any)."""
    batch = speed.dummy_batch(plan["batch_size"], device, speed.memory_format(setup.mode.channels_last))
    first = timed_epoch(setup, [batch], device, args)
    timed_epoch(setup, [batch] * plan["warmup_steps"], device, args)
    reps = [timed_epoch(setup, [batch] * plan["steps_per_rep"], device, args) / plan["steps_per_rep"]
            for _ in range(plan["reps"])]
    step = statistics.median(reps)
    result = {"img_per_s": round(plan["batch_size"] / step, 1), "step_s": step, "first_step_s": first,
              "rep_step_s": reps, **setup.mode._asdict()}
    if device.type == "cuda":
        result["peak_memory_mb"] = speed.peak_memory_mb(device)
    return result


def time_epochs(setup: Setup, loader: data.DeviceLoader, device: torch.device, args: argparse.Namespace,
                plan: dict) -> dict:
    """Epoch time fed by our loader and fed the same batches from the device's memory, interleaved."""
    # The loader's first epoch pays numba's JIT compilation; its batches, kept, feed the in-memory epochs.
    in_memory = [(images.clone(), labels.clone()) for images, labels in loader]
    timed_epoch(setup, in_memory[:1], device, args)  # compiles, if this model has not run yet
    loader_s, memory_s = [], []
    for _ in range(plan["reps"]):
        loader_s.append(timed_epoch(setup, loader, device, args))
        memory_s.append(timed_epoch(setup, in_memory, device, args))
    return {"arch": EPOCH_ARCH, "mode": EPOCH_MODE, "batches": len(in_memory), "images": loader.num_samples,
            "loader_s": statistics.median(loader_s), "in_memory_s": statistics.median(memory_s),
            "loader_rep_s": loader_s, "in_memory_rep_s": memory_s, "batch_size": plan["batch_size"],
            "fraction": plan["epoch_fraction"]}


def train_flops_per_image(model: torch.nn.Module, device: torch.device) -> float:
    """Forward+backward FLOPs per image of one training step, as FlopCounterMode counts them."""
    images = torch.randn(FLOP_COUNT_BATCH, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (FLOP_COUNT_BATCH,), device=device)
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / FLOP_COUNT_BATCH


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int) -> float:
    """FLOP/s of a square matmul: the ceiling this device reaches in this dtype."""
    n = PEAK_MATMUL_SIZE
    a, b, out = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))

    def run(count: int) -> float:
        speed.synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            torch.matmul(a, b, out=out)
        speed.synchronize(device)
        return time.perf_counter() - start

    run(1)
    count = max(1, round(PEAK_REP_S / run(1)))
    return 2 * n**3 * count / statistics.median(run(count) for _ in range(reps))


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    speed.reset_peak_memory(device)


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def measure_label(record: dict, label: str, modes: dict[str, Mode], device: torch.device, args: argparse.Namespace,
                  plan: dict, nominal_steps: int, epoch_loader: data.DeviceLoader) -> None:
    """Parts 2 and 3 for one label, a line per mode (out of memory, a dtype the device lacks: its failure);
    the epoch as soon as its mode's model is compiled and warm."""
    model = build(label, device)
    record["flops_per_image"][label] = train_flops_per_image(model, device)
    details = record["archs"][label] = {"params": models.count_parameters(model),
                                        "forward_flops": models.forward_flops(model), "modes": {},
                                        "default_switches": None}
    del model
    for name, mode in modes.items():
        release_memory(device)
        try:
            setup, switches = ready(label, mode, device, args, plan["batch_size"], nominal_steps)
            details["default_switches"] = switches or details["default_switches"]
            result = details["modes"][name] = time_train_step(setup, device, args, plan)
            if (label, name) == (EPOCH_ARCH, EPOCH_MODE):
                record["epoch"] = time_epochs(setup, epoch_loader, device, args, plan)
        except RuntimeError as error:
            details["modes"].pop(name, None)
            record["failed"][f"{label} {name}"] = first_line(error)
            print(f"{label:<18} {name:<14} failed: {first_line(error)}", flush=True)
            continue
        finally:
            setup = None  # the model and its graphs go before the next mode's
        print(f"{label:<18} {name:<14} {result['img_per_s']:>10,.0f} img/s  first step {result['first_step_s']:.1f} s",
              flush=True)


# --- 1. the loader alone, against the way such comparisons are usually written ---

def time_epoch(batches, device: torch.device, limit: int | None = None) -> float:
    """Images per second over one pass (or the first `limit` images), until `device` has them all."""
    start, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += len(images)
        if limit and seen >= limit:
            break
    if device.type == "cuda":  # this device only: another GPU's work is not the benchmark's
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def torchvision_way(images: np.ndarray, labels: np.ndarray, mean: list[float], std: list[float], workers: int,
                    batch_size: int, device: torch.device):
    """A DataLoader over PIL images, as torchvision.datasets.CIFAR10 serves them, with our workers, batch
    size and transfer (pinned memory on CUDA, non_blocking copies)."""
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


def moved_to(batches, device: torch.device):
    """The batches on `device`, copied as our loader's ToDevice copies them."""
    for images, labels in batches:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def in_memory_ceiling(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch_size: int):
    """The same augmentation as batched tensor ops on data already on the device: an upper bound."""
    n = len(images)
    for _ in range(n // batch_size):
        x = images[torch.randint(0, n, (batch_size,), device=images.device)]
        x = torch.nn.functional.pad(x, (data.TRANSLATE_PX,) * 4)
        dy, dx = np.random.randint(0, 2 * data.TRANSLATE_PX + 1, 2)  # one shift per batch: a generous ceiling
        x = x[:, :, dy:dy + 32, dx:dx + 32]
        x = torch.where(torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        yield data.device_transform(x, mean, std, (), None), None


def benchmark_loader(data_dir: Path, device: torch.device, batch_size: int = BATCH_SIZE, workers: int | None = None,
                     aug: str = data.DEFAULT_AUG) -> dict:
    """Part 1, at the full run's batch even under --quick (a small batch times FFCV's per-batch overhead)."""
    threads, meta = torch.get_num_threads(), data.ensure_valid(data_dir)
    workers, note = data.check_workers(workers)  # resolved here, so the record holds the count used
    if note:
        print(f"note: {note}", file=sys.stderr)
    ours = data.make_loader("train", batch_size, device, aug, workers=workers, data_dir=data_dir)
    time_epoch(ours, device)  # the first epoch pays numba's JIT compilation
    ours_rate = statistics.median(time_epoch(ours, device) for _ in range(LOADER_REPS))
    n = meta["counts"]["train"]
    images, labels = data.read_images(data_dir, "train", list(range(n))), data.beton_labels(data_dir / "train.beton")
    tv = torchvision_way(images, labels, meta["mean"], meta["std"], workers, batch_size, device)
    time_epoch(moved_to(tv, device), device, limit=2048)  # start the workers
    tv_rate = statistics.median(time_epoch(moved_to(tv, device), device, limit=min(n, 20_000))
                                for _ in range(LOADER_REPS))
    on_device = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    mean, std = data.channel_tensor(meta["mean"], device), data.channel_tensor(meta["std"], device)
    ceiling = statistics.median(time_epoch(in_memory_ceiling(on_device, mean, std, batch_size), device)
                                for _ in range(LOADER_REPS))
    torch.set_num_threads(threads)  # FFCV resets torch's thread count
    return {"images": n, "batch_size": batch_size, "workers": workers, "ours_img_per_s": round(ours_rate),
            "torchvision_img_per_s": round(tv_rate), "ceiling_img_per_s": round(ceiling),
            "ratio": round(round(ours_rate) / round(tv_rate), 2)}  # the ratio of the figures shown


# --- the record ---

def summarise(record: dict) -> None:
    """The figures plot.py and readers look for, derived from the measured ones."""
    archs = record["archs"]
    steps = record["train_step"] = {label: {name: r["img_per_s"] for name, r in a["modes"].items()}
                                    for label, a in archs.items()}
    if record["device"].startswith("cuda"):
        record["peak_memory_mb"] = {label: {name: r["peak_memory_mb"] for name, r in a["modes"].items()}
                                    for label, a in archs.items()}
    # A compiled mode's first step minus a steady one; the first such mode, as the default's graphs
    # may already sit in Inductor's cache from its compile probe.
    compiled = {label: [r for r in a["modes"].values() if r["compile"]] for label, a in archs.items()}
    record["compile_time_s"] = {label: max(0.0, c[0]["first_step_s"] - c[0]["step_s"])
                                for label, c in compiled.items() if c}
    record["speedup"] = {label: m["default"] / m["eager_fp32"] for label, m in steps.items()
                         if "default" in m and "eager_fp32" in m}
    record["achieved_flops"] = {label: {name: record["flops_per_image"][label] * rate for name, rate in m.items()}
                                for label, m in steps.items()}
    record["peak_fraction"] = {label: {name: flops / record["peak_flops"][archs[label]["modes"][name]["dtype"]]
                                       for name, flops in m.items()}
                               for label, m in record["achieved_flops"].items()}
    record["loader_ratio"] = record["loader"]["ratio"]
    if record["epoch"]:  # missing only when the epoch failed (see "failed"); plot.py then draws without it
        record["loader_overhead"] = record["epoch"]["loader_s"] / record["epoch"]["in_memory_s"]


def loader_line(loader: dict) -> str:
    return (f"loader, {loader['images']:,} images, batch {loader['batch_size']}, {loader['workers']} workers: ours "
            f"{loader['ours_img_per_s']:,} img/s | torchvision DataLoader {loader['torchvision_img_per_s']:,} img/s | "
            f"ratio {loader['ratio']:.2f}x | in-memory ceiling {loader['ceiling_img_per_s']:,} img/s")


def print_table(record: dict) -> None:
    epoch, modes, memory = record["epoch"], list(record["modes"]), record["peak_memory_mb"]
    print(f"\n{record['device_name']} ({record['device']}), {record['threads']} threads, batch {record['batch_size']}"
          + (", quick" if record["quick"] else "") + "\n" + loader_line(record["loader"]))
    print(f"\ntrain step, images/s (median of {record['reps']} reps; compile time excluded, shown apart)")
    print(f"{'arch':<18}" + "".join(f"{m:>14}" for m in modes) + f"{'speedup':>9}  {'default is':<24}{'compile_s':>10}"
          f"{'GFLOP/img':>10}{'TFLOP/s':>9}{'% peak':>8}" + f"{'GB':>7}" * bool(memory))
    for label, m in record["train_step"].items():
        default = record["archs"][label]["modes"].get("default")
        row = f"{label:<18}" + "".join(f"{m[mode]:>14,.0f}" if mode in m else f"{'-':>14}" for mode in modes)
        row += f"{record['speedup'][label]:>8.2f}x" if label in record["speedup"] else f"{'-':>9}"
        row += "  " + (f"{default['dtype']} {'channels-last' if default['channels_last'] else 'NCHW'} "
                       f"{'compiled' if default['compile'] else 'eager'}" if default else "-").ljust(24)
        row += f"{record['compile_time_s'][label]:>10.1f}" if label in record["compile_time_s"] else f"{'-':>10}"
        row += f"{record['flops_per_image'][label] / 1e9:>10.3f}"
        if default:
            row += (f"{record['achieved_flops'][label]['default'] / 1e12:>9.3f}"
                    f"{record['peak_fraction'][label]['default']:>8.1%}")
            row += f"{memory[label]['default'] / 1024:>7.2f}" if memory else ""
        print(row)
    for label, problem in record["failed"].items():
        print(f"  failed: {label}: {problem}")
    print("  (TFLOP/s and % peak: the default mode's, every mode's in the JSON; a default of fp32 NCHW eager is "
          "eager_fp32 timed again)")
    if epoch:
        print(f"\nepoch of {epoch['arch']} {epoch['mode']}, {epoch['batches']} batches: fed by our loader "
              f"{epoch['loader_s']:.2f} s | from memory {epoch['in_memory_s']:.2f} s | loader overhead "
              f"{record['loader_overhead']:.2f}x")
    peaks = " | ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in record["peak_flops"].items())
    print(f"peak, {PEAK_MATMUL_SIZE}x{PEAK_MATMUL_SIZE} matmul: {peaks}")


def save_record(folder: Path, record: dict, show) -> int:
    record["load_average"]["end"] = os.getloadavg()[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{platform.node()}-{datetime.date.today():%Y-%m-%d}.json"
    data.save_json_atomic(path, record)
    show(record)
    print(f"\n-> {path}")
    return 0


# --- the run ---

def parse_bench_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict, torch.device, dict[str, Mode]]:
    """The flags, the plan (flags, then --quick's values, then the full run's), the device and the modes
    to time; a bad flag stops here, before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = sys.argv[1:] if argv is None else argv
    plan = {"batch_size": BATCH_SIZE, "reps": REPS, "steps_per_rep": STEPS_PER_REP, "warmup_steps": WARMUP_STEPS,
            "archs": ARCHS, "epoch_fraction": 1.0, **(QUICK if args.quick else {})}
    plan.update({key: getattr(args, key) for key in ("batch_size", "reps", "archs", "epoch_fraction")
                 if getattr(args, key) is not None})
    if plan["batch_size"] < 2:
        parser.error(f"--batch-size must be at least 2 (train-mode BatchNorm), got {plan['batch_size']}")
    if plan["reps"] < 1:
        parser.error(f"--reps must be at least 1, got {plan['reps']}")
    if not 0 < plan["epoch_fraction"] <= 1:
        parser.error(f"--epoch-fraction must be in (0, 1], got {plan['epoch_fraction']}")
    for label in plan["archs"]:
        try:
            build(label, torch.device("cpu"))
        except ValueError as error:
            parser.error(f"--archs {label}: {error}")
    device = speed.resolve_device(args.device, None)
    all_modes = modes_for(device)
    unknown = [m for m in args.modes or () if m not in all_modes]
    if unknown:
        parser.error(f"--modes {unknown[0]}: choose from {', '.join(all_modes)}")
    return args, plan, device, {name: m for name, m in all_modes.items() if args.modes is None or name in args.modes}


def start_record(args: argparse.Namespace, plan: dict, device: torch.device, modes: dict[str, Mode]) -> dict:
    """The record's description of this machine and run, printed first (with a warning on a busy CPU)."""
    env, threads, load, bs = train.environment(device), torch.get_num_threads(), os.getloadavg()[0], plan["batch_size"]
    default = "all on (auto on CUDA)" if device.type == "cuda" else "train.py's auto, probed per arch"
    print(f"bench: {env['device_name']} ({device}), {threads} threads, batch {bs}, modes {', '.join(modes)}; "
          f"default mode {default}; load average {load:.2f}", flush=True)
    if device.type == "cpu" and load > 0.5:
        print(f"bench: warning: load average {load:.1f} over the last minute: CPU figures will be noisy, and far "
              "too slow whenever another process holds a core that one of torch's threads waits for", flush=True)
    return {"created_at": train.now(), "host": platform.node(), "device": str(device),
            "device_name": env["device_name"], "threads": threads, "batch_size": bs, "quick": args.quick,
            "reps": plan["reps"], "steps_per_rep": plan["steps_per_rep"], "warmup_steps": plan["warmup_steps"],
            "load_average": {"start": load, "end": None}, "env": env, "command": args.command,
            "modes": {name: {k: "auto" if v is None else v for k, v in m._asdict().items()}
                      for name, m in modes.items()},
            "loader": None, "flops_per_image": {}, "peak_flops": {}, "epoch": None, "peak_memory_mb": {},
            "archs": {}, "failed": {}}


def main(argv: list[str] | None = None) -> int:
    speed.check_torch()
    args, plan, device, modes = parse_bench_args(argv)
    record = start_record(args, plan, device, modes)
    try:  # first: a bad data dir or fraction fails before any timing
        epoch_loader = data.make_loader("train", plan["batch_size"], device, args.aug, fraction=plan["epoch_fraction"],
                                        workers=args.workers, data_dir=args.data_dir)
    except ValueError as error:
        raise SystemExit(f"error: epoch part: {error} (bench.py's flag is --epoch-fraction)") from None
    except data.DataError as error:
        raise SystemExit(f"error: {error}") from None
    record["loader"] = benchmark_loader(args.data_dir, device, args.batch_size or BATCH_SIZE, args.workers, args.aug)
    print(loader_line(record["loader"]), flush=True)
    if args.loader_only:
        return save_record(args.out / "loader", {k: record[k] for k in LOADER_ONLY_KEYS}, lambda r: None)
    # train.py's own defaults at this batch: optimiser, lr for this batch size, warm-up, label smoothing
    train_args = train.parse_config(["--batch-size", str(plan["batch_size"]), "--quiet"])
    train_args.batch_size_per_rank = plan["batch_size"]
    nominal_steps = record["loader"]["images"] // plan["batch_size"] or 1  # one epoch, for the lr warm-up
    if any(mode.compile for mode in modes.values()):
        try:  # torch.compile's one-time start-up (imports, workers) first, so each model's compile time is its own
            torch.compile(lambda x: torch.relu(x) * 2, dynamic=False)(torch.randn(8, device=device))
        except RuntimeError:
            pass  # no working compiler here: each compiled mode reports it as its failure
    for label in plan["archs"]:
        measure_label(record, label, modes, device, train_args, plan, nominal_steps, epoch_loader)
    if record["epoch"] is None and f"{EPOCH_ARCH} {EPOCH_MODE}" not in record["failed"]:  # arch or mode left out
        try:
            setup, _ = ready(EPOCH_ARCH, modes_for(device)[EPOCH_MODE], device, train_args, plan["batch_size"],
                             nominal_steps)
            record["epoch"] = time_epochs(setup, epoch_loader, device, train_args, plan)
        except RuntimeError as error:
            record["failed"]["epoch"] = first_line(error)
    release_memory(device)
    used = {r["dtype"] for a in record["archs"].values() for r in a["modes"].values()} | {"fp32"}
    record["peak_flops"] = {name: matmul_peak(device, speed.AMP_DTYPES[name] or torch.float32, plan["reps"])
                            for name in sorted(used)}
    summarise(record)
    return save_record(args.out, record, print_table)


if __name__ == "__main__":
    sys.exit(main())
