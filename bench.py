"""How fast does each config train on this machine, and where does the time go?

    python bench.py                        # everything, batch 512 (meant for a GPU; long on a CPU)
    python bench.py --quick                # a few minutes on a laptop CPU (see --help)
    python bench.py --archs resnet18,resnet18-imagenet --device cuda:1
    python bench.py --loader-only          # our loader against the torchvision DataLoader way, alone

One run measures, on the same machine and data, and writes results/bench/<host>-<date>.json:

1. Loader alone (benchmark_loader; `--loader-only` runs only this part): our FFCV loader, the usual
   torchvision DataLoader over PIL images, and an in-memory ceiling, in images/s. `loader_ratio` =
   ours / torchvision.
2. Training step per architecture label ("resnet18" is the cifar stem, "resnet18-imagenet" the
   imagenet stem), in images/s of train.py's own step (train.train_one_epoch: forward, loss,
   backward, SGD step) on synthetic batches already on the device. The columns are modes:
     eager_fp32     the usual way: NCHW, fp32, no torch.compile
     channels_last  eager_fp32 with the model and inputs in channels-last layout
     amp_bf16       eager_fp32 under bf16 autocast (on a GPU without bf16, also amp_fp16: what
                    train.py's --amp auto picks there, with loss scaling)
     compile        eager_fp32 with torch.compile(dynamic=False)
     default        what train.py runs by default, decided by train.py's own auto functions: on
                    CUDA channels-last, bf16 (fp16 without bf16) and compiled; on CPU, per arch,
                    the fastest dtype x layout of its eager probes, compiled only if its compiled
                    steps beat eager ones (archs.<label>.default_switches holds the probes)
   Each switch alone against eager_fp32 shows its own gain; `speedup` = default / eager_fp32.
   Compile time is excluded from every img/s figure: `compile_s` is the first step of the first
   compiled mode minus a steady step, reported on its own (lower on a second run: Inductor caches
   on disk).
3. Whole epoch of resnet20 in default mode, fed by our loader (data.make_loader) and fed the very
   same batches from memory on the device. `loader_overhead` = loader epoch / in-memory epoch:
   1.00 means the loader hides completely behind the GPU's work.
4. Efficiency: `GFLOP/img` is forward+backward FLOPs per image (FlopCounterMode: convs and
   matmuls, 2 per multiply-add); achieved TFLOP/s = FLOPs/img x img/s; `% peak` divides it by a
   2048x2048 matmul measured in the same run, in the mode's dtype (fp32 or bf16). On Ampere and
   later, cuDNN runs fp32 convolutions in TF32 by default while the fp32 matmul peak is plain
   fp32 (torch's default), so fp32 modes can show more than 100%. Small CIFAR nets reach a small
   fraction of peak: their layers are too narrow to fill a GPU, which is what compile and larger
   batches help with.

Every figure is the median of --reps timed repetitions after warm-up steps, with the device
synchronised before and after each. On CUDA the GPU's name is printed and `peak_memory_mb` holds
torch.cuda.max_memory_allocated per mode. On a shared machine, figures are as noisy as its load.
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
LOADER_REPS = 3  # timed passes per loader; the median is reported
PEAK_REP_S = 0.1  # enough matmuls per repetition to last this long (a GPU does one in well under 1 ms)
OUT = Path("results/bench")
# What --quick changes, each unless its own flag is given.
QUICK = {"batch_size": 64, "reps": 3, "steps_per_rep": 2, "warmup_steps": 1,
         "archs": ("resnet20", "resnet18-imagenet"), "epoch_fraction": 0.1}


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its default and help: a table, hence its length."""
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
    amp: str  # "fp32", "bf16" or "fp16", as train.py's --amp
    compile: bool


class Setup(NamedTuple):
    """A model ready to train in one mode, with train.py's optimiser, schedule and loss scaling."""
    model: torch.nn.Module  # compiled or not
    mode: Mode
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


AUTO = Mode(None, None, None)  # the default mode before train.py's auto has decided it for an arch


def modes_for(device: torch.device) -> dict[str, Mode]:
    """The usual way, each switch alone, and train.py's default, in the order the table shows them."""
    modes = {"eager_fp32": Mode(False, "fp32", False), "channels_last": Mode(True, "fp32", False),
             "amp_bf16": Mode(False, "bf16", False)}
    if device.type == "cuda" and not speed.has_real_bf16():
        modes["amp_fp16"] = Mode(False, "fp16", False)
    modes["compile"] = Mode(False, "fp32", True)
    modes["default"] = AUTO
    return modes


def default_mode(label: str, device: torch.device, args: argparse.Namespace, batch_size: int) -> tuple[Mode, dict]:
    """What train.py runs by default for this arch here, decided by train.py's own functions: fixed on
    CUDA; on CPU its eager probes of dtype x layout, then its compiled-vs-eager probe at this batch."""
    model = build(label, device)
    switches = speed.choose_switches(args, model, device)
    if switches["compile"] is None:
        memory = speed.memory_format(switches["channels_last"])
        model = model.to(memory_format=memory)
        speed.keep_compile_if_faster(switches, torch.compile(model, dynamic=False), model, model, device, batch_size)
    return Mode(switches["channels_last"], switches["amp"], switches["compile"]), switches


def parse_label(label: str) -> tuple[str, str]:
    """'resnet18-imagenet' -> ('resnet18', 'imagenet'); 'resnet20' -> ('resnet20', 'cifar')."""
    for stem in models.STEMS:
        if label.endswith(f"-{stem}"):
            return label[: -len(stem) - 1], stem
    return label, "cifar"


def build(label: str, device: torch.device) -> torch.nn.Module:
    arch, stem = parse_label(label)
    torch.manual_seed(0)
    return models.build_model(arch, stem=stem).to(device)


def make_setup(label: str, mode: Mode, device: torch.device, args: argparse.Namespace,
               steps_per_epoch: int) -> Setup:
    raw = build(label, device).to(memory_format=speed.memory_format(mode.channels_last))
    model = torch.compile(raw, dynamic=False) if mode.compile else raw
    optimizer = train.make_optimizer(raw, args)
    scheduler = train.make_scheduler(optimizer, args, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=mode.amp == "fp16")
    return Setup(model, mode, optimizer, scheduler, scaler)


def timed_epoch(setup: Setup, batches, device: torch.device, args: argparse.Namespace) -> float:
    """Seconds for train.py's epoch over `batches`, the device synchronised at both ends."""
    memory = speed.memory_format(setup.mode.channels_last)
    speed.synchronize(device)
    start = time.perf_counter()
    loss = train.train_one_epoch(setup.model, batches, setup.optimizer, setup.scheduler, setup.scaler,
                                 setup.mode.amp, memory, device, args, 1, "bench")[0]  # the mean loss
    speed.synchronize(device)
    elapsed = time.perf_counter() - start
    if not math.isfinite(loss):  # train_one_epoch stops a diverged epoch early: its time would be short
        raise RuntimeError("the loss diverged while timing: the figure would be of a shortened epoch")
    return elapsed


def time_train_step(setup: Setup, batch_size: int, device: torch.device, args: argparse.Namespace,
                    plan: dict) -> dict:
    """img/s of the steady step (median over reps) and the first step's time (compiling, if any)."""
    batch = speed.dummy_batch(batch_size, device, speed.memory_format(setup.mode.channels_last))
    first = timed_epoch(setup, [batch], device, args)
    timed_epoch(setup, [batch] * plan["warmup_steps"], device, args)
    reps = [timed_epoch(setup, [batch] * plan["steps_per_rep"], device, args) / plan["steps_per_rep"]
            for _ in range(plan["reps"])]
    step = statistics.median(reps)
    return {"img_per_s": round(batch_size / step, 1), "step_s": step, "first_step_s": first, "rep_step_s": reps}


def train_flops_per_image(model: torch.nn.Module, device: torch.device) -> float:
    """Forward+backward FLOPs per image of one training step, as FlopCounterMode counts them."""
    images = torch.randn(FLOP_COUNT_BATCH, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (FLOP_COUNT_BATCH,), device=device)
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / FLOP_COUNT_BATCH


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int) -> float:
    """FLOP/s of a square matmul: the ceiling this device reaches in this dtype."""
    n = PEAK_MATMUL_SIZE
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)

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


def time_epochs(setup: Setup, loader: data.DeviceLoader, device: torch.device, args: argparse.Namespace,
                reps: int) -> dict:
    """Epoch time fed by our loader and fed the same batches from the device's memory, interleaved."""
    # The loader's first epoch pays numba's JIT compilation; its batches, kept, feed the in-memory epochs.
    in_memory = [(images.clone(), labels.clone()) for images, labels in loader]
    timed_epoch(setup, in_memory[:1], device, args)  # compiles, if this model has not run yet
    loader_s, memory_s = [], []
    for _ in range(reps):
        loader_s.append(timed_epoch(setup, loader, device, args))
        memory_s.append(timed_epoch(setup, in_memory, device, args))
    return {"arch": EPOCH_ARCH, "mode": EPOCH_MODE, "batches": len(in_memory), "images": loader.num_samples,
            "loader_s": statistics.median(loader_s), "in_memory_s": statistics.median(memory_s),
            "loader_rep_s": loader_s, "in_memory_rep_s": memory_s}


def measure_label(label: str, modes: dict[str, Mode], device: torch.device, args: argparse.Namespace, plan: dict,
                  nominal_steps: int, epoch_loader: data.DeviceLoader) -> tuple[dict, dict, dict | None, dict | None]:
    """Time every mode of one label, printing a line each: (results by mode, failures by mode, the
    epoch part if this label has the epoch's mode, timed while its model is warm, and the switches
    train.py's auto chose for the default mode)."""
    results, problems, epoch, switches = {}, {}, None, None
    for name, mode in modes.items():
        torch._dynamo.reset()  # each model compiles from scratch, and no stale graph holds memory
        release_memory(device)
        try:
            if mode == AUTO:
                mode, switches = default_mode(label, device, args, plan["batch_size"])
                torch._dynamo.reset()
            setup = make_setup(label, mode, device, args, nominal_steps)
            result = time_train_step(setup, plan["batch_size"], device, args, plan)
            if device.type == "cuda":
                result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if (label, name) == (EPOCH_ARCH, EPOCH_MODE):
                epoch = time_epochs(setup, epoch_loader, device, args, plan["reps"])
        except RuntimeError as error:  # out of memory, or a dtype this device lacks
            problems[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            print(f"{label:<18} {name:<14} failed: {problems[name]}", flush=True)
            continue
        finally:
            setup = None
        results[name] = {**result, "dtype": mode.amp, "channels_last": mode.channels_last,
                         "compile": mode.compile}
        print(f"{label:<18} {name:<14} {result['img_per_s']:>10,.0f} img/s  first step {result['first_step_s']:.1f} s",
              flush=True)
    return results, problems, epoch, switches


def start_compiler(device: torch.device) -> None:
    """Pay torch.compile's one-time start-up (imports, worker pool) before the first model, so
    each model's compile time is its own."""
    torch.compile(lambda x: torch.relu(x) * 2, dynamic=False)(torch.randn(8, device=device))


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------
# 1. The loader alone: ours against the way such comparisons are usually written.
# ---------------------------------------------------------------------------------------------

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
    """A DataLoader over PIL images, as torchvision.datasets.CIFAR10 serves them, with the workers, batch
    size and transfer to `device` ours gets: pinned memory on CUDA, copies with non_blocking."""
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


def benchmark_loader(data_dir: Path, device: torch.device, batch_size: int = 512, workers: int | None = None,
              aug: str = data.DEFAULT_AUG) -> dict:
    meta = data.ensure_valid(data_dir)
    workers, note = data.check_workers(workers)  # resolved here, so the record holds the count used
    if note:
        print(f"note: {note}", file=sys.stderr)
    ours = data.make_loader("train", batch_size, device, aug, workers=workers, data_dir=data_dir)
    time_epoch(ours, device)  # the first epoch pays numba's JIT compilation
    ours_rate = statistics.median(time_epoch(ours, device) for _ in range(LOADER_REPS))
    n = meta["counts"]["train"]
    images = data.read_images(data_dir, "train", list(range(n)))
    labels = data.beton_labels(data_dir / "train.beton")
    tv = torchvision_way(images, labels, meta["mean"], meta["std"], workers, batch_size, device)
    time_epoch(moved_to(tv, device), device, limit=2048)  # start the workers
    tv_rate = statistics.median(time_epoch(moved_to(tv, device), device, limit=min(n, 20_000))
                                for _ in range(LOADER_REPS))
    on_device = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    mean, std = data.channel_tensor(meta["mean"], device), data.channel_tensor(meta["std"], device)
    ceiling = statistics.median(time_epoch(in_memory_ceiling(on_device, mean, std, batch_size), device)
                                for _ in range(LOADER_REPS))
    return {"device": str(device), "host": platform.node(), "images": n, "batch_size": batch_size, "workers": workers,
            "ours_img_per_s": round(ours_rate), "torchvision_img_per_s": round(tv_rate),
            "ceiling_img_per_s": round(ceiling),
            "ratio": round(round(ours_rate) / round(tv_rate), 2)}  # the ratio of the figures shown


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def summarise(record: dict) -> None:
    """The top-level figures plot.py and readers look for, from the detailed ones."""
    steps = record["train_step"]
    record["speedup"] = {label: m["default"] / m["eager_fp32"] for label, m in steps.items()
                         if "default" in m and "eager_fp32" in m}
    modes = record["modes"]
    record["achieved_flops"] = {label: {mode: record["flops_per_image"][label] * rate for mode, rate in m.items()}
                                for label, m in steps.items()}
    dtype = {label: {mode: r.get("dtype", modes[mode]["dtype"]) for mode, r in details["modes"].items()}
             for label, details in record["archs"].items()}  # default's dtype can differ per arch on CPU
    record["peak_fraction"] = {label: {mode: flops / record["peak_flops"][dtype[label][mode]]
                                       for mode, flops in m.items()}
                               for label, m in record["achieved_flops"].items()}
    record["loader_ratio"] = record["loader"]["ratio"]
    epoch = record["epoch"]
    if epoch:  # missing only when the epoch failed (see "failed"); plot.py then draws without it
        record["loader_overhead"] = epoch["loader_s"] / epoch["in_memory_s"]


def default_name(result: dict | None) -> str:
    """'bf16 channels-last compiled': the mode train.py's auto chose, to read the speedup by."""
    if result is None:
        return "-"
    return (f"{result['dtype']} {'channels-last' if result['channels_last'] else 'NCHW'} "
            f"{'compiled' if result['compile'] else 'eager'}")


def print_loader(record: dict) -> None:
    loader = record["loader"]
    print(f"loader, {loader['images']:,} images, batch {loader['batch_size']}, {loader['workers']} workers: ours "
          f"{loader['ours_img_per_s']:,} img/s | torchvision DataLoader {loader['torchvision_img_per_s']:,} img/s | "
          f"ratio {loader['ratio']}x | in-memory ceiling {loader['ceiling_img_per_s']:,} img/s")


def print_table(record: dict) -> None:
    loader, epoch, steps = record["loader"], record["epoch"], record["train_step"]
    print(f"\n{record['device_name']} ({record['device']}), {record['threads']} threads, batch {record['batch_size']}"
          + (", quick" if record["quick"] else ""))
    print(f"loader, {loader['images']:,} images: ours {loader['ours_img_per_s']:,} img/s | torchvision DataLoader "
          f"{loader['torchvision_img_per_s']:,} img/s | ratio {record['loader_ratio']:.2f}x | in-memory ceiling "
          f"{loader['ceiling_img_per_s']:,} img/s")
    modes = list(record["modes"])
    print(f"\ntrain step, images/s (median of {record['reps']} reps; compile time excluded, shown apart)")
    header = f"{'arch':<18}" + "".join(f"{m:>14}" for m in modes)
    header += f"{'speedup':>9}  {'default is':<24}{'compile_s':>10}{'GFLOP/img':>10}{'TFLOP/s':>9}{'% peak':>8}"
    if record["peak_memory_mb"]:
        header += f"{'GB':>7}"
    print(header)
    for label, m in steps.items():
        row = f"{label:<18}" + "".join(f"{m[mode]:>14,.0f}" if mode in m else f"{'-':>14}" for mode in modes)
        row += f"{record['speedup'][label]:>8.2f}x" if label in record["speedup"] else f"{'-':>9}"
        row += f"  {default_name(record['archs'][label]['modes'].get('default')):<24}"
        row += f"{record['compile_time_s'][label]:>10.1f}" if label in record["compile_time_s"] else f"{'-':>10}"
        row += f"{record['flops_per_image'][label] / 1e9:>10.3f}"
        if "default" in m:
            row += f"{record['achieved_flops'][label]['default'] / 1e12:>9.3f}"
            row += f"{record['peak_fraction'][label]['default']:>8.1%}"
            if record["peak_memory_mb"]:
                row += f"{record['peak_memory_mb'][label].get('default', math.nan) / 1024:>7.2f}"
        print(row)
    for label, problem in record["failed"].items():
        print(f"  failed: {label}: {problem}")
    print("  (TFLOP/s and % peak are of the default mode; every mode is in the JSON. Where the default is\n"
          "   fp32 NCHW eager, it is eager_fp32 timed again: its speedup is 1 within the noise of the machine)")
    if epoch:
        print(f"\nepoch of {epoch['arch']} {epoch['mode']}, {epoch['batches']} batches: fed by our loader "
              f"{epoch['loader_s']:.2f} s | from memory {epoch['in_memory_s']:.2f} s | loader overhead "
              f"{record['loader_overhead']:.2f}x")
    peaks = " | ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in record["peak_flops"].items())
    print(f"peak, {PEAK_MATMUL_SIZE}x{PEAK_MATMUL_SIZE} matmul: {peaks}")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def resolve_plan(args: argparse.Namespace) -> dict:
    """Flags, then --quick's values, then the full run's defaults."""
    full = {"batch_size": BATCH_SIZE, "reps": REPS, "steps_per_rep": STEPS_PER_REP, "warmup_steps": WARMUP_STEPS,
            "archs": ARCHS, "epoch_fraction": 1.0}
    plan = {**full, **(QUICK if args.quick else {})}
    for key in ("batch_size", "reps", "archs", "epoch_fraction"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    return plan


def plan_problem(plan: dict) -> str | None:
    if plan["batch_size"] < 2:
        return f"--batch-size must be at least 2 (train-mode BatchNorm), got {plan['batch_size']}"
    if plan["reps"] < 1:
        return f"--reps must be at least 1, got {plan['reps']}"
    if not 0 < plan["epoch_fraction"] <= 1:
        return f"--epoch-fraction must be in (0, 1], got {plan['epoch_fraction']}"
    for label in plan["archs"]:
        arch, stem = parse_label(label)
        try:
            models.build_model(arch, stem=stem)
        except ValueError as error:
            return f"--archs {label}: {error}"
    return None


def main(argv: list[str] | None = None) -> int:
    speed.check_torch()
    args, plan, device, modes = parse_bench_args(argv)
    record = start_record(args, plan, device, modes)
    epoch_loader = make_epoch_loader(args, plan, device)  # first: a bad data dir or fraction fails at once
    record["loader"] = measure_loader(args, device)
    if args.loader_only:
        return save_record(args.out / "loader", {k: record[k] for k in LOADER_ONLY_KEYS}, print_loader)
    train_args = train_defaults(plan["batch_size"])
    nominal_steps = record["loader"]["images"] // plan["batch_size"] or 1  # one epoch, for the lr warm-up
    start_compiler_if_needed(modes, device)
    measure_archs(record, plan, modes, device, train_args, nominal_steps, epoch_loader)
    if record["epoch"] is None and f"{EPOCH_ARCH} {EPOCH_MODE}" not in record["failed"]:  # arch or mode left out
        record["epoch"] = measure_epoch_alone(record, device, train_args, nominal_steps, epoch_loader, plan)
    if record["epoch"] is not None:
        record["epoch"].update(batch_size=plan["batch_size"], fraction=plan["epoch_fraction"])
        print(f"epoch: loader {record['epoch']['loader_s']:.2f} s, in memory {record['epoch']['in_memory_s']:.2f} s",
              flush=True)
    record["peak_flops"] = measure_peaks(record, device, plan["reps"])
    summarise(record)
    return save_record(args.out, record, print_table)


LOADER_ONLY_KEYS = ("created_at", "host", "device", "device_name", "threads", "load_average", "env", "command",
                    "loader")


def parse_bench_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict, torch.device, dict[str, Mode]]:
    """The flags, the plan they make (--quick and defaults filled in), the device and the modes to time."""
    parser = build_parser()
    args = parser.parse_args(argv)
    plan = resolve_plan(args)
    problem = plan_problem(plan)
    if problem:
        parser.error(problem)
    device = speed.resolve_device(args.device, None)
    all_modes = modes_for(device)
    unknown = [m for m in args.modes or () if m not in all_modes]
    if unknown:
        parser.error(f"--modes {unknown[0]}: choose from {', '.join(all_modes)}")
    args.command = sys.argv[1:] if argv is None else argv
    modes = {name: mode for name, mode in all_modes.items() if args.modes is None or name in args.modes}
    return args, plan, device, modes


def start_record(args: argparse.Namespace, plan: dict, device: torch.device, modes: dict[str, Mode]) -> dict:
    """The record's description of this machine and run, printed as the first line (with a warning
    when the machine is busy)."""
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
            "modes": {name: {"channels_last": "auto", "dtype": "auto", "compile": "auto"} if m == AUTO else
                      {"channels_last": m.channels_last, "dtype": m.amp, "compile": m.compile}
                      for name, m in modes.items()},
            "loader": None, "train_step": {}, "compile_time_s": {}, "flops_per_image": {}, "peak_flops": {},
            "epoch": None, "peak_memory_mb": {}, "archs": {}, "failed": {}}


def make_epoch_loader(args: argparse.Namespace, plan: dict, device: torch.device) -> data.DeviceLoader:
    try:
        return data.make_loader("train", plan["batch_size"], device, args.aug, fraction=plan["epoch_fraction"],
                                workers=args.workers, data_dir=args.data_dir)
    except ValueError as error:
        raise SystemExit(f"error: epoch part: {error} (bench.py's flag is --epoch-fraction)") from None
    except data.DataError as error:
        raise SystemExit(f"error: {error}") from None


def measure_loader(args: argparse.Namespace, device: torch.device) -> dict:
    """Part 1. At the full run's batch even under --quick: the loader part is quick anyway, and a small
    batch would time FFCV's per-batch overhead rather than the loader a training run gets."""
    threads = torch.get_num_threads()
    result = benchmark_loader(args.data_dir, device, batch_size=args.batch_size or BATCH_SIZE,
                              workers=args.workers, aug=args.aug)
    torch.set_num_threads(threads)  # FFCV resets torch's thread count
    print(f"loader: ours {result['ours_img_per_s']:,} img/s, torchvision {result['torchvision_img_per_s']:,} img/s, "
          f"ceiling {result['ceiling_img_per_s']:,} img/s", flush=True)
    return result


def train_defaults(batch_size: int) -> argparse.Namespace:
    """train.py's own defaults at this batch: optimiser, lr for this batch size, warm-up, label smoothing."""
    train_args = train.parse_config(["--batch-size", str(batch_size), "--quiet"])
    train_args.batch_size_per_rank = batch_size
    return train_args


def start_compiler_if_needed(modes: dict[str, Mode], device: torch.device) -> None:
    if any(mode.compile for mode in modes.values()):
        try:
            start_compiler(device)
        except RuntimeError:
            pass  # no working compiler here: each compiled mode reports it as its failure


def measure_archs(record: dict, plan: dict, modes: dict[str, Mode], device: torch.device,
                  train_args: argparse.Namespace, nominal_steps: int, epoch_loader: data.DeviceLoader) -> None:
    """Parts 2 and 3: every label in every mode, and the epoch as soon as its model is compiled and warm."""
    for label in plan["archs"]:
        model = build(label, device)
        record["flops_per_image"][label] = train_flops_per_image(model, device)
        details = {"params": models.count_parameters(model), "forward_flops": models.forward_flops(model)}
        del model
        results, problems, epoch, switches = measure_label(label, modes, device, train_args, plan, nominal_steps,
                                                           epoch_loader)
        record["epoch"] = record["epoch"] or epoch
        record["archs"][label] = {**details, "modes": results, "default_switches": switches}
        record["train_step"][label] = {name: result["img_per_s"] for name, result in results.items()}
        record["failed"].update({f"{label} {name}": problem for name, problem in problems.items()})
        if device.type == "cuda":
            record["peak_memory_mb"][label] = {name: result["peak_memory_mb"] for name, result in results.items()}
        # A compiled mode's first step minus a steady one; the first such mode, as the default's
        # graphs may already sit in Inductor's cache from its compile probe.
        compiled = [r for r in results.values() if r["compile"]]
        if compiled:
            record["compile_time_s"][label] = max(0.0, compiled[0]["first_step_s"] - compiled[0]["step_s"])


def measure_epoch_alone(record: dict, device: torch.device, train_args: argparse.Namespace, nominal_steps: int,
                        epoch_loader: data.DeviceLoader, plan: dict) -> dict | None:
    """Part 3 when --archs or --modes left out its arch or mode."""
    torch._dynamo.reset()
    try:
        mode = modes_for(device)[EPOCH_MODE]
        if mode == AUTO:
            mode, _ = default_mode(EPOCH_ARCH, device, train_args, plan["batch_size"])
            torch._dynamo.reset()
        setup = make_setup(EPOCH_ARCH, mode, device, train_args, nominal_steps)
        return time_epochs(setup, epoch_loader, device, train_args, plan["reps"])
    except RuntimeError as error:
        record["failed"]["epoch"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        return None


def measure_peaks(record: dict, device: torch.device, reps: int) -> dict:
    """Part 4: the device's matmul peak in each dtype timed, for the efficiency figures."""
    release_memory(device)
    used = {result["dtype"] for label in record["archs"].values() for result in label["modes"].values()} | {"fp32"}
    return {name: matmul_peak(device, speed.AMP_DTYPES[name] or torch.float32, reps) for name in sorted(used)}


def save_record(folder: Path, record: dict, show) -> int:
    record["load_average"]["end"] = os.getloadavg()[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{platform.node()}-{datetime.date.today():%Y-%m-%d}.json"
    data.save_json_atomic(path, record)
    show(record)
    print(f"\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
