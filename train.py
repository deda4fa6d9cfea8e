"""Train one ResNet configuration on CIFAR-10; record everything about the run in one JSON file.

    python train.py --arch resnet34 --pool avg --opt sgd
    python train.py --from results/resnet34-avg-sgd-s0.json          # the exact config again
    torchrun --nproc_per_node=2 train.py --arch resnet18               # data-parallel, same flags

The run writes results/<name>.json at the start and after every epoch (status "running", then
"finished" or "diverged") and a checkpoint results/checkpoints/<name>.pt that --resume continues
from. Exit codes: 0 finished, 1 error, 2 bad arguments, 3 diverged, 130 interrupted.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import models

SCHEMA_VERSION = 1
# Published CIFAR-10 recipes, one per optimiser; see the README's "Defaults" section for sources.
# SGD's lr is for batch 512 and scales linearly with the batch size (Goyal et al., 2017).
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.4, "momentum": 0.9, "nesterov": True, "wd": 5e-4, "schedule": "onecycle"},
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "wd": 0.0, "schedule": "cosine"},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "wd": 0.05, "schedule": "cosine"},
}
SGD_REFERENCE_BATCH = 512
SCHEDULES = ("onecycle", "cosine", "step", "multistep", "constant")
CUSTOM_OPTIONS = ("blocks", "channels", "kernel_size", "avgpool_size", "head", "dropout")
# Flags that change how a run is carried out but not what it computes: a checkpoint written under
# other values of these may still be resumed.
RUN_CONTROL = ("resume", "quiet", "out", "name", "workers", "from_json", "device", "early_stop", "compile")
LOG_EVERY = 25  # steps between progress-bar updates: each reads the loss back, a host sync
PREDICTIONS_KEPT = 64
EXIT_DIVERGED, EXIT_INTERRUPTED = 3, 130
INTERRUPTED = False  # set by stop_on_signals' handler


def csv_of(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="resnet18", choices=models.ARCHS, help="architecture")
    m.add_argument("--pool", default="avg", choices=models.POOLS, help="global pooling before the classifier")
    m.add_argument("--stem", default="cifar", choices=models.STEMS,
                   help="cifar: 3x3 stride-1 conv, no max-pool; imagenet: torchvision's 7x7 stride-2 conv + max-pool")
    m.add_argument("--pretrained", action="store_true", help="start from torchvision's ImageNet weights")
    m.add_argument("--blocks", type=csv_of(int), default=None, help="resnet_custom: blocks per stage, e.g. 3,4,4,3")
    m.add_argument("--channels", type=csv_of(int), default=None, help="resnet_custom: channels per stage")
    m.add_argument("--kernel-size", type=int, default=None, help="resnet_custom: convolution kernel size")
    m.add_argument("--avgpool-size", type=int, default=None, help="resnet_custom: output size of the final pool")
    m.add_argument("--head", type=csv_of(int), default=None,
                   help="resnet_custom: hidden sizes of the classifier head, e.g. 256,128")
    m.add_argument("--dropout", type=float, default=None, help="resnet_custom: dropout in the head")
    o = p.add_argument_group("optimisation (None = the optimiser's default, see OPTIMIZER_DEFAULTS)")
    o.add_argument("--opt", default="sgd", choices=tuple(OPTIMIZER_DEFAULTS), help="optimiser")
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (sgd: 0.4 at batch 512, scaled linearly)")
    o.add_argument("--momentum", type=float, default=None, help="sgd momentum (0.9)")
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="sgd Nesterov momentum")
    o.add_argument("--wd", type=float, default=None, help="weight decay (sgd 5e-4, adam 0, adamw 0.05)")
    o.add_argument("--betas", type=csv_of(float), default=None, help="adam/adamw betas (0.9,0.999)")
    o.add_argument("--batch-size", type=int, default=512, help="global batch size")
    o.add_argument("--epochs", type=int, default=10, help="training epochs")
    o.add_argument("--schedule", default=None, choices=SCHEDULES, help="lr schedule (sgd onecycle, adam cosine)")
    o.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up (onecycle: the peak); default min(2, epochs/5)")
    o.add_argument("--milestones", type=csv_of(float), default=None,
                   help="multistep: epochs where the lr is multiplied by --gamma (step: at 50%% and 75%%)")
    o.add_argument("--gamma", type=float, default=0.1, help="step/multistep decay factor")
    o.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the training loss")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=data.DATA_DIR, help="folder with train.beton, test.beton, meta.json")
    d.add_argument("--aug", default=data.DEFAULT_AUG,
                   help=f"comma list from {', '.join(data.AUGMENTATIONS)}, or none")
    d.add_argument("--fraction", type=float, default=1.0, help="class-balanced fraction of the train set to use")
    d.add_argument("--val-split", type=float, default=0.0, help="fraction of the train set held out for validation")
    d.add_argument("--workers", type=int, default=data.DEFAULT_WORKERS, help="FFCV loader workers")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="seed of weights, data order, subsets and splits")
    r.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:N")
    r.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="autocast dtype; auto: bf16 on CUDA (fp16 on GPUs without bf16), on CPU the faster of fp32 "
                        "and bf16 in a few timed steps")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model; unset: on for CUDA, on CPU only if compiled steps time faster")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format for model and inputs; unset: on for CUDA, on CPU only if "
                        "it times faster")
    r.add_argument("--out", default="results", help="results folder")
    r.add_argument("--name", default=None, help="run name (default from the config, e.g. resnet34-avg-sgd-s0)")
    r.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    r.add_argument("--early-stop", type=int, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better val accuracy (needs --val-split)")
    r.add_argument("--tta", action="store_true", help="evaluate with horizontal-flip test-time augmentation")
    r.add_argument("--from", dest="from_json", default=None, metavar="RESULT.json",
                   help="take the config of this result (flags given here still override)")
    r.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)")
    r.add_argument("--quiet", action="store_true", help="no progress bars (for sweeps)")
    return p


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; --from RESULT.json supplies defaults; resolve optimiser defaults; validate."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        try:
            config = json.loads(Path(args.from_json).read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"--from {args.from_json}: not a readable result JSON ({error})")
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in config.items() if k in known and k not in ("from_json", "resume")})
        args = parser.parse_args(argv)
    for key, value in OPTIMIZER_DEFAULTS[args.opt].items():
        if getattr(args, key, None) is None:
            if key == "lr" and args.opt == "sgd":
                value = value * args.batch_size / SGD_REFERENCE_BATCH
            setattr(args, key, value)
    if args.warmup_epochs is None:
        args.warmup_epochs = min(2.0, args.epochs / 5)
    if args.schedule == "step" and args.milestones is None:
        args.milestones = (args.epochs * 0.5, args.epochs * 0.75)
    problem = config_problem(args)
    if problem:
        parser.error(problem)
    args.name = args.name or default_name(args)
    return args


def config_problem(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the config, checked before any work is done."""
    checks = [
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (0 < args.fraction <= 1, f"--fraction must be in (0, 1], got {args.fraction}"),
        (0 <= args.val_split < 1, f"--val-split must be in [0, 1), got {args.val_split}"),
        (args.wd >= 0, f"--wd must be non-negative, got {args.wd}"),
        (0 <= args.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {args.label_smoothing}"),
        (args.warmup_epochs <= args.epochs, f"--warmup-epochs {args.warmup_epochs} exceeds --epochs {args.epochs}"),
        (args.schedule != "multistep" or bool(args.milestones), "--schedule multistep needs --milestones, e.g. 5,8"),
        (args.early_stop is None or args.val_split > 0,
         "--early-stop watches the val accuracy: add --val-split, e.g. 0.1 (never the test set)"),
        (args.name is None or re.fullmatch(r"[\w.,+=-]+", args.name) is not None,
         f"--name {args.name!r}: use letters, digits and . , + = - _ only"),
    ]
    try:
        data.parse_aug(args.aug)
    except ValueError as error:
        return f"--aug: {error}"
    return next((message for ok, message in checks if not ok), None)


def default_name(args: argparse.Namespace) -> str:
    parts = [args.arch, args.pool, args.opt]
    if args.stem != "cifar":
        parts.append(args.stem)
    if args.pretrained:
        parts.append("pretrained")
    if args.fraction < 1:
        parts.append(f"f{args.fraction:g}")
    return "-".join(parts + [f"s{args.seed}"])


def model_options(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in CUSTOM_OPTIONS if getattr(args, k) is not None}


def resolve_device(name: str, local_rank: int | None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is visible: use --device cpu or auto")
        if local_rank is not None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


AMP_FLAGS = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBE_BATCH = 128  # eager probes of dtype x layout: the modes ranked the same at batch 64 and 512 here
PROBE_STEPS = 2  # timed steps per probe, after an untimed one; the fastest step counts
# A switch is turned on by auto only if it is this much faster than without: below that, the probes
# are within this machine's step-to-step noise, and the plain fp32 NCHW eager step is the safer bet
# (no compile time, no recompiles, fp32 numerics).
PROBE_MARGIN = 1.05


def dtype_name(dtype: torch.dtype | None) -> str:
    """The record's name of an autocast dtype: "bfloat16", "float16", or "off"."""
    return str(dtype).replace("torch.", "") if dtype else "off"


def autocast_dtype(switches: dict) -> torch.dtype | None:
    return None if switches["amp"] == "off" else getattr(torch, switches["amp"])


def memory_format(switches: dict) -> torch.memory_format:
    return torch.channels_last if switches["channels_last"] else torch.contiguous_format


def choose_switches(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> dict:
    """Autocast dtype, channels-last and torch.compile for this run, each with its reason.

    Switches given on the command line are taken as given. On CUDA, auto turns all three on: tensor
    cores want half precision in NHWC, and compile fuses BatchNorm and ReLU into fewer kernels.
    On CPU each may pay or cost, by processor and network: on this project's 2-core AMX Xeon at
    batch 512, bf16 autocast trains resnet18 (cifar stem) 1.8x faster and resnet18 with the
    imagenet stem 2x slower; compile gains 1.3x for resnet20 and loses 0.8x for resnet18-imagenet.
    So auto on CPU times eager steps of every dtype x layout left open and takes the fastest if it
    beats plain fp32 NCHW by PROBE_MARGIN, and leaves "compile" None for compile_pays to decide after
    the compiled warm-up, at the run's batch."""
    amps = [AMP_FLAGS[args.amp]] if args.amp != "auto" else None
    layouts = [args.channels_last] if args.channels_last is not None else None
    probes = {}
    if device.type == "cuda":
        amps = amps or [torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16]
        layouts = layouts or [True]
        compiled, auto = (True if args.compile is None else args.compile), "auto on CUDA"
    else:
        amps, layouts = amps or [None, torch.bfloat16], layouts or [False, True]
        compiled, auto = args.compile, f"auto on CPU: the fastest eager probe, if {PROBE_MARGIN}x fp32 NCHW or faster"
        if len(amps) * len(layouts) > 1:
            batch = min(args.batch_size_per_rank, PROBE_BATCH)
            for amp in amps:
                for channels_last in layouts:
                    memory = torch.channels_last if channels_last else torch.contiguous_format
                    probe = copy.deepcopy(model).to(memory_format=memory)
                    probes[probe_name(amp, channels_last)] = round(step_rate(probe, probe, amp, batch, device, memory))
    amp, channels_last = max(((a, c) for a in amps for c in layouts), key=lambda ac: probes.get(probe_name(*ac), 0))
    plain = probes.get(probe_name(None, False))
    if plain and probes[probe_name(amp, channels_last)] < PROBE_MARGIN * plain:
        amp, channels_last = None, False
    return {"amp": dtype_name(amp), "amp_reason": "asked" if args.amp != "auto" else auto,
            "channels_last": channels_last, "channels_last_reason": "asked" if args.channels_last is not None else auto,
            "compile": compiled, "compile_reason": "asked" if args.compile is not None else auto,
            "probe_img_per_s": probes}


def probe_name(amp: torch.dtype | None, channels_last: bool) -> str:
    return f"{dtype_name(amp)} {'channels-last' if channels_last else 'NCHW'}"


def compile_pays(switches: dict, compiled, model, raw_model: torch.nn.Module, device: torch.device,
                 batch_size: int) -> None:
    """Auto on CPU: keep torch.compile only if compiled steps beat eager ones by PROBE_MARGIN at the
    run's batch."""
    amp, memory = autocast_dtype(switches), memory_format(switches)
    rates = {"compiled": round(step_rate(compiled, raw_model, amp, batch_size, device, memory)),
             "eager": round(step_rate(model, raw_model, amp, batch_size, device, memory))}
    switches.update(compile=rates["compiled"] > PROBE_MARGIN * rates["eager"], compile_probe_img_per_s=rates,
                    compile_reason=f"auto on CPU: compiled steps at the run's batch, after the compiled warm-up, "
                                   f"kept if {PROBE_MARGIN}x the eager ones or faster")


def step_rate(model, raw_model: torch.nn.Module, dtype: torch.dtype | None, batch_size: int, device: torch.device,
              memory: torch.memory_format, steps: int = PROBE_STEPS) -> float:
    """Images/s of plain SGD training steps of `model`, which trains raw_model's weights (raw_model
    itself, or a compiled or DDP wrapper of it). Weights, buffers and the RNG are restored after:
    the run then starts as if it had never been probed."""
    saved = {k: v.clone() for k, v in raw_model.state_dict().items()}
    rng = torch.get_rng_state()
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=1e-3)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn((batch_size, 3, 32, 32), device=device, generator=generator).contiguous(memory_format=memory)
    labels = torch.randint(0, 10, (batch_size,), device=device, generator=generator)
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    raw_model.load_state_dict(saved)
    raw_model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return batch_size / min(times[1:])


def agree(switches: dict, keys: tuple[str, ...], world: int, device: torch.device) -> None:
    """Under torchrun, every rank takes rank 0's measured choices (each rank's timings differ)."""
    if world == 1:
        return
    for key in keys:
        box = [switches[key]]
        torch.distributed.broadcast_object_list(box, 0, device=device)
        switches[key] = box[0]


# ---------------------------------------------------------------------------------------------
# Distributed (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)
# ---------------------------------------------------------------------------------------------

def init_distributed(device_name: str) -> tuple[int, int, int | None]:
    """(rank, world size, local rank); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    # A timeout, so that a rank that dies takes the others down instead of leaving them waiting.
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return torch.distributed.get_rank(), world, local_rank


def all_reduce_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


# ---------------------------------------------------------------------------------------------
# Model, optimiser, schedule
# ---------------------------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm parameters, as in most CIFAR-10 recipes.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    optimizer = torch.optim.Adam if args.opt == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=args.lr, betas=tuple(args.betas))


def lr_factor(step: int, steps_per_epoch: int, args: argparse.Namespace) -> float:
    """The lr multiplier at a step: linear warm-up, then the schedule's decay."""
    epoch = step / steps_per_epoch
    warmup = args.warmup_epochs
    if epoch < warmup:
        return (epoch + 1 / steps_per_epoch) / warmup  # never exactly 0, so the first step moves
    if args.schedule == "onecycle":  # the triangular one-cycle of the FFCV/DAWNBench CIFAR recipes
        return max(0.0, (args.epochs - epoch) / max(args.epochs - warmup, 1e-9))
    if args.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(args.epochs - warmup, 1e-9)))
    if args.schedule in ("step", "multistep"):
        return args.gamma ** sum(epoch >= m for m in args.milestones)
    return 1.0


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scheduler, scaler, amp_dtype, memory, device, args, world,
                    progress_desc):
    """One pass; loss and correct counts stay on the device and are read once, at the end.

    `memory` is the model's layout: the loader's channels-last batches are copied to NCHW for an
    NCHW model, since a channels-last input would make its convolutions run channels-last."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, first_loss = 0, None
    bar = tqdm(loader, desc=progress_desc, leave=False, dynamic_ncols=True,
               disable=args.quiet or world > 1 and torch.distributed.get_rank() > 0 or not sys.stderr.isatty())
    for step, (images, labels) in enumerate(bar):
        stop_if_interrupted()
        images = images.contiguous(memory_format=memory)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if first_loss is None:
            first_loss = loss.detach().float()
        loss_sum += loss.detach().float() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if step % LOG_EVERY == LOG_EVERY - 1:
            running = loss_sum.item() / seen
            bar.set_postfix(loss=f"{running:.3f}", acc=f"{correct.item() / seen:.1%}")
            if not math.isfinite(running) and world == 1:
                break  # diverged: no point finishing the epoch (with several ranks, all must agree)
    totals = all_reduce_sum(torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device),
                                         first_loss / world]), world)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item(), totals[3].item()


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, memory, num_classes: int, batch_size: int, tta: bool,
             world: int) -> dict:
    """Loss (without label smoothing), accuracy, confusion matrix and predictions over a split.

    The last batch is padded to the full batch size so the compiled model sees one shape only."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    preds, targets, kept = [], [], 0
    for images, labels in loader:
        n = len(labels)
        if n < batch_size:
            images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
        images = images.contiguous(memory_format=memory)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            if tta:
                logits = logits + model(images.flip(3))
        logits = logits[:n].float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        pred = logits.argmax(1)
        confusion += torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
        if kept < PREDICTIONS_KEPT:  # this rank's first images; gather_in_order interleaves the ranks
            preds.append(pred)
            targets.append(labels)
            kept += n
    confusion = all_reduce_sum(confusion, world).view(num_classes, num_classes).cpu()
    total = int(confusion.sum())
    loss = all_reduce_sum(loss_sum, world).item() / total
    return {"loss": loss, "acc": confusion.diag().sum().item() / total, "confusion": confusion.tolist(),
            "preds": gather_in_order(torch.cat(preds), world)[:PREDICTIONS_KEPT],
            "labels": gather_in_order(torch.cat(targets), world)[:PREDICTIONS_KEPT]}


def gather_in_order(local: torch.Tensor, world: int) -> list[int]:
    """Per-image results in test-set order. FFCV's distributed sampler deals image i to rank i % world."""
    if world == 1:
        return local.tolist()
    size = torch.tensor([len(local)], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.cat([local, local.new_full((longest - len(local),), -1)])
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    interleaved = torch.stack(parts, 1).flatten().tolist()
    return [p for p in interleaved if p >= 0]


def warm_up(model, raw_model, optimizer, scaler, amp_dtype, memory, device, args, eval_batch) -> float:
    """Compile the train and eval graphs on a dummy batch, then restore every state it touched.

    The compile time is reported on its own and kept out of the epoch times."""
    saved = {"model": {k: v.clone() for k, v in raw_model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    for training, size in ((True, args.batch_size_per_rank), (False, eval_batch)):
        images = torch.randn((size, 3, 32, 32), device=device, generator=generator).contiguous(memory_format=memory)
        model.train(training)
        with torch.set_grad_enabled(training), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                             enabled=amp_dtype is not None):
            logits = model(images)
        if training:
            scaler.scale(logits.float().logsumexp(1).mean()).backward()
            optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    elapsed = time.perf_counter() - start
    raw_model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    return elapsed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process (KiB on Linux)


# ---------------------------------------------------------------------------------------------
# Records: JSON and checkpoint, both written atomically
# ---------------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    here = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True).stdout.strip()
    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": version("torchvision"),
           "ffcv": version("ffcv"), "numpy": version("numpy"), "host": platform.node(),
           "git_commit": (commit + ("-dirty" if dirty else "")) or None, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(device_name=cpu_model(), cuda=None, cudnn=None)
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_checkpoint(path: Path, state: dict) -> None:
    def write(tmp: Path) -> None:
        try:
            torch.save(state, tmp)
        except RuntimeError as error:  # torch's zip writer reports a failed write (a full disk) this way
            raise OSError(f"writing {tmp}: {error}") from None
    data.write_atomically(path, write)


def fingerprint(args: argparse.Namespace) -> dict:
    """The part of the config that decides what a run computes; a checkpoint must match it."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_CONTROL}


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict | None:
    """The checkpoint to resume from, or None; refuses a damaged one or one of another config."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or not a checkpoint: unpickling errors of many kinds
        raise SystemExit(f"error: checkpoint {path} is unreadable ({type(error).__name__}): "
                         "delete it to start the run again") from None
    mine, theirs = json.loads(json.dumps(fingerprint(args))), state.get("fingerprint", {})
    differs = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differs:
        k = differs[0]
        raise SystemExit(f"error: checkpoint {path} is of another config ({k}: {theirs.get(k)!r} there, "
                         f"{mine.get(k)!r} here): use another --name, or delete the checkpoint")
    return state


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_config(argv)
    rank, world, local_rank = init_distributed(args.device)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    device = resolve_device(args.device, local_rank)
    if args.sync_bn and (world == 1 or device.type != "cuda"):
        raise SystemExit("error: --sync-bn needs torchrun with CUDA devices (SyncBatchNorm does not run on CPU)")
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} does not split over {world} processes: "
                         f"use a multiple of {world}")
    args.batch_size_per_rank = args.batch_size // world
    out = Path(args.out)
    json_path, ckpt_path = out / f"{args.name}.json", out / "checkpoints" / f"{args.name}.pt"
    if is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    # Data: loaders check the betons against meta.json before anything is trained.
    torch.manual_seed(args.seed)
    common = dict(device=device, seed=args.seed, workers=args.workers, distributed=world > 1, data_dir=args.data_dir)
    try:
        meta = data.ensure_valid(args.data_dir)
        train_loader = data.make_loader("train", args.batch_size_per_rank, aug=args.aug, fraction=args.fraction,
                                        val_split=args.val_split, **common)
        eval_batch = args.batch_size_per_rank
        val_loader = (data.make_loader("val", eval_batch, aug="none", val_split=args.val_split, **common)
                      if args.val_split > 0 else None)
        test_loader = data.make_loader("test", eval_batch, aug="none", **common)
    except (data.DataError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    classes = meta["classes"]

    # Model, optimiser, schedule, loss scaling.
    try:
        raw_model = models.build_model(args.arch, num_classes=len(classes), pool=args.pool, stem=args.stem,
                                       pretrained=args.pretrained, **model_options(args))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    params, flops = models.count_parameters(raw_model), models.forward_flops(raw_model)
    raw_model = raw_model.to(device)
    state = load_checkpoint(ckpt_path, args) if args.resume else None
    if state is not None and "switches" in state:  # a resumed run keeps what it chose at its start
        switches = state["switches"]
        if args.compile is not None:
            switches.update(compile=args.compile, compile_reason="asked")
    else:
        probe_start = time.perf_counter()
        switches = choose_switches(args, raw_model, device)
        agree(switches, ("amp", "channels_last"), world, device)
        switches["probe_time_s"] = time.perf_counter() - probe_start
    amp, memory = autocast_dtype(switches), memory_format(switches)
    raw_model = raw_model.to(memory_format=memory)
    model = raw_model
    if world > 1:
        if args.sync_bn:
            model = raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(raw_model, args)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, args))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    # The record, and the checkpoint to resume from.
    record = {"schema_version": SCHEMA_VERSION, "name": args.name, "status": "running",
              "started_at": now(), "ended_at": None,
              "config": {k: v for k, v in vars(args).items()
                         if k not in ("resume", "from_json", "batch_size_per_rank")},
              "run": {"device": str(device), "world_size": world,
                      "backend": torch.distributed.get_backend() if world > 1 else None,
                      "train_images": train_loader.num_samples,
                      "steps_per_epoch": steps_per_epoch},
              "env": environment(device), "model": {"params": params, "flops_per_image": flops},
              "classes": classes, "history": []}
    start_epoch, best = 0, {"acc": None, "epoch": None}
    if args.resume and state is None:
        say(f"{args.name}: no checkpoint at {ckpt_path}; starting from scratch")
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_epoch, best = state["epoch"], state["best"]
        record.update(history=state["history"], started_at=state["started_at"])
        say(f"{args.name}: resuming after epoch {start_epoch}/{args.epochs}")
    train_loader.epoch = start_epoch  # the data order of the next epoch, as in an uninterrupted run

    # Compile before the clock starts; a second build of the same graphs would show as recompiles.
    compile_time = 0.0
    if switches["compile"] is not False:
        # dynamic=False: shapes never change (drop_last in training, padded eval batches).
        compiled = torch.compile(model, dynamic=False)
        compile_time = warm_up(compiled, raw_model, optimizer, scaler, amp, memory, device, args, eval_batch)
        if switches["compile"] is None:
            probe_start = time.perf_counter()
            compile_pays(switches, compiled, model, raw_model, device, args.batch_size_per_rank)
            agree(switches, ("compile",), world, device)
            switches["probe_time_s"] += time.perf_counter() - probe_start
            if not switches["compile"]:  # compiled for nothing: the time was spent probing
                switches["probe_time_s"] += compile_time
                compile_time = 0.0
        if switches["compile"]:
            model = compiled
    graphs_after_warm_up = compiled_graphs()
    record["run"].update(switches, compile_time_s=compile_time)
    if is_main:
        data.save_json_atomic(json_path, record)
    say(f"{args.name}: {args.arch} ({params / 1e6:.2f} M params) on {device} "
        f"[amp {switches['amp']}, {'channels-last' if switches['channels_last'] else 'NCHW'}, "
        f"{'compiled' if switches['compile'] else 'eager'}, world {world}], "
        f"{train_loader.num_samples:,} train images, {args.epochs} epochs"
        + (f"; compiled in {compile_time:.1f} s" if compile_time else "")
        + (f"; auto probes {switches['probe_time_s']:.1f} s: eager {switches['probe_img_per_s']} img/s"
           if switches["probe_img_per_s"] else "")
        + (f", {switches['compile_probe_img_per_s']} img/s" if "compile_probe_img_per_s" in switches else ""))

    status, epoch = "finished", start_epoch
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            stop_if_interrupted()
            lr = optimizer.param_groups[0]["lr"]
            synchronize(device)
            start = time.perf_counter()
            train_loss, train_acc, first_loss = train_one_epoch(
                model, train_loader, optimizer, scheduler, scaler, amp, memory, device, args, world,
                f"epoch {epoch}/{args.epochs}")
            synchronize(device)
            epoch_time = time.perf_counter() - start
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "first_step_loss": first_loss,
                   "lr": lr,
                   "epoch_time_s": epoch_time,
                   "train_img_per_s": steps_per_epoch * args.batch_size / epoch_time}
            if not math.isfinite(train_loss):
                status = "diverged"
                # Strict JSON has no NaN or Infinity.
                row.update(train_loss=None, first_step_loss=first_loss if math.isfinite(first_loss) else None)
                record["history"].append(row)
                break
            start = time.perf_counter()
            results = {}
            for split, loader in (("val", val_loader), ("test", test_loader)):
                if loader is not None:
                    results[split] = evaluate(model, loader, device, amp, memory, len(classes), eval_batch, args.tta,
                                              world)
                    row.update({f"{split}_loss": results[split]["loss"], f"{split}_acc": results[split]["acc"]})
            synchronize(device)
            row["eval_time_s"] = time.perf_counter() - start
            record["history"].append(row)
            if "val" in results and (best["acc"] is None or results["val"]["acc"] > best["acc"]):
                best = {"acc": results["val"]["acc"], "epoch": epoch}
            say(epoch_line(row, args.epochs))
            stop_early = (args.early_stop is not None and best["epoch"] is not None
                          and epoch - best["epoch"] >= args.early_stop)
            if epoch == args.epochs or stop_early:
                record["final"] = final_summary(record, results["test"], best, classes, compile_time,
                                                compiled_graphs() - graphs_after_warm_up, device)
                record["final"]["stopped_early"] = stop_early
                break
            if is_main:
                save_checkpoint(ckpt_path, {
                    "fingerprint": fingerprint(args), "epoch": epoch, "best": best, "history": record["history"],
                    "started_at": record["started_at"], "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                    "switches": switches,
                    "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
                data.save_json_atomic(json_path, record)
    except KeyboardInterrupt:
        say(f"\n{args.name}: interrupted after epoch {epoch - 1}; the checkpoint is kept: "
            "run the same command with --resume to continue")
        # Leave at once: interpreter teardown while FFCV's loader thread is mid-batch can abort
        # (SIGABRT). Every file is already complete: JSON and checkpoint are written atomically.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    except OSError as error:
        raise SystemExit(f"error: could not write the record ({error}); the previous JSON and checkpoint are "
                         "intact: free some space and run again with --resume") from None

    if world > 1:
        torch.distributed.destroy_process_group()
    record.update(status=status, ended_at=now())
    if status == "diverged":
        record["diverged_epoch"] = epoch
    if is_main:
        data.save_json_atomic(json_path, record)
        if status == "finished":
            ckpt_path.unlink(missing_ok=True)  # the JSON holds the result; keep results/ small
    if status == "diverged":
        say(f"{args.name}: diverged in epoch {epoch} (non-finite training loss): lower --lr")
        return EXIT_DIVERGED
    final = record["final"]
    say(f"{args.name}: finished: test acc {final['test_acc']:.2%}, mean epoch {final['mean_epoch_time_s']:.1f} s, "
        f"{final['train_img_per_s']:,.0f} img/s -> {json_path}")
    return 0


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch_line(row: dict, epochs: int) -> str:
    line = (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  train loss {row['train_loss']:.3f} "
            f"acc {row['train_acc']:.1%}")
    for split in ("val", "test"):
        if f"{split}_acc" in row:
            line += f"  {split} loss {row[f'{split}_loss']:.3f} acc {row[f'{split}_acc']:.1%}"
    return line + (f"  lr {row['lr']:.3g}  {row['epoch_time_s']:.1f} s  {row['train_img_per_s']:,.0f} img/s"
                   f"  eval {row['eval_time_s']:.1f} s")


def final_summary(record: dict, test: dict, best: dict, classes: list[str], compile_time: float,
                  recompiles: int, device: torch.device) -> dict:
    history = record["history"]
    confusion = test["confusion"]
    per_class = {c: confusion[i][i] / max(1, sum(confusion[i])) for i, c in enumerate(classes)}
    later = [h["epoch_time_s"] for h in history[1:]] or [history[0]["epoch_time_s"]]
    return {"test_loss": test["loss"], "test_acc": test["acc"], "per_class_acc": per_class, "confusion": confusion,
            "best_val_acc": best["acc"], "best_val_epoch": best["epoch"],
            "predictions": {"indices": list(range(len(test["preds"]))), "labels": test["labels"],
                            "preds": test["preds"]},
            "compile_time_s": compile_time, "mean_epoch_time_s": sum(later) / len(later),
            "train_time_s": sum(h["epoch_time_s"] for h in history),
            "train_img_per_s": sum(h["train_img_per_s"] for h in history[1:] or history) / len(history[1:] or history),
            "eval_time_s": sum(h["eval_time_s"] for h in history), "peak_memory_mb": peak_memory_mb(device),
            "recompiles": recompiles}


def stop_on_signals() -> None:
    """Ctrl-C, and SIGTERM (how Slurm and Kubernetes stop jobs), stop the run with its checkpoint.

    The handler raises KeyboardInterrupt and also sets INTERRUPTED: Python drops an exception raised
    while a __del__ runs (FFCV's epoch iterator has one), so the loops check the flag as well."""
    def handler(signum, frame):
        global INTERRUPTED
        INTERRUPTED = True
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_if_interrupted() -> None:
    if INTERRUPTED:
        raise KeyboardInterrupt


if __name__ == "__main__":
    stop_on_signals()
    sys.exit(main())
