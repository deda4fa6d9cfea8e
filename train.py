"""Train one ResNet configuration on CIFAR-10; record everything about the run in one JSON file.

    python train.py --arch resnet34 --pool avg --opt sgd
    python train.py --from results/resnet34-avg-sgd-s0.json          # the exact config again
    torchrun --nproc_per_node=2 train.py --arch resnet18               # data-parallel, same flags
    python train.py --eval-only --from results/resnet34-avg-sgd-s0.json  # its kept weights on the test set

The run writes results/<name>.json at the start and after every epoch (status "running", then
"finished" or "diverged"), TensorBoard event files in results/tensorboard/<name>/, and a checkpoint
results/checkpoints/<name>.pt that --resume continues from; a finished run keeps its weights in
results/models/ instead. Exit codes: 0 finished, 1 error, 2 bad arguments, 3 diverged, 130 interrupted.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # the imports below take seconds: run.startup_s.imports

import argparse
import dataclasses
import datetime
import fcntl
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import models
import speed

IMPORTS_S = time.perf_counter() - STARTED

SCHEMA_VERSION = 1  # of the JSON record and the checkpoint: one of another version is refused where it is read
# Published CIFAR-10 recipes, one per optimiser; see the README's "Defaults" section for sources.
# SGD's lr is for batch 512 and scales linearly with the batch size (Goyal et al., 2017).
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.4, "momentum": 0.9, "nesterov": True, "wd": 5e-4, "schedule": "onecycle"},
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "wd": 0.0, "schedule": "cosine"},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "wd": 0.05, "schedule": "cosine"},
}
SGD_REFERENCE_BATCH = 512
SCHEDULES = ("onecycle", "cosine", "step", "multistep", "constant")
# Every flag has one role, declared where build_parser adds it; what each role takes part in:
#   model, recipe, data  what is trained: the checkpoint's fingerprint (a resume must match it), the default
#                        name (spelled out or hashed), the record's "factors" (what plot.py compares configs by)
#   derived  recipe values resolved from --opt, --batch-size and --epochs unless given; a --from replay
#            derives them again, and they are factors only when given
#   eval     how the result is evaluated and reported (--tta, --early-stop): a resume may change it
#   seed     fingerprinted and spelled last in the name; never a factor
#   speed    autocast dtype and memory layout: fingerprinted and named, not factors (HParams show the resolved ones)
#   run      how the run is carried out (data dir, device, workers, compile, progress bars): replayed by --from
#   place    where its files go (--out, --name): recorded, not replayed (a replay lands beside its source)
#   call     what this command does (--resume, --from, --preflight, --eval-only, ...): not recorded
FINGERPRINTED = {"model", "recipe", "derived", "data", "seed", "speed"}
NAME_HASHED = {"model", "recipe", "derived", "data", "eval", "speed"}  # when given, unless spelled out
FACTORS = {"model", "recipe", "derived", "data", "eval"}
HPARAMS = FACTORS | {"seed"}
REPLAYED = FINGERPRINTED | {"eval", "run"}
# A warm-up of a handful of steps lets a short run (2 epochs on 10% of the data is 18 steps at batch
# 512) reach SGD's peak lr 0.4 in under 4 steps, and the net blows up. So by default the lr rises by at
# most 1/WARMUP_MIN_STEPS of its peak per step (see lr_factor).
WARMUP_MIN_STEPS = 50
# A run shorter than the warm-up floor never reaches its peak lr, and its BatchNorm statistics lag
# behind the weights: its evaluation says little about the config, and the run warns.
FEW_STEPS = WARMUP_MIN_STEPS
LOG_EVERY = 25  # steps between progress-bar updates: each reads the loss back, a host sync
EXIT_DIVERGED, EXIT_INTERRUPTED = 3, 130
INTERRUPTED = False  # set by stop_on_signals' handler


def csv_of(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


def add(group, role: str, *names: str, name_part=None, **kw) -> None:
    """One flag with its role, and its part of the default name if it has one (name_part(value) -> text or None)."""
    action = group.add_argument(*names, **kw)
    action.role, action.name_part = role, name_part


def aug_part(aug: str) -> str | None:
    augs = data.parse_aug(aug)
    return None if augs == data.parse_aug(data.DEFAULT_AUG) else "aug-" + ("+".join(augs) or "none")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    o = p.add_argument_group("optimisation (None = derived from --opt, --batch-size, --epochs; see OPTIMIZER_DEFAULTS)")
    d = p.add_argument_group("data")
    r = p.add_argument_group("run")
    e = p.add_argument_group("evaluate a finished run")
    # First the flags the default name spells out, in its order: resnet20-avg-sgd-f0.1-e2-b128-s3
    add(m, "model", "--arch", "--model", default="resnet18", choices=models.ARCHS, help="architecture", name_part=str)
    add(m, "model", "--pool", default="avg", choices=models.POOLS, help="global pooling before the classifier",
        name_part=str)
    add(m, "model", "--pool-norm", action=argparse.BooleanOptionalAction, default=False,
        help="standardise the pooled features before the classifier (a BatchNorm without parameters, "
             "see models.pooling); off: the arch's plain pool", name_part=lambda on: "poolnorm" if on else None)
    add(o, "recipe", "--opt", default="sgd", choices=tuple(OPTIMIZER_DEFAULTS), help="optimiser", name_part=str)
    add(m, "model", "--stem", default="cifar", choices=models.STEMS,
        help="cifar: 3x3 stride-1 conv, no max-pool; imagenet: torchvision's 7x7 stride-2 conv + max-pool",
        name_part=lambda stem: None if stem == "cifar" else stem)
    add(m, "model", "--pretrained", action="store_true", help="start from torchvision's ImageNet weights",
        name_part=lambda on: "pretrained" if on else None)
    add(d, "data", "--fraction", type=float, default=1.0, help="class-balanced fraction of the train set to use",
        name_part=lambda f: f"f{f:g}" if f < 1 else None)
    add(o, "recipe", "--epochs", type=int, default=10, help="training epochs",
        name_part=lambda e: f"e{e}" if e != 10 else None)
    add(o, "recipe", "-b", "--batch-size", type=int, default=512, help="global batch size",
        name_part=lambda b: f"b{b}" if b != 512 else None)
    add(d, "data", "--val-split", type=float, default=0.0, help="fraction of the train set held out for validation",
        name_part=lambda v: f"val{v:g}" if v else None)
    add(d, "data", "--aug", default=data.DEFAULT_AUG, help=f"comma list from {', '.join(data.AUGMENTATIONS)}, or none",
        name_part=aug_part)
    add(r, "eval", "--tta", action="store_true", help="evaluate with horizontal-flip test-time augmentation",
        name_part=lambda on: "tta" if on else None)
    add(r, "seed", "--seed", type=int, default=0, help="seed of weights, data order, subsets and splits",
        name_part=lambda s: f"s{s}")  # last: default_name puts the hash of other flags before it
    # The other flags, by group
    add(m, "model", "--blocks", type=csv_of(int), help="resnet_custom: blocks per stage, e.g. 3,4,4,3")
    add(m, "model", "--channels", type=csv_of(int), help="resnet_custom: channels per stage")
    add(m, "model", "--kernel-size", type=int, help="resnet_custom: convolution kernel size")
    add(m, "model", "--avgpool-size", type=int, help="resnet_custom: output size of the final pool")
    add(m, "model", "--head", type=csv_of(int), help="resnet_custom: hidden sizes of the classifier head, e.g. 256,128")
    add(m, "model", "--dropout", type=float, help="resnet_custom: dropout in the head")
    add(o, "derived", "--lr", type=float, help="peak learning rate (sgd: 0.4 at batch 512, scaled linearly)")
    add(o, "derived", "--momentum", type=float, help="sgd momentum (0.9)")
    add(o, "derived", "--nesterov", action=argparse.BooleanOptionalAction, help="sgd Nesterov momentum")
    add(o, "derived", "--wd", "--weight-decay", type=float, help="weight decay (sgd 5e-4, adam 0, adamw 0.05)")
    add(o, "derived", "--betas", type=csv_of(float), help="adam/adamw betas (0.9,0.999)")
    add(o, "derived", "--schedule", choices=SCHEDULES, help="lr schedule (sgd onecycle, adam cosine)")
    add(o, "derived", "--warmup-epochs", type=float,
        help=f"linear warm-up (onecycle: the peak); default min(2, epochs/5), and the lr rises by at "
             f"most 1/{WARMUP_MIN_STEPS} of its peak per step")
    add(o, "derived", "--milestones", type=csv_of(float),
        help="multistep: epochs where the lr is multiplied by --gamma (step: at 50%% and 75%%)")
    add(o, "recipe", "--gamma", type=float, default=0.1, help="step/multistep decay factor")
    add(o, "recipe", "--label-smoothing", type=float, default=0.1, help="label smoothing of the training loss")
    add(o, "recipe", "--sync-bn", action="store_true",
        help="under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)")
    add(d, "run", "--data-dir", default=data.DATA_DIR, help="folder with train.beton, test.beton, meta.json")
    add(d, "run", "-j", "--workers", type=int,
        help="FFCV loader workers (default: the CPUs this process may use, shared among local ranks, at most 8)")
    add(r, "run", "--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:N")
    add(r, "speed", "--amp", default="auto", type=speed.amp_name, choices=("auto", *speed.AMP_DTYPES),
        help="autocast dtype (fp32: autocast off; 'off' is read as fp32); auto: bf16 on CUDA (fp16 on "
             "GPUs without bf16), on CPU the faster of fp32 and bf16 in a few timed steps")
    add(r, "run", "--compile", action=argparse.BooleanOptionalAction,
        help="torch.compile the model; unset: on for CUDA, on CPU only if compiled steps time faster")
    add(r, "speed", "--channels-last", action=argparse.BooleanOptionalAction,
        help="channels-last memory format for model and inputs; unset: on for CUDA, on CPU only if it times faster")
    add(r, "place", "--out", "--output-dir", default="results",
        help="results folder (with --from: the source record's folder)")
    add(r, "place", "--name", help="run name (default from the config, e.g. resnet34-avg-sgd-s0)")
    add(r, "call", "--resume", action="store_true", help="continue from the run's checkpoint")
    add(r, "call", "--overwrite", action="store_true",
        help="start over even if a finished record or a checkpoint of this name exists")
    add(r, "call", "--preflight", action="store_true",
        help="check that this config runs: data, model, switches, compile, two training steps, one "
             "eval batch and a checkpoint round trip, in a temporary folder; exits 0 or with the error")
    add(r, "eval", "--early-stop", type=int, metavar="PATIENCE",
        help="stop after PATIENCE epochs without a better val accuracy (needs --val-split)")
    add(r, "call", "--from", dest="from_json", metavar="RESULT.json",
        help="take the config of this result (flags given here still override)")
    add(r, "run", "--quiet", action="store_true", help="no progress bars (for sweeps)")
    add(e, "call", "--eval-only", action="store_true",
        help="with --from RESULT.json: evaluate the run's kept weights on the test set (eager, with the "
             "run's amp, layout and --tta unless --tta is given) and print accuracy, per-class accuracy "
             "and the confusion matrix; writes nothing")
    add(e, "call", "--weights", dest="eval_weights", default="final", choices=("final", "best-val"),
        help="--eval-only: the last epoch's weights, or the best val epoch's (runs with --val-split)")
    return p


FLAGS = {a.dest: a for a in build_parser()._actions if hasattr(a, "role")}  # dest -> its argparse action
ROLES = {dest: flag.role for dest, flag in FLAGS.items()}
_UNSET = object()


# --- Configuration ---------------------------------------------------------------------------------------

def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, then what --from's record was given, then the derived defaults, then the checks.
    `args.given` (the flags given here or to --from's run) is what a later --from replays: derived
    values (the lr scaled to the batch, the warm-up) are derived again, never frozen."""
    parser = build_parser()
    args = parser.parse_args(argv)  # first: --help and argparse's own errors speak with the real defaults
    probe = build_parser()  # parses to the flags given on the command line only
    probe.set_defaults(**{dest: _UNSET for dest in FLAGS})
    given = {k: v for k, v in vars(probe.parse_args(argv)).items() if v is not _UNSET}
    record = None
    if args.from_json:
        record = read_record(args.from_json, parser)
        inherited = {k: v for k, v in record["given"].items() if ROLES.get(k) in REPLAYED}
        parser.set_defaults(**inherited)
        args = parser.parse_args(argv)
        given = {**inherited, **given}
        if "out" not in given:  # a replay lands beside its source
            args.out = str(Path(args.from_json).parent)
    args.given = {k: v for k, v in given.items() if ROLES[k] != "call"}
    args.from_record = record
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


def read_record(path: str, parser: argparse.ArgumentParser) -> dict:
    """A run record of this train.py's schema, or argparse's one-line error naming the fix."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        parser.error(f"--from {path}: not a readable JSON file ({type(error).__name__}: {error}): pass a "
                     "results/<name>.json that train.py wrote")
    if not isinstance(record, dict) or "schema_version" not in record:
        parser.error(f"--from {path}: not a run record of train.py (no schema_version): pass a results/<name>.json")
    if record["schema_version"] != SCHEMA_VERSION:
        parser.error(f"--from {path}: written by another train.py (schema {record['schema_version']}, this one "
                     f"reads {SCHEMA_VERSION}): run it with the train.py that wrote it, or train the run again")
    return record


def config_problem(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the config, named by its flag, before any work. Given flags come
    before the values derived from them (a --batch-size of 0 would otherwise show as an lr of 0)."""
    spec, given = models.ARCHS[args.arch], args.given
    stray = [k for s in models.ARCHS.values() for k in s.options
             if k not in spec.options and getattr(args, k) is not None]
    owners = [a for a, s in models.ARCHS.items() if stray and stray[0] in s.options]
    pretrained_archs = ", ".join(a for a, s in models.ARCHS.items() if s.pretrained)
    checks = [
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (0 < args.fraction <= 1, f"--fraction must be in (0, 1], got {args.fraction}"),
        (0 <= args.val_split < 1, f"--val-split must be in [0, 1), got {args.val_split}"),
        (args.wd >= 0, f"--wd must be non-negative, got {args.wd}"),
        (0 <= args.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {args.label_smoothing}"),
        (args.workers is None or args.workers >= 1, f"--workers must be at least 1, got {args.workers}"),
        (args.seed >= 0, f"--seed must be non-negative, got {args.seed}"),
        (0 <= args.warmup_epochs <= args.epochs,
         f"--warmup-epochs must be in [0, --epochs {args.epochs}], got {args.warmup_epochs}"),
        (0 < args.gamma <= 1, f"--gamma must be in (0, 1], got {args.gamma}"),
        (args.opt == "sgd" or not {"momentum", "nesterov"} & set(given),
         f"--momentum and --nesterov are for --opt sgd; {args.opt} has --betas"),
        (args.opt != "sgd" or "betas" not in given, "--betas are for --opt adam or adamw; sgd has --momentum"),
        (args.opt != "sgd" or 0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}"),
        (args.opt == "sgd" or (len(args.betas) == 2 and all(0 <= b < 1 for b in args.betas)),
         f"--betas takes two values in [0, 1), e.g. 0.9,0.999; got {args.betas}"),
        (args.schedule != "multistep" or bool(args.milestones), "--schedule multistep needs --milestones, e.g. 5,8"),
        (args.schedule in ("step", "multistep") or "milestones" not in given,
         f"--milestones are for --schedule multistep or step; the schedule is {args.schedule}"),
        (not args.milestones or all(0 < m <= args.epochs for m in args.milestones),
         f"--milestones must lie in (0, --epochs {args.epochs}], got {args.milestones}"),
        (args.early_stop is None or args.early_stop >= 1, f"--early-stop must be at least 1, got {args.early_stop}"),
        (args.early_stop is None or args.val_split > 0,
         "--early-stop watches the val accuracy: add --val-split, e.g. 0.1 (never the test set)"),
        (args.stem in spec.stems, f"--stem {args.stem} is for the torchvision ResNets; {args.arch} has its own "
                                  "CIFAR stem: drop --stem"),
        (not args.pretrained or spec.pretrained,
         f"--pretrained: {args.arch} has no ImageNet weights; they exist for {pretrained_archs}"),
        (not stray, f"{', '.join('--' + k.replace('_', '-') for k in stray)}: for --arch {', '.join(owners)} only"),
        (not (args.resume and args.overwrite), "--resume continues a run, --overwrite starts it over: pick one"),
        (args.from_json or not args.eval_only, "--eval-only evaluates a finished run: pass --from results/<name>.json"),
        (args.name is None or re.fullmatch(r"[\w.,+=-]+", args.name) is not None,
         f"--name {args.name!r}: use letters, digits and . , + = - _ only"),
    ]
    try:
        data.parse_aug(args.aug)
    except ValueError as error:
        return f"--aug: {error}"
    return next((message for ok, message in checks if not ok), None)


def default_name(args: argparse.Namespace) -> str:
    """resnet34-avg-sgd-s0: the flags with a name_part in words, plus a short hash of any other flag
    given that changes the run, so that two different configs never share a name (and a record)."""
    parts = [part for dest, flag in FLAGS.items() if flag.name_part and (part := flag.name_part(getattr(args, dest)))]
    others = {k: v for k, v in args.given.items() if ROLES[k] in NAME_HASHED and not FLAGS[k].name_part}
    if others:
        parts.insert(-1, hashlib.sha1(json.dumps(others, sort_keys=True, default=list).encode()).hexdigest()[:6])
    return "-".join(parts)


def config_of(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k, role in ROLES.items() if role != "call"}


def factors_of(args: argparse.Namespace) -> dict:
    """What plot.py compares configs by: what was trained and evaluated, less the values derived from
    --opt, --batch-size and --epochs (part of that choice) and unset model options."""
    factors = {k: getattr(args, k) for k, role in ROLES.items()
               if role in FACTORS and (role != "derived" or k in args.given)}
    return as_json({k: v for k, v in factors.items() if v is not None or ROLES[k] != "model"})


def rank0_value(value, world: int, device: torch.device):
    """Rank 0's value, on every rank: measured choices (each rank's timings differ) and rank 0's findings."""
    if world == 1:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, 0, device=device)
    return holder[0]


# --- Distributed (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK) --------------------------------------------

def init_distributed(world: int, device: torch.device) -> int:
    """Start the process group under torchrun (NCCL on CUDA, gloo on CPU); returns the rank."""
    if world == 1:
        return 0
    # A timeout, so that a rank that dies takes the others down instead of leaving them waiting.
    # device_id binds NCCL's communicator to this rank's GPU at once (no guess from the current device).
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(minutes=10),
                                         device_id=device if device.type == "cuda" else None)
    return torch.distributed.get_rank()


# --- Model, optimiser, schedule --------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm parameters, as in most CIFAR-10 recipes.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    optimizer = torch.optim.Adam if args.opt == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=args.lr, betas=tuple(args.betas))


def warmup_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """Steps of the schedule's linear warm-up: --warmup-epochs (default min(2, epochs/5)) in whole steps."""
    return round(args.warmup_epochs * steps_per_epoch)


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int):
    warmup = warmup_steps(args, steps_per_epoch)
    rate_limited = "warmup_epochs" not in args.given
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, warmup, args, rate_limited))


def lr_factor(step: int, steps_per_epoch: int, warmup: int, args: argparse.Namespace,
              rate_limited: bool = True) -> float:
    """The lr multiplier of optimiser step `step` (0-based): a linear warm-up over `warmup` steps from
    above 0 to exactly 1.0, then the schedule's decay (one-cycle and cosine reach 0 after the last
    step). rate_limited (the default warm-up): at most 1/WARMUP_MIN_STEPS of the peak more per step."""
    total = args.epochs * steps_per_epoch
    if step < warmup:
        factor = (step + 1) / warmup
    elif args.schedule == "onecycle":  # the triangular one-cycle of the FFCV/DAWNBench CIFAR recipes
        factor = max(0.0, (total - step) / max(total - warmup, 1))
    elif args.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))
    elif args.schedule in ("step", "multistep"):
        factor = args.gamma ** sum(step >= round(m * steps_per_epoch) for m in args.milestones)
    else:
        factor = 1.0
    return min(factor, (step + 1) / WARMUP_MIN_STEPS) if rate_limited else factor


# --- Training and evaluation -----------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scheduler, scaler, amp, memory, device, args, world,
                    progress_desc, max_steps: int | None = None):
    """One pass; loss and correct counts stay on the device and are read once, at the end. `memory` is
    the model's layout: a channels-last batch would make an NCHW model's convolutions run channels-last."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, first_loss = 0, None
    bar = tqdm(loader, desc=progress_desc, leave=False, dynamic_ncols=True,
               disable=args.quiet or world > 1 and torch.distributed.get_rank() > 0 or not sys.stderr.isatty())
    for step, (images, labels) in enumerate(bar):
        stop_if_interrupted()
        if step == max_steps:  # --preflight
            break
        images = images.contiguous(memory_format=memory)
        with speed.autocast(device, amp):
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
    totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device), first_loss / world])
    if world > 1:
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item(), totals[3].item()


@torch.no_grad()
def evaluate(model, loader, device, amp, memory, num_classes: int, batch_size: int, tta: bool,
             world: int, max_batches: int | None = None) -> dict:
    """Loss (without label smoothing), accuracy, confusion matrix and every image's prediction.

    `model` is the bare module (compiled or not), never the DDP wrapper: no collective hides in its
    forward, so ranks may run different numbers of batches; the results meet in one all-gather.
    The last batch is padded to the full batch size so the compiled model sees one shape only.
    With `tta`, the logits are the mean of the image's and its mirror image's, so losses compare."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    preds, targets = [], []
    for batch, (images, labels) in enumerate(loader):
        if batch == max_batches:  # --preflight
            break
        n = len(labels)
        if n < batch_size:
            images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
        images = images.contiguous(memory_format=memory)
        with speed.autocast(device, amp):
            logits = model(images)
            if tta:
                logits = (logits + model(images.flip(3))) / 2
        logits = logits[:n].float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        pred = logits.argmax(1)
        # index_add_ rather than bincount: bincount reads its input's maximum back to the host.
        confusion.index_add_(0, labels * num_classes + pred, torch.ones_like(pred))
        preds.append(pred)
        targets.append(labels)
    loss_sum, confusion, preds, labels = gather_evaluation(
        loss_sum, confusion, torch.cat(preds), torch.cat(targets), world)
    confusion = confusion.view(num_classes, num_classes)
    total = int(confusion.sum())
    return {"loss": loss_sum / total, "acc": confusion.diag().sum().item() / total, "confusion": confusion.tolist(),
            "preds": preds, "labels": labels}


def gather_evaluation(loss_sum: torch.Tensor, confusion: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor,
                      world: int) -> tuple[float, torch.Tensor, list[int], list[int]]:
    """Totals over all ranks and per-image results in split order, in one all-gather. FFCV's sequential
    distributed order deals image i to rank i % world, so rank r's k-th result is image k * world + r."""
    mine = (loss_sum.item(), confusion.cpu(), preds.tolist(), labels.tolist())
    if world == 1:
        return mine
    parts = [None] * world
    torch.distributed.all_gather_object(parts, mine)

    def in_order(i: int) -> list[int]:  # ranks may hold one image fewer: zip_longest fills with None
        return [v for row in itertools.zip_longest(*(p[i] for p in parts)) for v in row if v is not None]
    return sum(p[0] for p in parts), sum(p[1] for p in parts), in_order(2), in_order(3)


# --- Records: JSON and checkpoint, both written atomically -----------------------------------------------

def environment(device: torch.device) -> dict:
    def git(*argv: str) -> str:  # a copy without git (a tarball, a bare container) records no commit
        where = Path(__file__).resolve().parent
        return subprocess.run(["git", *argv], cwd=where, capture_output=True, text=True).stdout.strip() \
            if shutil.which("git") else ""
    commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    cuda = device.type == "cuda"
    version = importlib.metadata.version
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": version("torchvision"),
            "ffcv": version("ffcv"), "numpy": np.__version__, "host": platform.node(),
            "git_commit": (commit + ("-dirty" if dirty else "")) or None, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if cuda else speed.cpu_name(),
            "cuda": torch.version.cuda if cuda else None, "cudnn": torch.backends.cudnn.version() if cuda else None}


def save_checkpoint(path: Path, state: dict) -> None:
    def write(tmp: Path) -> None:
        try:
            torch.save(state, tmp)
        except RuntimeError as error:  # torch's zip writer reports a failed write (a full disk) this way
            raise OSError(f"writing {tmp}: {error}") from None
    data.write_atomically(path, write)


def load_or_refuse(path: Path, what: str, fix: str, device="cpu"):
    """torch.load of a weights-only file, or one line naming the fix when it is damaged or not a torch file."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # truncated or not a torch file: unpickling errors of many kinds
        raise SystemExit(f"error: {what} is unreadable ({type(error).__name__}): {fix}") from None


def fingerprint(args: argparse.Namespace, meta: dict) -> dict:
    """What decides what a run computes, as JSON values (a tuple and a list of the same numbers must
    compare equal): the fingerprinted flags, the batch of each rank and the data's checksum."""
    flags = {k: getattr(args, k) for k, role in ROLES.items() if role in FINGERPRINTED}
    return as_json({**flags, "batch_size_per_rank": args.batch_size_per_rank,
                    "data_sha256": meta["betons"]["train"]["sha256"]})


def as_json(value):
    return json.loads(json.dumps(value, default=list))


def load_checkpoint(path: Path, args: argparse.Namespace, meta: dict) -> dict | None:
    """The checkpoint to resume from, or None; refuses a damaged one, one of another schema or of another config."""
    if not path.exists():
        return None
    state = load_or_refuse(path, f"checkpoint {path}", "delete it to start the run again")
    version = state.get("schema_version") if isinstance(state, dict) else None
    if version != SCHEMA_VERSION:
        raise SystemExit(f"error: checkpoint {path} was not written by this train.py (schema {version}, this one "
                         f"writes {SCHEMA_VERSION}): pass --overwrite to start the run over, or another --name")
    mine, theirs = fingerprint(args, meta), state["fingerprint"]
    differs = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differs:
        k = differs[0]
        raise SystemExit(f"error: checkpoint {path} is of another config ({k}: {theirs.get(k)!r} there, "
                         f"{mine.get(k)!r} here): use another --name, or --overwrite to start over")
    return state


def json_path_of(args: argparse.Namespace) -> Path:
    return Path(args.out) / f"{args.name}.json"


def checkpoint_path_of(args: argparse.Namespace) -> Path:
    return Path(args.out) / "checkpoints" / f"{args.name}.pt"


def lock_run(args: argparse.Namespace, create: bool):
    """An exclusive flock on OUT/checkpoints/NAME.lock, held until the process ends or closes it; None
    when create is False and there is no lock file (no process has trained the run in this folder)."""
    path = checkpoint_path_of(args).with_suffix(".lock")
    if not create and not path.exists():
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a")
    except OSError as error:
        raise SystemExit(f"error: --out {args.out}: cannot make the results folder there ({error.strerror}): "
                         "pass another --out") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f"error: {args.name} is being trained by another process right now ({path} is locked): "
                         "wait for it, or give this run another --name") from None
    return lock


# --- The run ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Training:
    """What the loop steps: the model in its three roles, the optimiser's state and the speed switches."""
    raw_model: torch.nn.Module  # the weights: what is saved, restored and probed
    model: torch.nn.Module  # what trains: raw_model, DDP-wrapped under torchrun, compiled if chosen
    eval_model: torch.nn.Module  # what evaluates: the bare module (no DDP collective), compiled if chosen
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    switches: dict  # amp, channels_last, compile, each with its reason (speed.choose_switches)
    params: int
    flops: float
    compile_time: float = 0.0
    graphs_compiled: int = 0  # after compiling: more at the end are recompiles

    @property
    def amp(self) -> str:
        return self.switches["amp"]

    @property
    def memory(self) -> torch.memory_format:
        return speed.memory_format(self.switches["channels_last"])


class Loaders(NamedTuple):
    meta: dict  # the data dir's meta.json: classes, counts, mean and std, the betons' checksums
    train: data.DeviceLoader
    val: data.DeviceLoader | None  # None without --val-split
    test: data.DeviceLoader


@dataclasses.dataclass
class Run:
    """One run's parts, filled in by main's phases in their order; each phase takes the run so far."""
    args: argparse.Namespace
    world: int  # processes: 1, or torchrun's WORLD_SIZE
    rank: int
    device: torch.device
    workers: int  # FFCV loader workers of this process
    print0: Callable  # print on rank 0, nothing on the others
    lock: object = None  # rank 0's flock on the run's name (claim_run)
    loaders: Loaders | None = None
    training: Training | None = None
    progress: dict | None = None  # where the run stands: last epoch, best val epoch, history (what a checkpoint holds)
    record: dict | None = None  # the JSON record, written at the start and after every epoch
    board: TensorBoardLog | None = None


def main(argv: list[str] | None = None) -> int:
    lap = stopwatch()  # start-up's parts, from here to the first epoch (run.startup_s)
    speed.check_torch()
    args = parse_config(argv)
    if args.eval_only:
        return evaluate_saved(args)
    run = start_process(args)
    if args.preflight:  # the real path, into a folder that is thrown away
        args.out = tempfile.mkdtemp(prefix="preflight-")
    try:
        if claim_run(run, create=False):  # a finished run, or one another process trains, costs no work
            return 0
        torch.manual_seed(args.seed)
        startup = {"imports": IMPORTS_S, "setup": lap()}  # setup: the config, device, process group, claim
        run.loaders = make_loaders(args, run.device, run.world, run.workers, startup)
        startup["loaders"] = lap() - startup["data_checks"]
        raw_model = build_model(args, len(run.loaders.meta["classes"]))
        if claim_run(run, create=True):  # only now, so that a config that cannot run leaves no folder behind
            return 0
        state = build_training(run, raw_model)
        resume_progress(run, state)
        compile_if_chosen(run)
        startup.update(probes=0.0 if state else run.training.switches["probe_time_s"],
                       compile=run.training.compile_time)
        startup["model"] = lap() - startup["probes"] - startup["compile"]
        start_record(run)
        run.board = TensorBoardLog(run)
        startup["record"] = lap()
        run.record["run"]["startup_s"] = {**startup, "total": sum(startup.values())}
        status, epoch = train_epochs(run)
        if run.world > 1:
            torch.distributed.destroy_process_group()
        return finish_run(run, status, epoch)
    finally:
        if run.lock is not None:
            run.lock.close()  # releases the run's flock (also at once in a process that runs several)
        if args.preflight and run.rank == 0:
            shutil.rmtree(args.out, ignore_errors=True)


def start_process(args: argparse.Namespace) -> Run:
    """This process, alone or one of torchrun's: its device, rank and loader workers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ["LOCAL_RANK"]) if world > 1 else None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    speed.share_compile_threads(local_world, data.usable_cpus())
    device = speed.resolve_device(args.device, local_rank)
    rank = init_distributed(world, device)
    print0 = print if rank == 0 else (lambda *a, **k: None)
    return Run(args, world, rank, device, check_run(args, device, world, local_world, print0), print0)


def claim_run(run: Run, create: bool) -> bool:
    """Hold the run's name (rank 0) and check what is under it; True when --resume finds the run done.
    Refuses a fresh run over a finished record or an interrupted checkpoint (unless --overwrite).

    Called twice: before any work, where only a run that has a lock file is locked; then, once data
    and model have built, the lock is made and the check repeated (another process may have run it
    meanwhile), and --overwrite removes the checkpoint it replaces."""
    args, status, done = run.args, None, None
    json_path, ckpt_path = json_path_of(args), checkpoint_path_of(args)
    if run.rank == 0:
        run.lock = run.lock or lock_run(args, create)
        if json_path.exists():
            try:
                status = json.loads(json_path.read_text()).get("status")
            except (OSError, ValueError, AttributeError):
                status = "unreadable"
        if args.overwrite and create:
            ckpt_path.unlink(missing_ok=True)
        elif args.resume:
            done = status if status in ("finished", "diverged") and not ckpt_path.exists() else None
        elif not args.overwrite and status in ("finished", "diverged", "unreadable"):
            raise SystemExit(f"error: {json_path} already holds a {status} run: give this one another --name, "
                             "or pass --overwrite to replace it")
        elif not args.overwrite and ckpt_path.exists():
            raise SystemExit(f"error: {ckpt_path} holds an interrupted run of this name: pass --resume to continue "
                             "it, --overwrite to start over, or another --name")
    done = rank0_value(done, run.world, run.device)
    if done is not None:
        run.print0(f"{args.name}: already {done} ({json_path}); nothing to resume")
    return done is not None


def check_run(args: argparse.Namespace, device: torch.device, world: int, local_world: int, print0) -> int:
    """Refuse what cannot run on this device and world; returns the loader workers to use."""
    if args.sync_bn and (world == 1 or device.type != "cuda"):
        raise SystemExit("error: --sync-bn needs torchrun with CUDA devices (SyncBatchNorm does not run on CPU)")
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} does not split over {world} processes: "
                         f"use a multiple of {world}")
    if args.amp == "fp16" and device.type == "cpu":
        raise SystemExit("error: --amp fp16 on a CPU is emulated: it trains ~10x slower than bf16 (and evaluated "
                         "10,000 images in 4 minutes here): use --amp bf16, fp32 or auto")
    if args.amp == "bf16" and device.type == "cuda" and not speed.has_real_bf16():
        print0(f"warning: --amp bf16 on {torch.cuda.get_device_name(device)} (compute capability "
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) is emulated, without bf16 tensor "
               "cores or cuDNN bf16 convolutions: --amp fp16 (or auto) trains much faster there")
    args.batch_size_per_rank = args.batch_size // world
    workers, message = data.check_workers(args.workers, local_world)
    if message:
        print0(f"note: {message}")
    return workers


def make_loaders(args: argparse.Namespace, device: torch.device, world: int, workers: int,
                 startup: dict | None = None) -> Loaders:
    """The loaders, after the data checks (their time goes to startup["data_checks"])."""
    shared = dict(device=device, seed=args.seed, workers=workers, distributed=world > 1, data_dir=args.data_dir)
    try:
        checks_start = time.perf_counter()
        meta = data.ensure_valid(args.data_dir)
        if startup is not None:
            startup["data_checks"] = time.perf_counter() - checks_start
        train_loader = data.make_loader("train", args.batch_size_per_rank, aug=args.aug, fraction=args.fraction,
                                        val_split=args.val_split, **shared)
        val_loader = (data.make_loader("val", args.batch_size_per_rank, aug="none", val_split=args.val_split,
                                       **shared) if args.val_split > 0 else None)
        test_loader = data.make_loader("test", args.batch_size_per_rank, aug="none", **shared)
    except (data.DataError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    return Loaders(meta, train_loader, val_loader, test_loader)


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The config's network; models checks resnet_custom's lists, and a problem is one line."""
    try:
        return models.build_from_config(config_of(args), num_classes, pretrained=args.pretrained)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def build_training(run: Run, raw_model: torch.nn.Module) -> dict | None:
    """run.training: the speed switches, DDP wrapper, optimiser, schedule and loss scaling. Returns
    the checkpoint's state with --resume (restored by resume_progress)."""
    args, device, world = run.args, run.device, run.world
    params, flops = models.count_parameters(raw_model), models.forward_flops(raw_model)
    raw_model = raw_model.to(device)
    state = load_checkpoint(checkpoint_path_of(args), args, run.loaders.meta) if args.resume else None
    if state is not None:  # a resumed run keeps what it chose at its start, but --compile
        switches = state["switches"]
        if args.compile is not None:
            switches.update(compile=args.compile, compile_reason="asked")
    elif (key := switch_key(run)) and key in (cache := speed.read_switch_cache()):  # no key: nothing to read
        switches = {**cache[key], "decision": f"reused from {speed.SWITCH_CACHE}", "probe_time_s": 0.0}
        if args.compile is None:  # whether compiling pays depends on this run's length
            speed.decide_compile(switches, run_images(run))
    else:
        probe_start = time.perf_counter()
        switches = speed.choose_switches(args, raw_model, device)
        switches.update(rank0_value({k: switches[k] for k in ("amp", "channels_last")}, world, device))
        switches["probe_time_s"] = time.perf_counter() - probe_start
        auto = args.amp == "auto" or None in (args.channels_last, args.compile)
        switches["decision"] = "auto on CUDA" if device.type == "cuda" else "measured" if auto else "given"
    raw_model = raw_model.to(memory_format=speed.memory_format(switches["channels_last"]))
    if args.sync_bn:
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    model = raw_model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(raw_model, args)
    scheduler = make_scheduler(optimizer, args, len(run.loaders.train))
    scaler = torch.amp.GradScaler(device.type, enabled=switches["amp"] == "fp16")
    run.training = Training(raw_model, model, raw_model, optimizer, scheduler, scaler, switches, params, flops)
    return state


def switch_key(run: Run) -> str | None:
    """The key of this run's auto switches in speed.SWITCH_CACHE: what the probes time (the network, the
    batch, the switches given). None when nothing is probed: on CUDA, under torchrun, or all given."""
    args = run.args
    given = {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile}
    if run.device.type != "cpu" or run.world > 1 or "auto" not in given.values() and None not in given.values():
        return None
    network = {k: getattr(args, k) for k, role in ROLES.items() if role == "model"}
    return speed.switch_key({**network, **given, "batch": args.batch_size_per_rank})


def run_images(run: Run) -> int:
    """The images this process trains on in the whole run: what a compile must repay."""
    return run.args.epochs * len(run.loaders.train) * run.args.batch_size_per_rank


def resume_progress(run: Run, state: dict | None) -> None:
    """run.progress: after the checkpoint's epoch (its weights, optimiser and RNG restored), or at the start."""
    args, training = run.args, run.training
    run.progress = {"epoch": 0, "best": {"acc": None, "epoch": None}, "best_test": None, "best_weights": None,
                    "history": [], "started_at": now()}
    if state is None and args.resume:
        run.print0(f"{args.name}: no checkpoint at {checkpoint_path_of(args)}; starting from scratch")
    if state is not None:
        restore(state, training.raw_model, training.optimizer, training.scheduler, training.scaler, run.device)
        run.progress.update({k: state[k] for k in run.progress})
        run.print0(f"{args.name}: resuming after epoch {run.progress['epoch']}/{args.epochs}")
    run.loaders.train.epoch = run.progress["epoch"]  # the next epoch's data order, as in an uninterrupted run


def compile_if_chosen(run: Run) -> None:
    """Compile before the clock starts, on dummy batches; a second build of the same graphs would show
    as recompiles. Under torchrun the eval model (the bare module) is compiled on its own, so that
    evaluation holds no DDP collective. Auto on CPU keeps the compiled model only if it is faster."""
    training, switches, device, world = run.training, run.training.switches, run.device, run.world
    batch = run.args.batch_size_per_rank
    if switches["compile"] is not False:
        # dynamic=False: shapes never change (drop_last in training, padded eval batches). The time
        # includes torch.compile's first call, which imports the compiler (a second or two).
        start = time.perf_counter()
        compiled = torch.compile(training.model, dynamic=False)
        compiled_eval = compiled if world == 1 else torch.compile(training.raw_model, dynamic=False)
        compile_time = time.perf_counter() - start + speed.compile_on_dummy_batches(
            compiled, compiled_eval, training.raw_model, training.optimizer, training.scaler, training.amp,
            training.memory, device, batch, batch)
        if switches["compile"] is None:
            probe_start = time.perf_counter()
            speed.keep_compile_if_faster(switches, compiled, training.model, training.raw_model, device, batch,
                                         compile_time, run_images(run))
            switches["compile"] = rank0_value(switches["compile"], world, device)
            switches["probe_time_s"] += time.perf_counter() - probe_start
            if not switches["compile"]:  # compiled for nothing: the time was spent probing
                switches["probe_time_s"] += compile_time
        if switches["compile"]:
            training.model, training.eval_model, training.compile_time = compiled, compiled_eval, compile_time
    if switches["decision"] == "measured" and (key := switch_key(run)):
        speed.cache_switches(key, {k: v for k, v in switches.items() if k not in ("decision", "probe_time_s")})
    training.graphs_compiled = speed.compiled_graphs()
    speed.reset_peak_memory(device)  # the peak to report is training's, not the compiler's


def start_record(run: Run) -> None:
    """run.record, the run's JSON record as it starts (written at once), and its first line."""
    args, training, switches, train_loader = run.args, run.training, run.training.switches, run.loaders.train
    steps = len(train_loader)
    run.record = {
        "schema_version": SCHEMA_VERSION, "name": args.name, "status": "running",
        "started_at": run.progress["started_at"], "ended_at": None, "config": config_of(args),
        "factors": factors_of(args), "given": args.given, "from": args.from_json,
        "run": {"device": str(run.device), "world_size": run.world,
                "backend": torch.distributed.get_backend() if run.world > 1 else None,
                "train_images": train_loader.num_samples, "steps_per_epoch": steps,
                "warmup_steps": warmup_steps(args, steps), **switches, "compile_time_s": training.compile_time},
        "env": environment(run.device), "model": {"params": training.params, "flops_per_image": training.flops},
        "classes": run.loaders.meta["classes"], "history": run.progress["history"]}
    if args.epochs * steps < FEW_STEPS and not args.preflight:
        run.record["run"]["warnings"] = [
            f"only {args.epochs * steps} training steps: the lr never reaches its peak and BatchNorm statistics lag "
            f"behind, so the accuracies say little; lower --batch-size or raise --fraction or --epochs to reach "
            f"{FEW_STEPS}+ steps"]
    if run.rank == 0:
        data.save_json_atomic(json_path_of(args), run.record)
    probes = switches.get("probe_img_per_s")
    run.print0(f"{args.name}: {args.arch} ({training.params / 1e6:.2f} M params) on {run.device} "
               f"[amp {switches['amp']}, {'channels-last' if switches['channels_last'] else 'NCHW'}, "
               f"{'compiled' if switches['compile'] else 'eager'}, world {run.world}], "
               f"{train_loader.num_samples:,} train images, {args.epochs} epochs"
               + (f"; compiled in {training.compile_time:.1f} s" if training.compile_time else "")
               + (f"; auto probes {switches['probe_time_s']:.1f} s: eager {probes} img/s" if probes else "")
               + (f", {switches['compile_probe_img_per_s']} img/s" if "compile_probe_img_per_s" in switches else ""))
    for warning in run.record["run"].get("warnings", []):
        run.print0(f"warning: {warning}")


def train_epochs(run: Run) -> tuple[str, int]:
    """The epochs left, each followed by its evaluation, the record and a checkpoint; returns the
    status ("finished", "diverged", "preflight") and the last epoch. Ctrl-C or SIGTERM keep the last checkpoint."""
    args, progress, record = run.args, run.progress, run.record
    first_epoch_here, epoch = progress["epoch"] + 1, progress["epoch"]
    try:
        for epoch in range(first_epoch_here, args.epochs + 1):
            stop_if_interrupted()
            row, results = train_and_evaluate_epoch(run, epoch)
            row["pays_jit"] = epoch == first_epoch_here  # each process's first warms up (decoders, kernels)
            record["history"].append(row)
            if row["train_loss"] is None:
                return "diverged", epoch
            best = progress["best"]
            if "val" in results and (best["acc"] is None or results["val"]["acc"] > best["acc"]):
                progress.update(best={"acc": results["val"]["acc"], "epoch": epoch}, best_test=results["test"],
                                best_weights=cpu_copy(run.training.raw_model.state_dict()))
            progress["epoch"] = epoch
            run.print0(epoch_line(row, args.epochs))
            run.board.log_epoch(row)
            since_best = epoch - (progress["best"]["epoch"] or epoch)  # epochs without a better val accuracy
            stop_early = args.early_stop is not None and since_best >= args.early_stop
            if args.preflight:
                preflight_round_trip(run)
                return "preflight", epoch
            if epoch == args.epochs or stop_early:
                record["final"] = final_summary(
                    record, results, progress, stop_early, run.loaders.meta["classes"], run.training.compile_time,
                    speed.compiled_graphs() - run.training.graphs_compiled, run.device)
                break
            if run.rank == 0:
                save_checkpoint(checkpoint_path_of(args), checkpoint_state(run))
                data.save_json_atomic(json_path_of(args), record)
    except KeyboardInterrupt:
        run.print0(f"\n{args.name}: interrupted after epoch {epoch - 1}; the checkpoint is kept: "
                   "run the same command with --resume to continue")
        # Exit at once: interpreter teardown while FFCV's loader thread is mid-batch can abort (SIGABRT).
        # Every file is complete already: the JSON and the checkpoint are written atomically.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    except OSError as error:
        raise SystemExit(f"error: could not write the record ({error}); the previous JSON and checkpoint are "
                         "intact: free some space and run again with --resume") from None
    return "finished", epoch


def train_and_evaluate_epoch(run: Run, epoch: int) -> tuple[dict, dict]:
    """One epoch of training, timed, then the evaluation of every split: (the history's row, the
    results by split). A diverged epoch's row has train_loss None and no evaluation."""
    args, training, device, world = run.args, run.training, run.device, run.world
    meta, train_loader, val_loader, test_loader = run.loaders
    steps, batches = (2, 1) if args.preflight else (None, None)
    lr = training.optimizer.param_groups[0]["lr"]
    speed.synchronize(device)
    start = time.perf_counter()
    train_loss, train_acc, first_loss = train_one_epoch(
        training.model, train_loader, training.optimizer, training.scheduler, training.scaler, training.amp,
        training.memory, device, args, world, f"epoch {epoch}/{args.epochs}", max_steps=steps)
    speed.synchronize(device)
    epoch_time = time.perf_counter() - start
    row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "first_step_loss": first_loss,
           "lr": lr, "epoch_time_s": epoch_time,
           "train_img_per_s": (steps or len(train_loader)) * args.batch_size / epoch_time}
    if not math.isfinite(train_loss):
        row.update(train_loss=None, first_step_loss=first_loss if math.isfinite(first_loss) else None)
        return row, {}
    if world > 1:
        # DDP broadcasts rank 0's buffers before each forward, so after the last step every rank holds
        # BatchNorm statistics of its own: evaluate the model that is kept, rank 0's, on every rank.
        for buffer in training.raw_model.buffers():
            torch.distributed.broadcast(buffer, 0)
    start = time.perf_counter()
    results = {split: evaluate(training.eval_model, loader, device, training.amp, training.memory,
                               len(meta["classes"]), args.batch_size_per_rank, args.tta, world, max_batches=batches)
               for split, loader in (("val", val_loader), ("test", test_loader)) if loader is not None}
    speed.synchronize(device)
    row["eval_time_s"] = time.perf_counter() - start
    for split, result in results.items():
        row.update({f"{split}_loss": result["loss"], f"{split}_acc": result["acc"]})
    return row, results


def epoch_line(row: dict, epochs: int) -> str:
    line = (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  train loss {row['train_loss']:.3f} "
            f"acc {row['train_acc']:.1%}")
    for split in ("val", "test"):
        if f"{split}_acc" in row:
            line += f"  {split} loss {row[f'{split}_loss']:.3f} acc {row[f'{split}_acc']:.1%}"
    return line + (f"  lr {row['lr']:.3g}  {row['epoch_time_s']:.1f} s  {row['train_img_per_s']:,.0f} img/s"
                   f"  eval {row['eval_time_s']:.1f} s")


def cpu_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def checkpoint_state(run: Run) -> dict:
    training, device = run.training, run.device
    # progress holds the record's history and start time (the same objects): the checkpoint keeps them
    return {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint(run.args, run.loaders.meta), **run.progress,
            "model": training.raw_model.state_dict(),
            "optimizer": training.optimizer.state_dict(), "scheduler": training.scheduler.state_dict(),
            "scaler": training.scaler.state_dict(), "rng_cpu": torch.get_rng_state(), "switches": training.switches,
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore(state: dict, raw_model, optimizer, scheduler, scaler, device: torch.device) -> None:
    raw_model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state["rng_cuda"] is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)


def preflight_round_trip(run: Run) -> None:
    """--preflight: the checkpoint written and read back, and one line (main removes the folder)."""
    args = run.args
    if run.rank == 0:
        save_checkpoint(checkpoint_path_of(args), checkpoint_state(run))
        load_checkpoint(checkpoint_path_of(args), args, run.loaders.meta)
        print(f"preflight ok: {args.name} ({args.arch}, batch {args.batch_size}) ran data, model, switches, "
              "2 training steps, 1 eval batch and a checkpoint round trip")


def final_summary(record: dict, results: dict, progress: dict, stopped_early: bool, classes: list[str],
                  compile_time: float, recompiles: int, device: torch.device) -> dict:
    """The run's result. With --early-stop, the model reported is the one of the best val epoch (the
    epoch early stopping chose, before the patience epochs after it), and its test figures are those
    measured then; otherwise the last epoch's."""
    history = record["history"]
    chosen_by_val = stopped_early or (record["config"]["early_stop"] is not None and progress["best_test"])
    test = progress["best_test"] if chosen_by_val else results["test"]
    reported_epoch = progress["best"]["epoch"] if chosen_by_val else history[-1]["epoch"]
    sample = data.preview_indices(test["labels"])
    steady = [h for h in history if not h.get("pays_jit")] or history
    final = {"test_loss": test["loss"], "test_acc": test["acc"], "confusion": test["confusion"],
             "per_class_acc": per_class_accuracy(test["confusion"], classes), "reported_epoch": reported_epoch,
             "reported_model": "best val epoch (--early-stop)" if chosen_by_val else "last epoch",
             "stopped_early": stopped_early, "last_epoch_test_acc": results["test"]["acc"],
             "val_acc": next((h.get("val_acc") for h in history if h["epoch"] == reported_epoch), None),
             "best_val_acc": progress["best"]["acc"], "best_val_epoch": progress["best"]["epoch"],
             "predictions": {"indices": sample, "labels": [test["labels"][i] for i in sample],
                             "preds": [test["preds"][i] for i in sample]},
             "compile_time_s": compile_time,
             "mean_epoch_time_s": sum(h["epoch_time_s"] for h in steady) / len(steady),
             "train_time_s": sum(h["epoch_time_s"] for h in history),
             "train_img_per_s": sum(h["train_img_per_s"] for h in steady) / len(steady),
             "eval_time_s": sum(h["eval_time_s"] for h in history), "peak_memory_mb": speed.peak_memory_mb(device),
             "recompiles": recompiles}
    if len(classes) <= 10:  # one digit per test image: what paired tests between runs (McNemar) need
        final["test_preds"] = "".join(map(str, test["preds"]))
        final["test_labels"] = "".join(map(str, test["labels"]))
    return final


def per_class_accuracy(confusion: list[list[int]], classes: list[str]) -> dict[str, float]:
    return {c: confusion[i][i] / max(1, sum(confusion[i])) for i, c in enumerate(classes)}


def finish_run(run: Run, status: str, epoch: int) -> int:
    """The last record (with the kept weights' paths), the checkpoint removed, one line; the exit code."""
    args, record = run.args, run.record
    if status == "preflight":  # checked; main throws its folder away
        return 0
    record.update(status=status, ended_at=now())
    if status == "diverged":
        record["diverged_epoch"] = epoch
    if run.rank == 0:
        if status == "finished":
            record["final"]["weights"] = save_weights(run)
            images = keep_preview(Path(args.out), args.data_dir, run.loaders.meta, run.print0)
            if images:
                record["final"]["predictions"]["images"] = images
        data.save_json_atomic(json_path_of(args), record)
        checkpoint_path_of(args).unlink(missing_ok=True)  # the JSON and the kept weights hold the result
        run.board.close(record)
    if status == "diverged":
        run.print0(f"{args.name}: diverged in epoch {epoch} (non-finite training loss): lower --lr")
        return EXIT_DIVERGED
    final = record["final"]
    run.print0(f"{args.name}: finished: test acc {final['test_acc']:.2%}, mean epoch "
               f"{final['mean_epoch_time_s']:.1f} s, {final['train_img_per_s']:,.0f} img/s -> {json_path_of(args)}")
    return 0


def save_weights(run: Run) -> dict:
    """The trained weights (state dict, fp32) in OUT/models/: NAME.pt, and NAME-best-val.pt with a val split."""
    out, name = Path(run.args.out), run.args.name
    kept = {"final": out / "models" / f"{name}.pt"}
    kept["final"].parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(kept["final"], cpu_copy(run.training.raw_model.state_dict()))
    if run.progress["best_weights"] is not None:
        kept["best_val"] = out / "models" / f"{name}-best-val.pt"
        save_checkpoint(kept["best_val"], run.progress["best_weights"])
    return {k: str(v.relative_to(out)) for k, v in kept.items()}


def keep_preview(out: Path, data_dir: str, meta: dict, print0) -> str | None:
    """The data's preview images (data.preview_path) in OUT/previews/, one file per test set, so that
    plot.py draws predictions.png from the results folder alone; their path relative to OUT, or None."""
    name = f"previews/{meta['betons']['test']['sha256'][:12]}.npz"
    try:
        if not (out / name).exists():
            source = data.preview_path(data_dir)
            (out / "previews").mkdir(parents=True, exist_ok=True)
            data.write_atomically(out / name, lambda tmp: shutil.copyfile(source, tmp))
        return name
    except (OSError, data.DataError) as error:
        print0(f"warning: the preview images were not kept ({error}): plot.py will skip predictions.png of this run")
        return None


def stopwatch() -> Callable[[], float]:
    """lap() -> the seconds since the previous lap(), or since stopwatch() for the first."""
    last = time.perf_counter()

    def lap() -> float:
        nonlocal last
        start, last = last, time.perf_counter()
        return last - start
    return lap


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- TensorBoard: OUT/tensorboard/NAME/, beside the JSON record, for `tensorboard --logdir OUT` ----------

# The history's columns as TensorBoard tags: a quantity's train, val and test curves share a chart.
BOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
              "train_acc": "accuracy/train", "val_acc": "accuracy/val", "test_acc": "accuracy/test",
              "lr": "lr", "epoch_time_s": "time/epoch_s", "eval_time_s": "time/eval_s",
              "train_img_per_s": "time/train_img_per_s"}
# The record's final figures, as final/<key>: what the HParams view compares configs by.
BOARD_FINAL = ("test_acc", "test_loss", "best_val_acc", "mean_epoch_time_s", "train_img_per_s")


class TensorBoardLog:
    """Event files (rank 0 only), one TensorBoard run per config, which starts with the run's HParams
    session. If they cannot be written, it says so once and the run goes on: the JSON record is the
    source of truth. A fresh run starts the folder anew; a resumed one appends to it, and its
    purge_step tells readers to drop any epoch logged after the checkpoint, so no epoch shows twice."""

    def __init__(self, run: Run):
        self.print0, self.writer = run.print0, None
        if run.rank == 0 and not run.args.preflight:
            self.guarded(self.open, Path(run.args.out) / "tensorboard" / run.args.name, run.record,
                         run.progress["epoch"])

    def open(self, folder: Path, record: dict, resumed_after: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        if not resumed_after:
            shutil.rmtree(folder, ignore_errors=True)
        started = any(folder.glob("events.out.tfevents.*"))  # by the process this one resumes
        self.writer = SummaryWriter(str(folder), purge_step=resumed_after + 1 if resumed_after else None)
        if not started:
            self.writer.file_writer.add_summary(hparams_summary(record))
        self.writer.flush()

    def log_epoch(self, row: dict) -> None:
        """The epoch's row as scalars at step = epoch, flushed so that TensorBoard shows it at once."""
        def write():
            for key, tag in BOARD_TAGS.items():
                if row.get(key) is not None:
                    self.writer.add_scalar(tag, row[key], row["epoch"])
            self.writer.flush()
        if self.writer is not None:
            self.guarded(write)

    def close(self, record: dict) -> None:
        """The final figures and the HParams session's end (finished or diverged), then close the files."""
        def write():
            step = record["history"][-1]["epoch"] if record["history"] else 0
            for key in BOARD_FINAL:
                if (record.get("final") or {}).get(key) is not None:
                    self.writer.add_scalar(f"final/{key}", record["final"][key], step)
            if record["status"] == "finished":  # torch's session end says success; a diverged run has none
                self.writer.file_writer.add_summary(hparams_summary(record, ended=True), step)
            self.writer.close()
        if self.writer is not None:
            self.guarded(write)

    def guarded(self, write, *args) -> None:
        """write(*args), or say once that the event files stopped. The writer's thread re-raises whatever
        stopped it (a full disk, a deleted folder) at the next call, as any exception type."""
        try:
            write(*args)
        except Exception as error:
            self.writer = None
            self.print0(f"warning: TensorBoard logging stopped ({type(error).__name__}: {error}); the run goes on, "
                        "and its JSON record, the source of truth, is complete")


def hparams_summary(record: dict, ended: bool = False):
    """The HParams session's start (the config: the roles in HPARAMS and the speed switches as resolved)
    or its end, as a Summary. Only sessions, no experiment: TensorBoard then builds one from every run
    under --logdir, so a sweep's configs line up in one table. Booleans as text: as numbers they read 0/1."""
    from torch.utils.tensorboard.summary import hparams
    config = {k: v for k, v in record["config"].items() if ROLES[k] in HPARAMS}
    config.update({k: record["run"][k] for k in ("amp", "channels_last", "compile", "device", "world_size")})
    config = {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) if isinstance(v, bool) else v
              for k, v in config.items()}
    _, start, end = hparams(config, {})
    return end if ended else start


# --- --eval-only: a finished run's kept weights on the test set again ------------------------------------

def evaluate_saved(args: argparse.Namespace) -> int:
    """Evaluate the weights a finished run kept and print what the record's `final` shows; write nothing.
    Eager, with the run's autocast dtype, memory layout and per-rank eval batch: on the run's device and
    torch build this gives the record's test accuracy exactly (compiled kernels may round differently)."""
    record, source = args.from_record, Path(args.from_json)
    device = speed.resolve_device(args.device, None)
    amp, channels_last = record["run"]["amp"], record["run"]["channels_last"]
    memory = speed.memory_format(channels_last)
    args.batch_size_per_rank = args.batch_size // record["run"]["world_size"]
    classes = record["classes"]
    model = models.build_from_config(record["config"], num_classes=len(classes))
    weights, state = kept_state(record, source, args.eval_weights, model, device)
    model.load_state_dict(state)
    model = model.to(device, memory_format=memory)
    meta, _, _, test_loader = make_loaders(args, device, 1, data.check_workers(args.workers, 1)[0])
    if meta["classes"] != classes:
        raise SystemExit(f"error: {args.data_dir} holds the classes {meta['classes']}, the run was trained on "
                         f"{classes}: pass the run's --data-dir")
    result = evaluate(model, test_loader, device, amp, memory, len(classes), args.batch_size_per_rank, args.tta, 1)
    print(f"{record['name']}: {args.eval_weights} weights ({weights}) on {device} [amp {amp}, "
          f"{'channels-last' if channels_last else 'NCHW'}, eager, batch {args.batch_size_per_rank}, "
          f"{'tta' if args.tta else 'no tta'}]")
    recorded, history = None, record["history"]  # the record's figures of these weights: none for another --tta
    if args.tta == record["config"]["tta"]:
        epoch = record["final"]["best_val_epoch"] if args.eval_weights == "best-val" else history[-1]["epoch"]
        row = next(r for r in history if r["epoch"] == epoch)
        recorded = {"epoch": epoch, "acc": row["test_acc"], "loss": row["test_loss"],
                    "compiled": record["run"]["compile"]}
    print(evaluation_report(result, classes, recorded))
    return 0


def kept_state(record: dict, source: Path, which: str, model: torch.nn.Module, device) -> tuple[Path, dict]:
    """The weights file --eval-only evaluates and its state dict, if it fits the record's network;
    refuses in one line, naming the fix, a run that kept none or a file that holds something else."""
    name, status, kept = record["name"], record["status"], (record.get("final") or {}).get("weights")
    again = f"python train.py --from {source} --name {name}"  # trains the recorded run again under its name
    if status != "finished" or not kept:
        fix = {"running": f"finish it first: {again} --resume",
               "diverged": f"it diverged: train it again with a lower --lr ({again} --lr LR --overwrite)"}
        raise SystemExit(f"error: {source} keeps no weights (status {status}): "
                         + fix.get(status, f"run it again to completion: {again} --overwrite"))
    if which.replace("-", "_") not in kept:
        raise SystemExit(f"error: {source} has no {which} weights (it was trained without --val-split): "
                         "use --weights final")
    path = source.parent / kept[which.replace("-", "_")]
    if not path.exists():
        raise SystemExit(f"error: {path}, the {which} weights of {source}, is missing: "
                         f"run it again to completion: {again} --overwrite")
    state = load_or_refuse(path, f"{path}, the weights of {source}", f"make them again: {again} --overwrite", device)
    mismatch = state_mismatch(state, model.state_dict())
    if mismatch:
        raise SystemExit(f"error: {path} does not hold the weights of {name}'s network "
                         f"({network_of(record['config'])}): {mismatch}: "
                         f"point --from to the record of the run that made it, or make {name}'s weights again: "
                         f"{again} --overwrite")
    return path, state


def network_of(config: dict) -> str:
    """The flags that make a recorded run's network, e.g. '--arch resnet20 --pool avg'."""
    def flag(key, value):
        name = key.replace("_", "-")
        if isinstance(value, bool):
            return f"--{'' if value else 'no-'}{name}"
        return f"--{name} {','.join(map(str, value)) if isinstance(value, list) else value}"
    return " ".join(flag(k, v) for k, v in config.items() if ROLES.get(k) == "model" and v is not None
                    and (k in ("arch", "pool") or v != FLAGS[k].default))


def state_mismatch(state, expected: dict) -> str | None:
    """The first way `state` is not a state dict of the network whose state dict is `expected`; None if it is."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return (f"it holds a {type(state).__name__}, not a state dict of tensors"
                + (" (a training checkpoint?)" if isinstance(state, dict) else ""))
    counts = f"{len(state)} tensors there, {len(expected)} in the network"
    shape = lambda tensor: "×".join(map(str, tensor.shape)) or "a scalar"  # noqa: E731
    for key, tensor in expected.items():
        if key not in state or state[key].shape != tensor.shape:
            why = (f"{key} is missing" if key not in state else
                   f"{key} is {shape(state[key])} there, {shape(tensor)} in the network")
            return f"its tensors do not match ({why}; {counts})"
    extra = next((key for key in state if key not in expected), None)
    return f"its tensors do not match ({extra} is not in the network; {counts})" if extra else None


def evaluation_report(result: dict, classes: list[str], recorded: dict | None) -> str:
    """Accuracy (and how it compares with the record's), per-class accuracy, and the confusion matrix
    with rows true and columns predicted, as text."""
    confusion = result["confusion"]
    total = sum(map(sum, confusion))
    lines = [f"test acc {result['acc']:.2%} ({sum(confusion[i][i] for i in range(len(classes)))}/{total}), "
             f"loss {result['loss']:.4f}"]
    if recorded is not None:
        verdict = ("identical" if (result["acc"], result["loss"]) == (recorded["acc"], recorded["loss"]) else
                   f"the same accuracy, loss off by {result['loss'] - recorded['loss']:.2g}"
                   if result["acc"] == recorded["acc"] else
                   f"{round(abs(result['acc'] - recorded['acc']) * total)} images differ: the run was evaluated by "
                   "compiled kernels, which round differently from eager ones" if recorded["compiled"] else
                   "differs: another device, torch build or data?")
        lines.append(f"the record, epoch {recorded['epoch']}: test acc {recorded['acc']:.2%}, loss "
                     f"{recorded['loss']:.4f}: {verdict}")
    width, name_width = max(6, len(str(total)) + 1), max(map(len, classes))
    lines.append("per-class accuracy:")
    lines += [f"  {c:<{name_width}}  {acc:7.2%}" for c, acc in per_class_accuracy(confusion, classes).items()]
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    lines.append("  " + " " * name_width + "".join(f"{c[:width - 1]:>{width}}" for c in classes))
    lines += [f"  {c:<{name_width}}" + "".join(f"{n:>{width}}" for n in row)
              for c, row in zip(classes, confusion, strict=True)]
    return "\n".join(lines)


# --- Ctrl-C and SIGTERM ----------------------------------------------------------------------------------

def stop_on_signals() -> None:
    """Ctrl-C, and SIGTERM (how Slurm and Kubernetes stop jobs), stop the run with its checkpoint.

    The handler raises KeyboardInterrupt and also sets INTERRUPTED: Python drops an exception raised
    while a __del__ runs (FFCV's epoch iterator has one), so the loops check the flag as well. A second
    signal while stopping (a second Ctrl-C, the sweep's SIGTERM after the terminal's SIGINT) is ignored."""
    def handler(signum, frame):
        global INTERRUPTED
        if not INTERRUPTED:
            INTERRUPTED = True
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_if_interrupted() -> None:
    if INTERRUPTED:
        raise KeyboardInterrupt


if __name__ == "__main__":
    stop_on_signals()
    code = main()
    # Every file is written and closed by now. The interpreter's teardown would take another second (in
    # native code: no Python runs in it), in every process of a sweep: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
