"""How fast a run trains: the device, the speed switches (autocast dtype, channels-last, torch.compile)
and the timing helpers, shared by train.py and bench.py.

    device = resolve_device("auto", None)        # cuda:N or cpu, with the reason when a GPU is unusable
    switches = choose_switches(args, model, device)   # each switch with its reason and its probes
    with autocast(device, switches["amp"]):      # "fp32" (autocast off), "bf16" or "fp16", everywhere
        loss = model(images.contiguous(memory_format=memory_format(switches["channels_last"])))
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import itertools
import os
import re
import resource
import time

import torch
import torch.nn.functional as F


# The oldest torch with every API this code calls: torch.amp.GradScaler(device) and
# torch.cuda.is_bf16_supported(including_emulation=...) are torch 2.3's. Tested: requirements.txt's pin.
MIN_TORCH = (2, 3)
TESTED_TORCH = "2.14.1"


def check_torch() -> None:
    """Stop in one line, naming the fix, when this torch is older than MIN_TORCH."""
    version = torch.__version__
    if tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups()) < MIN_TORCH:
        oldest = ".".join(map(str, MIN_TORCH))
        raise SystemExit(f"error: torch {version} is older than this code supports (torch {oldest} or newer; "
                         f"tested with {TESTED_TORCH}): run 'make setup' for the pinned torch, or give "
                         f"SYSTEM_TORCH=1 a Python whose torch is {oldest}+")


def share_compile_threads(local_ranks: int, cpus: int) -> None:
    """Share the node's CPUs among its ranks' Inductor compile workers (each would start min(32, CPUs)),
    unless the user set TORCHINDUCTOR_COMPILE_THREADS."""
    if local_ranks > 1 and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        threads = max(1, cpus // local_ranks)
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(threads)  # for the compile workers it starts
        import torch._inductor.config  # read at its import: it may have been imported already
        torch._inductor.config.compile_threads = threads


def resolve_device(name: str, local_rank: int | None) -> torch.device:
    """An indexed device (torch.cuda.set_device refuses one without), checked against the devices this
    process sees: "auto" and "cuda" mean cuda:LOCAL_RANK under torchrun, else cuda:0."""
    if name == "auto":
        unusable = cuda_unusable_reason()  # None when CUDA works, or on a machine without an NVIDIA driver
        if unusable:
            raise SystemExit(f"error: {unusable}")
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise SystemExit(f"error: --device {name}: this trainer runs on cpu or cuda devices only")
    if not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} but {cuda_unusable_reason() or 'no CUDA device is visible'}: "
                         "use --device cpu or auto")
    index = device.index if device.index is not None else (local_rank or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise SystemExit(f"error: --device cuda:{index} but this process sees {count} CUDA device(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                         f"use cuda:0 to cuda:{count - 1}")
    device = torch.device("cuda", index)
    missing = missing_kernels_reason(index)
    if missing:
        raise SystemExit(f"error: {missing}")
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True  # shapes never change: let cuDNN time its kernels once, keep the best
    return device


CUDA_BUILD_MIN_DRIVER = "580"  # the pinned wheel's CUDA 13.0 runtime needs a driver of the 580 branch or newer


def driver_cuda_version() -> int | None:
    """The CUDA version the NVIDIA driver supports (12080 = 12.8), None without a driver. Asked of libcuda,
    which comes with the driver: torch only warns, and sees no GPU, when the driver is too old for it."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    return (version.value or None) if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else None


def cuda_unusable_reason() -> str | None:
    """Why this machine's NVIDIA GPU cannot be used by this torch build; None when CUDA works or there is
    no NVIDIA driver (a CPU machine: nothing to explain)."""
    if torch.cuda.is_available():
        return None
    found = driver_cuda_version()
    if found is None:
        return None
    if torch.version.cuda is None:
        return (f"this machine has an NVIDIA driver but torch {torch.__version__} is a CPU-only build: install the "
                "CUDA build (README, 'On a GPU'), or pass --device cpu")
    major, minor = divmod(found, 1000)
    if major < int(torch.version.cuda.split(".")[0]):
        return (f"the NVIDIA driver supports CUDA {major}.{minor // 10}, but torch {torch.__version__} is built for "
                f"CUDA {torch.version.cuda}: update the driver ({CUDA_BUILD_MIN_DRIVER} or newer), or install a "
                f"torch build for CUDA {major}.x (README, 'On a GPU'), or pass --device cpu")
    return (f"the NVIDIA driver works (CUDA {major}.{minor // 10}) but CUDA sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): check it, or pass --device cpu")


def has_kernels_for(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build for arch_list runs on a GPU of this compute capability: a cubin (sm_XY) runs on
    major X at minor Y or above, sm_90a only on 9.0, and the driver compiles PTX (compute_XY) for XY on."""
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        major, minor = divmod(int(number.rstrip("af")), 10)
        if kind == "compute" and (major, minor) <= capability:
            return True
        if kind == "sm" and (((major, minor) == capability) if number.endswith("a") else
                             (major == capability[0] and minor <= capability[1])):
            return True
    return False


def missing_kernels_reason(index: int) -> str | None:
    """Why this torch build cannot run on GPU `index` (torch only warns; the first kernel then dies with
    "no kernel image is available"); None when it can."""
    arch_list = torch.cuda.get_arch_list()
    capability = torch.cuda.get_device_capability(index)
    if not arch_list or has_kernels_for(capability, arch_list):
        return None
    cc = "{}.{}".format(*capability)
    return (f"{torch.cuda.get_device_name(index)} (compute capability {cc}) has no kernels in torch "
            f"{torch.__version__}, which is built for {' '.join(arch_list)}: install a build that has them, e.g. "
            f"PyTorch's CUDA 12.6 wheels (sm_50 to sm_90): 'make setup TORCH_CUDA=cu126', or pass --device cpu")


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the one vocabulary of dtypes
PROBE_BATCH = 128  # eager probes of dtype x layout: the modes ranked the same at batch 64 and 512 here
PROBE_STEPS = 2  # timed steps per probe, after an untimed one; the fastest step counts
# Auto turns a switch on only if it is this much faster: below, the probes are within the machine's
# noise, and the plain fp32 NCHW eager step is the safer bet (no compile time, fp32 numerics).
PROBE_MARGIN = 1.05


def amp_name(flag: str) -> str:
    """--amp's value: "off" is a spelling of fp32."""
    return "fp32" if flag == "off" else flag


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def dummy_batch(batch_size: int, device: torch.device, memory: torch.memory_format,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random CIFAR-shaped images and labels: what probes, compiling and benchmarks step on."""
    generator = generator or torch.Generator(device=device).manual_seed(0)
    images = torch.randn((batch_size, 3, 32, 32), device=device, generator=generator)
    return images.contiguous(memory_format=memory), torch.randint(0, 10, (batch_size,), device=device,
                                                                   generator=generator)


def choose_switches(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> dict:
    """Autocast dtype, channels-last and torch.compile for this run, each with its reason; switches given
    on the command line are taken as given.

    On CUDA, auto turns all three on: tensor cores want half precision in NHWC, and compile fuses
    BatchNorm and ReLU into fewer kernels. On CPU each may pay or cost, by processor and network (on a
    2-core AMX Xeon at batch 512, bf16 trains resnet18 1.8x faster and resnet18-imagenet 2x slower), so
    auto times eager steps of every dtype x layout left open and takes the fastest if it beats fp32
    NCHW by PROBE_MARGIN, leaving "compile" None for keep_compile_if_faster, after compiling."""
    amps = [args.amp] if args.amp != "auto" else None
    layouts = [args.channels_last] if args.channels_last is not None else None
    probes = {}
    if device.type == "cuda":
        amps, layouts = amps or ["bf16" if has_real_bf16() else "fp16"], layouts or [True]
        compiled, auto = (True if args.compile is None else args.compile), "auto on CUDA"
    else:
        amps, layouts = amps or ["fp32", "bf16"], layouts or [False, True]
        compiled, auto = args.compile, f"auto on CPU: the fastest eager probe, if {PROBE_MARGIN}x fp32 NCHW or faster"
        batch = min(args.batch_size_per_rank, PROBE_BATCH)
        for amp, channels_last in itertools.product(amps, layouts) if len(amps) * len(layouts) > 1 else ():
            memory = memory_format(channels_last)
            probe = copy.deepcopy(model).to(memory_format=memory)
            probes[probe_name(amp, channels_last)] = round(step_rate(probe, probe, amp, batch, device, memory))
    amp, channels_last = max(((a, c) for a in amps for c in layouts), key=lambda ac: probes.get(probe_name(*ac), 0))
    plain = probes.get(probe_name("fp32", False))
    if plain and probes[probe_name(amp, channels_last)] < PROBE_MARGIN * plain:
        amp, channels_last = "fp32", False
    compile_reason = "asked" if args.compile is not None else auto
    if args.sync_bn and args.compile is None:
        compiled, compile_reason = False, ("auto with --sync-bn: off, because SyncBatchNorm's forward calls "
                                           "torch.distributed collectives that torch.compile cannot trace (graph "
                                           "breaks at every BatchNorm layer, open upstream issues); --compile "
                                           "forces it on")
    if compiled and device.type == "cuda" and amp == "bf16" and not has_real_bf16():
        # Inductor runs every graph with bf16 inputs or outputs eager on such a GPU (compile_fx.py,
        # _check_triton_bf16_support): the record says what runs.
        compiled, compile_reason = False, ("off: --amp bf16 on a GPU without bf16 hardware (compute capability "
                                           "below 8.0), where torch.compile's Inductor does not compile bf16 graphs "
                                           "and runs them eager; --amp fp16 compiles")
    return {"amp": amp, "amp_reason": "asked" if args.amp != "auto" else auto,
            "channels_last": channels_last, "channels_last_reason": "asked" if args.channels_last is not None else auto,
            "compile": compiled, "compile_reason": compile_reason, "probe_img_per_s": probes}


def has_real_bf16() -> bool:
    """bf16 in hardware (8.0 or later): is_bf16_supported() also counts a T4's emulation, without bf16
    tensor cores or cuDNN bf16 convolutions, where fp16 with a GradScaler runs fast."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def probe_name(amp: str, channels_last: bool) -> str:
    return f"{amp} {'channels-last' if channels_last else 'NCHW'}"


def keep_compile_if_faster(switches: dict, compiled, model, raw_model: torch.nn.Module, device: torch.device,
                           batch_size: int) -> None:
    """Auto on CPU: switches["compile"] is whether compiled steps beat eager ones by PROBE_MARGIN at the
    run's batch, with the rates and the reason."""
    memory = memory_format(switches["channels_last"])
    rates = {"compiled": round(step_rate(compiled, raw_model, switches["amp"], batch_size, device, memory)),
             "eager": round(step_rate(model, raw_model, switches["amp"], batch_size, device, memory))}
    switches.update(compile=rates["compiled"] > PROBE_MARGIN * rates["eager"], compile_probe_img_per_s=rates,
                    compile_reason=f"auto on CPU: compiled steps at the run's batch, after compiling, "
                                   f"kept if {PROBE_MARGIN}x the eager ones or faster")


def step_rate(model, raw_model: torch.nn.Module, amp: str, batch_size: int, device: torch.device,
              memory: torch.memory_format, steps: int = PROBE_STEPS) -> float:
    """Images/s of plain SGD steps of `model`, which trains raw_model's weights (raw_model, or a compiled
    or DDP wrapper of it). Weights, buffers and the RNG are put back: the run starts as if unprobed."""
    saved, rng = {k: v.clone() for k, v in raw_model.state_dict().items()}, torch.get_rng_state()
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=1e-3)
    images, labels = dummy_batch(batch_size, device, memory)
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, amp):
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


def compile_on_dummy_batches(train_model, eval_model, raw_model, optimizer, scaler, amp: str, memory, device,
                             train_batch: int, eval_batch: int) -> float:
    """Compile the train and eval models by running each once on a dummy batch; returns the seconds
    it took (reported apart, kept out of the epoch times). No optimizer step is taken, and the
    BatchNorm statistics the training forward moved are put back."""
    saved = {k: v.clone() for k, v in raw_model.state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    for model, training, size in ((train_model, True, train_batch), (eval_model, False, eval_batch)):
        images, _ = dummy_batch(size, device, memory, generator)
        model.train(training)
        with torch.set_grad_enabled(training), autocast(device, amp):
            logits = model(images)
        if training:
            scaler.scale(logits.float().logsumexp(1).mean()).backward()
            optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    elapsed = time.perf_counter() - start
    raw_model.load_state_dict(saved)
    return elapsed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def reset_peak_memory(device: torch.device) -> None:
    """After compiling: the peak to report is training's, not the compiler's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process (KiB on Linux)

