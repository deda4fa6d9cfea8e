"""How fast a run trains, shared by train.py and bench.py: the device (resolve_device: a GPU this torch cannot
use stops the run in one line), the speed switches (choose_switches: autocast dtype, channels-last and
torch.compile, each with its reason and, on CPU, the probes that decide it) and the timing helpers."""
from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import itertools
import json
import os
import platform
import re
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data

# The oldest torch with every API this code calls: torch.amp.GradScaler(device) and
# torch.cuda.is_bf16_supported(including_emulation=...) are torch 2.3's. Tested: requirements.txt's pin.
MIN_TORCH = (2, 3)
TESTED_TORCH = "2.14.1"
CUDA_BUILD_MIN_DRIVER = "580"  # the pinned wheel's CUDA 13.0 runtime needs a driver of the 580 branch or newer
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the one vocabulary of dtypes
PROBE_BATCH = 128  # eager probes of dtype x layout: the modes ranked the same at batch 64 and 512 here
PROBE_STEPS = 2  # timed steps per probe, after an untimed one; the fastest step counts
# Probes that compete are timed in turns, PROBE_ROUNDS times, each keeping its best: a burst of load on
# the machine then slows one round of every probe, not every step of one (which the cache would keep).
PROBE_ROUNDS = 3
# Auto turns a switch on only if it is this much faster: below is the machine's noise, where the plain
# fp32 NCHW eager step is the safer bet (no compile time, fp32 numerics).
PROBE_MARGIN = 1.05


def check_torch() -> None:
    """Stop in one line, naming the fix, when this torch is older than MIN_TORCH."""
    version = torch.__version__
    if tuple(map(int, re.match(r"(\d+)\.(\d+)", version).groups())) < MIN_TORCH:
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
    """An indexed device (set_device refuses one without) among those this process sees: "auto" and "cuda" mean
    cuda:LOCAL_RANK under torchrun, else cuda:0; auto takes the CPU only where there is no NVIDIA driver."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() or driver_cuda_version() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise SystemExit(f"error: --device {name}: this trainer runs on cpu or cuda devices only")
    found, visible = driver_cuda_version(), os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    major, minor = divmod(found or 0, 1000)
    if not torch.cuda.is_available():  # torch says only that it sees no GPU: say why, and the fix
        if found is None:
            raise SystemExit(f"error: --device {name} but no CUDA device is visible: use --device cpu or auto")
        if torch.version.cuda is None:
            raise SystemExit(f"error: this machine has an NVIDIA driver but torch {torch.__version__} is a "
                             "CPU-only build: install the CUDA build (README, 'On a GPU'), or pass --device cpu")
        if major < int(torch.version.cuda.split(".")[0]):
            raise SystemExit(f"error: the NVIDIA driver supports CUDA {major}.{minor // 10}, but torch "
                             f"{torch.__version__} is built for CUDA {torch.version.cuda}: update the driver "
                             f"({CUDA_BUILD_MIN_DRIVER} or newer), or install a torch build for CUDA {major}.x "
                             "(README, 'On a GPU'), or pass --device cpu")
        raise SystemExit(f"error: the NVIDIA driver works (CUDA {major}.{minor // 10}) but CUDA sees no GPU "
                         f"(CUDA_VISIBLE_DEVICES={visible}): check it, or pass --device cpu")
    index = device.index if device.index is not None else (local_rank or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise SystemExit(f"error: --device cuda:{index} but this process sees {count} CUDA device(s) "
                         f"(CUDA_VISIBLE_DEVICES={visible}): use cuda:0 to cuda:{count - 1}")
    # torch only warns when it has no kernels for the GPU; the first kernel would die
    arch_list, capability = torch.cuda.get_arch_list(), torch.cuda.get_device_capability(index)
    if arch_list and not has_kernels_for(capability, arch_list):
        raise SystemExit(f"error: {torch.cuda.get_device_name(index)} (compute capability {capability[0]}."
                         f"{capability[1]}) has no kernels in torch {torch.__version__}, which is built for "
                         f"{' '.join(arch_list)}: install a build that has them, e.g. PyTorch's CUDA 12.6 wheels "
                         "(sm_50 to sm_90): 'make setup TORCH_CUDA=cu126', or pass --device cpu")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True  # shapes never change: let cuDNN time its kernels once, keep the best
    return device


def driver_cuda_version() -> int | None:
    """The CUDA version the NVIDIA driver supports (12080 = 12.8), None without a driver. Asked of libcuda,
    which comes with the driver: torch only warns, and sees no GPU, when the driver is too old for it."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    return (version.value or None) if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else None


def has_kernels_for(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build for arch_list runs on a GPU of this compute capability: a cubin (sm_XY) runs on
    major X at minor Y or above, sm_90a only on 9.0, and the driver compiles PTX (compute_XY) for XY on."""
    for kind, number in (arch.split("_") for arch in arch_list):
        built = divmod(int(number.rstrip("af")), 10)
        if built == capability or built < capability and (kind == "compute" or built[0] == capability[0]
                                                          and not number.endswith("a")):
            return True
    return False


def amp_name(flag: str) -> str:
    """--amp's value: "off" is a spelling of fp32."""
    return "fp32" if flag == "off" else flag


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@functools.cache
def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return model[1].strip() if model else platform.processor() or platform.machine()


# The CPU's auto switches, decided once per machine for each (CPU, torch, threads, what the probes
# time): the probes take seconds of every run, and a sweep runs the same network again and again.
# Delete the file to measure again; CIFAR_SWITCH_CACHE names another file.
SWITCH_CACHE = Path(os.environ.get("CIFAR_SWITCH_CACHE")
                    or Path.home() / ".cache" / "cifar-resnets" / "cpu-switches.json")
SWITCH_RULES = 3  # part of every key: raised when how a decision is made or what it holds changes, so
# older entries are measured again


def switch_key(probed: dict) -> str:
    machine = {"rules": SWITCH_RULES, "cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    return json.dumps({**machine, **probed}, sort_keys=True, default=list)


def read_switch_cache() -> dict:
    try:
        cache = json.loads(SWITCH_CACHE.read_text())
    except (OSError, ValueError):  # none yet, or damaged: measure
        return {}
    return cache if isinstance(cache, dict) else {}


def cache_switches(key: str, switches: dict) -> None:
    """Add a decision to the cache file, written atomically; a folder that cannot be written only means
    measuring again next time."""
    try:
        SWITCH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        data.save_json_atomic(SWITCH_CACHE, {**read_switch_cache(), key: switches})
    except OSError:
        pass


def has_real_bf16() -> bool:
    """bf16 in hardware (8.0+): is_bf16_supported() also counts a T4's emulation, where fp16 runs fast."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def dummy_batch(batch_size: int, device: torch.device, memory: torch.memory_format) -> tuple[torch.Tensor, ...]:
    """Random CIFAR-shaped images and labels, the same every call: what probes, compiling and bench.py step on."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn((batch_size, 3, 32, 32), device=device, generator=generator).contiguous(memory_format=memory)
    return images, torch.randint(0, 10, (batch_size,), device=device, generator=generator)


def choose_switches(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> dict:
    """Autocast dtype, channels-last and torch.compile, each with its reason; a switch given is taken as given.
    On CUDA auto turns all three on (tensor cores want fp16/bf16 in NHWC; compile fuses BatchNorm and ReLU). On
    CPU each may pay or cost, by processor and network: auto times eager steps of every dtype x layout left
    open (in turns: best_of_rounds), takes the fastest if it beats fp32 NCHW by PROBE_MARGIN, and leaves
    "compile" to keep_compile_if_faster."""
    cuda = device.type == "cuda"
    amps = [args.amp] if args.amp != "auto" else ["bf16" if has_real_bf16() else "fp16"] if cuda else ["fp32", "bf16"]
    layouts = [args.channels_last] if args.channels_last is not None else [True] if cuda else [False, True]
    auto = "auto on CUDA" if cuda else f"auto on CPU: the fastest eager probe, if {PROBE_MARGIN}x fp32 NCHW or faster"
    compiled = True if cuda and args.compile is None else args.compile
    compile_reason = "asked" if args.compile is not None else auto
    probes = {}  # images/s by (dtype, channels_last): on CPU, where more than one choice is left open
    if not cuda and len(amps) * len(layouts) > 1:
        batch = min(args.batch_size_per_rank, PROBE_BATCH)
        copies = {(amp, nhwc): copy.deepcopy(model).to(memory_format=memory_format(nhwc))
                  for amp, nhwc in itertools.product(amps, layouts)}
        probes = best_of_rounds({(amp, nhwc): functools.partial(step_rate, probe, probe, amp, batch, device,
                                                                memory_format(nhwc))
                                 for (amp, nhwc), probe in copies.items()})
    amp, channels_last = max(itertools.product(amps, layouts), key=lambda choice: probes.get(choice, 0))
    if probes and probes[amp, channels_last] < PROBE_MARGIN * probes.get(("fp32", False), 0):
        amp, channels_last = "fp32", False
    if args.sync_bn and args.compile is None:
        compiled, compile_reason = False, ("auto with --sync-bn: off, as torch.compile cannot trace SyncBatchNorm's "
                                           "collectives (a graph break at every BatchNorm); --compile forces it on")
    if compiled and cuda and amp == "bf16" and not has_real_bf16():
        compiled, compile_reason = False, ("off: --amp bf16 on a GPU without bf16 hardware (below 8.0), where "
                                           "Inductor does not compile bf16 graphs; --amp fp16 compiles")
    return {"amp": amp, "amp_reason": "asked" if args.amp != "auto" else auto,
            "channels_last": channels_last, "channels_last_reason": "asked" if args.channels_last is not None else auto,
            "compile": compiled, "compile_reason": compile_reason,
            "probe_img_per_s": {f"{a} {'channels-last' if c else 'NCHW'}": rate for (a, c), rate in probes.items()}}


def keep_compile_if_faster(switches: dict, compiled, model, raw_model: torch.nn.Module, device: torch.device,
                           batch_size: int, compile_s: float | None = None, images: int | None = None) -> None:
    """Auto on CPU: time compiled against eager steps at the run's batch, then decide_compile (bench.py, timing
    steady steps only, passes neither the compile time nor the run's images)."""
    memory = memory_format(switches["channels_last"])
    rates = best_of_rounds({name: functools.partial(step_rate, stepped, raw_model, switches["amp"], batch_size,
                                                    device, memory)
                            for name, stepped in (("compiled", compiled), ("eager", model))})
    switches.update(compile_probe_img_per_s=rates, **({} if compile_s is None else {"probe_compile_s": compile_s}))
    decide_compile(switches, images)


def decide_compile(switches: dict, images: int | None) -> None:
    """switches["compile"] from the compile probe's rates: compiled steps must beat eager ones by PROBE_MARGIN
    and, in a run of `images` training images, save more time than compiling took (probe_compile_s), which a
    short run does not repay. A decision reused from SWITCH_CACHE is made again for each run's length."""
    rates, compile_s = switches["compile_probe_img_per_s"], switches.get("probe_compile_s")
    faster = rates["compiled"] > PROBE_MARGIN * rates["eager"]
    saved = images / rates["eager"] - images / rates["compiled"] if images else None
    switches.update(compile=faster and (saved is None or saved > compile_s),
                    compile_reason=f"auto on CPU: compiled steps at the run's batch kept if {PROBE_MARGIN}x the eager "
                                   "ones or faster" + ("" if saved is None else
                                   f" and they save the run's {images:,} training images more time than compiling "
                                   f"took ({saved:.1f} s against {compile_s:.1f} s)"))


def best_of_rounds(probes: dict) -> dict:
    """Each probe's best images/s (probes: key -> a call that times steps) over PROBE_ROUNDS rounds in turn."""
    rates = dict.fromkeys(probes, 0.0)
    for _ in range(PROBE_ROUNDS):
        for key, probe in probes.items():
            rates[key] = max(rates[key], probe())
    return {key: round(rate) for key, rate in rates.items()}


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
    """Compile the train and eval models on a dummy batch each; the seconds it took (kept out of the epoch
    times). No optimizer step is taken, and the BatchNorm statistics the training forward moved are put back."""
    saved = {k: v.clone() for k, v in raw_model.state_dict().items()}
    start = time.perf_counter()
    for model, training, size in ((train_model, True, train_batch), (eval_model, False, eval_batch)):
        model.train(training)
        with torch.set_grad_enabled(training), autocast(device, amp):
            logits = model(dummy_batch(size, device, memory)[0])
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


def reset_peak_memory(device: torch.device) -> None:  # after compiling: the peak to report is training's
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process (KiB on Linux)
