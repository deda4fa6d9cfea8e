"""A strict CUDA stand-in for tests on machines without a GPU (torch 2.14, CUDA 13.0 build).

Only torch's lowest CUDA entry points are replaced: the torch._C functions that would reach the
driver (device count, get/set device, device exchange, streams, synchronize, allocator stats, the
init that binds _get_device_properties and the default generators), NVML's raw device count, and
the bf16 tensor probe. Everything above them stays torch's own Python code, so a call that the real
API refuses still fails the same way:

    torch.cuda.set_device(torch.device("cuda"))   # ValueError: Expected a torch.device with a specified index
    torch.cuda.set_device("cuda:1")               # torch.AcceleratorError: invalid device ordinal (count=1)
    torch.empty(1, device="cuda")                 # RuntimeError: Found no NVIDIA driver (not stood in)

Device state is modelled as c10 does it with CUDA >= 12: each host thread has its own current
device (a new thread starts on 0), cudaSetDevice creates the device's primary context, and the
device guards (torch.cuda.device, Stream(device=...), Event.record) restore the previous device
lazily (c10::cuda::MaybeExchangeDevice / MaybeSetDevice). torch.cuda.set_stream moves the calling
thread to the stream's device (THCPModule_setStream_wrap). So a test can see which thread set which
device and which thread created a context on which GPU.

torch.cuda.Stream and torch.cuda.Event are replaced by strict stand-in classes (the real ones are C
types whose constructors and record/wait reach the driver): ids, devices, record/wait/query and
synchronize are modelled; cuda_stream, elapsed_time and IPC raise.

Use (tests/conftest.py imports the two fixtures, so every test can ask for them):
    with standin("A100", count=2) as gpu:
        torch.cuda.set_device(1)
        assert gpu.set_device_calls == [(1, "MainThread")]

    def test_x(fake_gpu): ...                            # runs on T4, A100 and H100
    @pytest.mark.parametrize("fake_gpu", ["T4"], indirect=True)
    @pytest.mark.parametrize("fake_gpu", [("A100", 2)], indirect=True)
    @pytest.mark.parametrize("fake_gpu", [{"profile": "T4", "driver_cuda_version": 12080}], indirect=True)
    def test_y(fake_gpus): gpu = fake_gpus("H100", count=4)  # factory, undone at teardown

"Driver present, CUDA unusable" (a driver older than the wheel's CUDA major): pass
driver_cuda_version=12080 (what cudaDriverGetVersion reports for a CUDA 12.8 driver). Then, as on
such a machine, torch._C._cuda_getDeviceCount() is 0 with the "CUDA initialization: The NVIDIA
driver on your system is too old (found version 12080)" UserWarning, is_available() is False,
device_count() before init is NVML's count (the driver works, so NVML does), torch.cuda.init()
raises, and gpu.driver_cuda_version() / gpu.proc_driver_version are the driver-present probes.
driver_cuda_version=0 simulates no driver at all.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass, fields
from typing import Any, Iterator, NamedTuple

import pytest
import torch

CUDA_DEVICE_TYPE = 1  # c10::DeviceType::CUDA, the third field of a stream's (id, index, type)
GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """What a GPU model is: the fields torch.cuda.get_device_properties reports of it."""
    name: str
    major: int
    minor: int
    total_memory: int
    multi_processor_count: int
    L2_cache_size: int


@dataclass(frozen=True)
class GpuProfile(Hardware):
    # torch.cuda.is_bf16_supported(including_emulation=True) on a GPU below sm_80 asks whether a bf16
    # tensor can be created (torch/cuda/__init__.py:_check_bf16_tensor_supported); on a T4 it can.
    bf16_tensors: bool = True
    driver_version: str = "580.95.05"  # the kernel module's release, for proc_driver_version


PROFILES = {
    "P100": GpuProfile("Tesla P100-PCIE-16GB", 6, 0, 16 * GIB, 56, 4 * 2**20),
    "V100": GpuProfile("Tesla V100-SXM2-32GB", 7, 0, 32 * GIB, 80, 6 * 2**20),
    "T4": GpuProfile("Tesla T4", 7, 5, 15 * GIB, 40, 4 * 2**20),
    "A100": GpuProfile("NVIDIA A100-SXM4-80GB", 8, 0, 80 * GIB, 108, 40 * 2**20),
    "H100": GpuProfile("NVIDIA H100 80GB HBM3", 9, 0, 80 * GIB, 132, 50 * 2**20),
}


@dataclass(frozen=True)
class DeviceProperties(Hardware):
    """What torch.cuda.get_device_properties returns here (the real one is a C type)."""
    uuid: str = ""
    warp_size: int = 32
    is_integrated: bool = False
    is_multi_gpu_board: bool = False


class Call(NamedTuple):
    """One stood-in entry point reached: its name, arguments and the thread that called it."""
    name: str
    args: tuple
    thread: str
    thread_id: int


def _thread() -> tuple[str, int]:
    t = threading.current_thread()
    return t.name, threading.get_ident()


def _is_int(x: Any) -> bool:  # THPUtils_checkLong: an int that is not a bool
    return isinstance(x, int) and not isinstance(x, bool)


def _too_old_message(version: int) -> str:  # c10/cuda/CUDAFunctions.cpp device_count_impl
    return (f"The NVIDIA driver on your system is too old (found version {version}). Please update your GPU "
            "driver by downloading and installing a new version from the URL: "
            "http://www.nvidia.com/Download/index.aspx Alternatively, go to: https://pytorch.org to install a "
            "PyTorch version that has been compiled with your version of the CUDA driver.")


NO_DRIVER_MESSAGE = ("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed "
                     "a driver from http://www.nvidia.com/Download/index.aspx")


class StandinGenerator:
    """A CUDA default generator's seed/offset state (CUDAGeneratorImpl: 8-byte seed + 8-byte offset)."""

    STATE_BYTES = 16

    def __init__(self, gpu: "FakeGpu", index: int):
        self._gpu, self.index = gpu, index
        self._seed, self._offset = 67280421310721, 0  # c10::detail::default_rng_seed_val

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def manual_seed(self, seed: int) -> "StandinGenerator":
        self._gpu._record("generator.manual_seed", (self.index, int(seed)))
        self._seed, self._offset = int(seed) & (2**64 - 1), 0
        return self

    def initial_seed(self) -> int:
        return self._seed

    def seed(self) -> int:
        import random
        return self.manual_seed(random.getrandbits(63)).initial_seed()

    def get_state(self) -> torch.Tensor:
        self._gpu._record("generator.get_state", (self.index,))
        raw = self._seed.to_bytes(8, "little") + self._offset.to_bytes(8, "little")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()

    def set_state(self, state: torch.Tensor) -> "StandinGenerator":
        # at::detail::check_rng_state and CUDAGeneratorImpl::set_state
        if not isinstance(state, torch.Tensor) or state.layout != torch.strided or state.dtype != torch.uint8:
            raise RuntimeError("RNG state must be a torch.ByteTensor")
        if state.device.type != "cpu":
            raise RuntimeError("RNG state must be a torch.ByteTensor")
        if state.numel() not in (self.STATE_BYTES, self.STATE_BYTES - 8):
            raise RuntimeError("RNG state is wrong size")
        raw = bytes(state.contiguous().tolist())
        self._seed = int.from_bytes(raw[:8], "little")
        self._offset = int.from_bytes(raw[8:16], "little") if len(raw) == 16 else 0
        self._gpu._record("generator.set_state", (self.index,))
        return self

    def get_offset(self) -> int:
        return self._offset


class _Memory:
    """One device's caching-allocator counters, as torch._C._cuda_memoryStats nests them."""

    def __init__(self):
        self.current = self.peak = self.allocated = self.freed = 0

    def nested(self) -> dict:
        stat = {"current": self.current, "peak": self.peak, "allocated": self.allocated, "freed": self.freed}
        zero = dict.fromkeys(stat, 0)
        per_pool = {"all": dict(stat), "small_pool": dict(zero), "large_pool": dict(stat)}
        stats = {key: {pool: dict(v) for pool, v in per_pool.items()}
                 for key in ("allocated_bytes", "reserved_bytes", "active_bytes", "requested_bytes")}
        count = {"all": dict(zero), "small_pool": dict(zero), "large_pool": dict(zero)}
        for key in ("allocation", "segment", "active", "inactive_split", "inactive_split_bytes"):
            stats[key] = {pool: dict(v) for pool, v in count.items()}
        stats.update(num_alloc_retries=0, num_ooms=0, num_sync_all_streams=0, num_device_alloc=0,
                     num_device_free=0, max_split_size=-1, oversize_allocations=dict(zero),
                     oversize_segments=dict(zero))
        return stats


class FakeGpu:
    """The state behind one stand-in session, and the record of what reached it.

    Records, each a list you can read during or after the session:
      calls              every stood-in entry point reached, as Call(name, args, thread, thread_id)
      set_device_calls   (index, thread) of each torch._C._cuda_setDevice (torch.cuda.set_device), in order
      device_switches    (from, to, thread) of each modelled cudaSetDevice that changed a thread's device
                         (set_device, torch.cuda.device, device guards, set_stream / StreamContext)
      contexts           {device: thread} of the primary contexts created, and by which thread
      synchronize_calls  (device, thread) of torch._C._cuda_synchronize
      stream_sets        (stream device, thread) of torch._C._cuda_setStream
    """

    def __init__(self, profile: str | GpuProfile, count: int = 1, driver_cuda_version: int = 13000):
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        if count < 1:
            raise ValueError("count must be at least 1 (use driver_cuda_version=0 for no driver)")
        self.count = count
        self.driver_cuda_version_value = driver_cuda_version
        built = torch.version.cuda
        built_major = int(built.split(".")[0]) if built else 0
        # CUDA's rule: a driver serves runtimes of its own major version and older (minor-version
        # compatibility inside a major). A 12.x driver cannot run a 13.0 wheel.
        self.usable = driver_cuda_version > 0 and driver_cuda_version // 1000 >= built_major
        self.calls: list[Call] = []
        self.set_device_calls: list[tuple[int, str]] = []
        self.device_switches: list[tuple[int, int, str]] = []
        self.contexts: dict[int, str] = {}
        self.synchronize_calls: list[tuple[int, str]] = []
        self.stream_sets: list[tuple[int, str]] = []
        self.memory = [_Memory() for _ in range(count)]
        self._tls = threading.local()
        self._lock = threading.RLock()
        self._next_stream = 0
        self._warned = False

    # -- what a test reads --------------------------------------------------------------------

    def calls_named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def driver_cuda_version(self) -> int | None:
        """The driver-present probe: what cuDriverGetVersion would say (None: no driver)."""
        return self.driver_cuda_version_value or None

    @property
    def proc_driver_version(self) -> str | None:
        """What /proc/driver/nvidia/version would hold (None: no driver loaded)."""
        if not self.driver_cuda_version_value:
            return None
        v = self.profile.driver_version
        return (f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {v}  Release Build  (dvs-builder@U16-I3-B03-4-3)\n"
                "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")

    def allocate(self, device: int, nbytes: int) -> None:
        """Move the allocator counters as an allocation of nbytes on device would."""
        m = self.memory[device]
        m.current += nbytes
        m.allocated += nbytes
        m.peak = max(m.peak, m.current)

    def free(self, device: int, nbytes: int) -> None:
        m = self.memory[device]
        m.current -= nbytes
        m.freed += nbytes

    def properties(self, index: int) -> DeviceProperties:
        hardware = {f.name: getattr(self.profile, f.name) for f in fields(Hardware)}
        return DeviceProperties(**hardware, uuid=f"GPU-00000000-0000-0000-0000-{index:012d}")

    # -- the per-thread device model (c10/cuda/CUDAFunctions.cpp, CUDA >= 12) -------------------

    def _record(self, name: str, args: tuple = ()) -> None:
        self.calls.append(Call(name, args, *_thread()))

    @property
    def _runtime(self) -> int:  # cudaGetDevice: a new host thread is on device 0
        return getattr(self._tls, "runtime", 0)

    @property
    def _target(self) -> int:  # c10's thread_local targetDeviceIndex (a lazily restored device)
        return getattr(self._tls, "target", -1)

    def _create_context(self, device: int) -> None:
        with self._lock:
            self.contexts.setdefault(device, threading.current_thread().name)

    def _cuda_set_device(self, device: int) -> None:  # cudaSetDevice: eagerly creates the context
        if not 0 <= device < self.count:
            raise torch.AcceleratorError("CUDA error: invalid device ordinal\n"
                                         "GPU device may be out of range, do you have enough GPUs?")
        before = self._runtime
        self._tls.runtime = device
        if before != device:
            self.device_switches.append((before, device, threading.current_thread().name))
        self._create_context(device)

    def _c10_get_device(self) -> int:
        return self._target if self._target >= 0 else self._runtime

    def _c10_set_device(self, device: int, force: bool = False) -> None:
        if device < 0:
            raise RuntimeError(f"device id must be positive!{device}")
        self._tls.target = -1
        if device == self._runtime and not force:
            return
        self._cuda_set_device(device)

    def _c10_maybe_set_device(self, device: int) -> None:
        if device in self.contexts:
            self._c10_set_device(device)
        else:
            self._tls.target = device

    def _c10_exchange_device(self, to: int) -> int:
        cur = self._target
        self._tls.target = -1
        if cur < 0:
            cur = self._runtime
            if to == cur:
                return cur
        self._cuda_set_device(to)
        return cur

    def _c10_maybe_exchange_device(self, to: int) -> int:
        cur = self._runtime
        if to == cur:
            return cur
        if to in self.contexts:
            self._cuda_set_device(to)
        else:
            self._tls.target = to
        return cur

    @contextlib.contextmanager
    def _guard(self, device: int) -> Iterator[None]:  # c10::cuda::CUDAGuard
        previous = self._c10_exchange_device(device)
        try:
            yield
        finally:
            self._c10_maybe_set_device(previous)

    def _check_index(self, index: int) -> None:  # c10::cuda::check_gpu
        if not 0 <= index < self.count:
            raise RuntimeError(f"Device index value {index} is out of index range [0, {self.count})")

    def _streams(self) -> dict[int, int]:  # the thread_local current stream id per device
        if not hasattr(self._tls, "streams"):
            self._tls.streams = {}
        return self._tls.streams

    def _new_stream_id(self) -> int:
        with self._lock:
            self._next_stream += 1
            return (self._next_stream << 5) | 0b10  # any nonzero id: 0 is the default stream

    # -- the stood-in torch._C entry points -----------------------------------------------------

    def getDeviceCount(self) -> int:
        self._record("_cuda_getDeviceCount")
        if self.usable:
            return self.count
        if self.driver_cuda_version_value > 0 and not self._warned:  # c10::cuda::device_count's TORCH_WARN
            self._warned = True
            warnings.warn("CUDA initialization: " + _too_old_message(self.driver_cuda_version_value), UserWarning,
                          stacklevel=2)
        return 0

    def raw_device_count_nvml(self) -> int:
        """NVML comes with the driver: it counts the GPUs even when the CUDA runtime cannot use them."""
        self._record("_raw_device_count_nvml")
        if not self.driver_cuda_version_value:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file: No such file or directory")
        return self.count

    def cuda_init(self) -> None:
        """THCPModule_initExtension: fails as CUDAHooks::init does, else binds what _lazy_init expects."""
        self._record("_cuda_init")
        if not self.driver_cuda_version_value:
            raise RuntimeError(NO_DRIVER_MESSAGE)
        if not self.usable:
            raise RuntimeError(_too_old_message(self.driver_cuda_version_value))
        torch.cuda.default_generators = tuple(StandinGenerator(self, i) for i in range(self.count))
        torch.cuda._get_device_properties = self.get_device_properties

    def get_device_properties(self, index: int) -> DeviceProperties:
        self._record("_get_device_properties", (index,))
        self._check_index(index)
        return self.properties(index)

    def getDevice(self) -> int:
        torch.cuda._lazy_init()  # torch::utils::cuda_lazy_init()
        self._record("_cuda_getDevice")
        return self._c10_get_device()

    def setDevice(self, device: Any) -> None:
        if not _is_int(device):
            raise RuntimeError("invalid argument to setDevice")
        torch.cuda._lazy_init()
        self._record("_cuda_setDevice", (device,))
        self.set_device_calls.append((device, threading.current_thread().name))
        # THCPModule_setDevice_wrap calls c10::cuda::set_device(device, /*force=*/true) in this build
        # (libtorch_python.so): cudaSetDevice always runs, so the context always exists after it.
        self._c10_set_device(device, force=True)

    def exchangeDevice(self, device: Any) -> int:
        return self._exchange("_cuda_exchangeDevice", device, self._c10_exchange_device)

    def maybeExchangeDevice(self, device: Any) -> int:
        return self._exchange("_cuda_maybeExchangeDevice", device, self._c10_maybe_exchange_device)

    def _exchange(self, name: str, device: Any, exchange) -> int:  # both bindings check their argument alike
        if not _is_int(device):
            raise RuntimeError("invalid argument to exchangeDevice")
        if device < 0:
            return -1
        torch.cuda._lazy_init()
        self._record(name, (device,))
        return exchange(device)

    def hasPrimaryContext(self, device: int) -> bool:
        return device in self.contexts

    def synchronize(self) -> None:
        device = self._runtime  # cudaDeviceSynchronize works on (and needs a context on) the thread's device
        self._record("_cuda_synchronize", (device,))
        self._create_context(device)
        self.synchronize_calls.append((device, threading.current_thread().name))

    def getCurrentStream(self, index: Any) -> tuple[int, int, int]:
        if not _is_int(index):
            raise RuntimeError("invalid argument to getCurrentStream")
        index = self._c10_get_device() if index == -1 else index
        self._check_index(index)
        self._record("_cuda_getCurrentStream", (index,))
        return self._streams().get(index, 0), index, CUDA_DEVICE_TYPE

    def getDefaultStream(self, index: Any) -> tuple[int, int, int]:
        if not _is_int(index):
            raise RuntimeError("invalid argument to getDefaultStream")
        index = self._c10_get_device() if index == -1 else index
        self._check_index(index)
        self._record("_cuda_getDefaultStream", (index,))
        return 0, index, CUDA_DEVICE_TYPE

    def setStream(self, stream_id: int = 0, device_index: int = 0, device_type: int = 0) -> None:
        """THCPModule_setStream_wrap: moves the thread to the stream's device, then sets the stream."""
        if device_type != CUDA_DEVICE_TYPE:
            raise RuntimeError(f"Expected a CUDA stream, got device type {device_type}")
        self._check_index(device_index)
        self._record("_cuda_setStream", (stream_id, device_index))
        self.stream_sets.append((device_index, threading.current_thread().name))
        if self._c10_get_device() != device_index:  # c10::cuda::set_device(index, /*force=*/false)
            self._c10_set_device(device_index)
        self._streams()[device_index] = stream_id

    def _valid_allocator_device(self, device: Any) -> int:  # CUDACachingAllocator assertValidDevice
        if not _is_int(device) or not 0 <= device < self.count:
            raise RuntimeError(f"Invalid device argument {device}: did you call init?")
        return device

    def memoryStats(self, device: Any) -> dict:
        self._record("_cuda_memoryStats", (device,))
        return self.memory[self._valid_allocator_device(device)].nested()

    def resetPeakMemoryStats(self, device: Any) -> None:
        self._record("_cuda_resetPeakMemoryStats", (device,))
        m = self.memory[self._valid_allocator_device(device)]
        m.peak = m.current

    def resetAccumulatedMemoryStats(self, device: Any) -> None:
        self._record("_cuda_resetAccumulatedMemoryStats", (device,))
        m = self.memory[self._valid_allocator_device(device)]
        m.allocated = m.freed = 0

    def emptyCache(self) -> None:
        self._record("_cuda_emptyCache")

    def check_bf16_tensor_supported(self, device: Any) -> bool:
        """torch.cuda._check_bf16_tensor_supported: would create a bf16 tensor on the device."""
        self._record("_check_bf16_tensor_supported", (device,))
        index = torch.cuda._get_device_index(device, optional=True)
        self._check_index(index)
        return self.profile.bf16_tensors


class StandinStream:
    """Strict stand-in for torch.cuda.Stream: an id on a device; no kernels run anywhere."""

    gpu: FakeGpu  # bound per session by standin()

    def __init__(self, device: Any = None, priority: int = 0, **kwargs):
        gpu = self.gpu
        if "stream_id" in kwargs and "device_index" in kwargs:  # Stream(stream_id=..., device_index=..., ...)
            self.stream_id, self.device_index = int(kwargs["stream_id"]), int(kwargs["device_index"])
            self.device_type = int(kwargs.get("device_type", CUDA_DEVICE_TYPE))
            gpu._check_index(self.device_index)
        else:  # getStreamFromPool on the current device (under torch.cuda.device(device) if given)
            guard = torch.cuda.device(device) if device is not None else contextlib.nullcontext()
            with guard:
                index = gpu._c10_get_device()
                with gpu._guard(index):  # initDeviceStreamState's CUDAGuard + cudaStreamCreate
                    gpu._create_context(index)
            self.stream_id, self.device_index, self.device_type = gpu._new_stream_id(), index, CUDA_DEVICE_TYPE
            gpu._record("Stream", (self.device_index, priority))
        self.priority = priority

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    @property
    def cuda_stream(self) -> int:
        raise RuntimeError("cuda stand-in: Stream.cuda_stream has no real stream behind it")

    def wait_event(self, event: "StandinEvent") -> None:
        event.wait(self)

    def wait_stream(self, stream: "StandinStream") -> None:
        self.wait_event(stream.record_event())

    def record_event(self, event: "StandinEvent | None" = None) -> "StandinEvent":
        event = event if event is not None else torch.cuda.streams.Event()
        event.record(self)
        return event

    def query(self) -> bool:
        self.gpu._record("Stream.query", (self.device_index, self.stream_id))
        return True

    def synchronize(self) -> None:
        self.gpu._record("Stream.synchronize", (self.device_index, self.stream_id))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StandinStream) and (self.stream_id, self.device_index, self.device_type) == (
            other.stream_id, other.device_index, other.device_type)

    def __hash__(self) -> int:
        return hash((self.stream_id, self.device_index, self.device_type))

    def __enter__(self):  # torch.cuda.Stream is itself a context manager (torch.Stream)
        self._context = torch.cuda.StreamContext(self)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def __repr__(self) -> str:
        return f"<StandinStream device={self.device} stream_id={self.stream_id}>"


class StandinEvent:
    """Strict stand-in for torch.cuda.Event (at::cuda::CUDAEvent): created on its first record."""

    gpu: FakeGpu

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False,
                 external: bool = False):
        self.enable_timing, self.blocking, self.interprocess = enable_timing, blocking, interprocess
        self.device_index: int | None = None
        self.recorded_on: StandinStream | None = None

    def record(self, stream: StandinStream | None = None) -> None:
        stream = stream if stream is not None else torch.cuda.current_stream()
        gpu = self.gpu
        if self.device_index is None:  # createEvent(stream.device_index()) under a CUDAGuard
            with gpu._guard(stream.device_index):
                pass
            self.device_index = stream.device_index
        if self.device_index != stream.device_index:
            raise RuntimeError(f"Event device {self.device_index} does not match recording stream's device "
                               f"{stream.device_index}.")
        with gpu._guard(self.device_index):
            gpu._record("Event.record", (stream.device_index, stream.stream_id))
        self.recorded_on = stream

    def wait(self, stream: StandinStream | None = None) -> None:
        stream = stream if stream is not None else torch.cuda.current_stream()
        if self.device_index is not None:  # an event never recorded is a no-op to wait on
            with self.gpu._guard(stream.device_index):
                self.gpu._record("Event.wait", (stream.device_index, stream.stream_id))

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.gpu._record("Event.synchronize", (self.device_index,))

    def elapsed_time(self, end_event: "StandinEvent") -> float:
        raise RuntimeError("cuda stand-in: Event.elapsed_time has no timings to report")

    def ipc_handle(self):
        raise RuntimeError("cuda stand-in: Event.ipc_handle is not stood in")

    @property
    def cuda_event(self) -> int:
        raise RuntimeError("cuda stand-in: Event.cuda_event has no real event behind it")


@contextlib.contextmanager
def standin(profile: str | GpuProfile = "A100", count: int = 1, driver_cuda_version: int = 13000
            ) -> Iterator[FakeGpu]:
    """Stand in `count` GPUs of `profile` (P100, V100, T4, A100, H100) for torch's CUDA entry points, then undo."""
    gpu = FakeGpu(profile, count, driver_cuda_version)
    stream_cls = type("StandinStream", (StandinStream,), {"gpu": gpu})
    event_cls = type("StandinEvent", (StandinEvent,), {"gpu": gpu})
    cuda = torch.cuda
    saved_queue = list(cuda._queued_calls)
    with pytest.MonkeyPatch.context() as mp:
        # A fresh process as far as torch.cuda's Python state goes; restored on exit.
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        mp.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
        mp.setattr(cuda, "_initialized", False)
        mp.setattr(cuda, "_cached_device_count", None)
        mp.setattr(cuda, "default_generators", ())
        mp.setattr(cuda, "_get_device_properties", None, raising=False)
        C = torch._C
        for name, fn in {"_cuda_getDeviceCount": gpu.getDeviceCount, "_cuda_init": gpu.cuda_init,
                         "_cuda_getDevice": gpu.getDevice, "_cuda_setDevice": gpu.setDevice,
                         "_cuda_exchangeDevice": gpu.exchangeDevice,
                         "_cuda_maybeExchangeDevice": gpu.maybeExchangeDevice,
                         "_cuda_hasPrimaryContext": gpu.hasPrimaryContext,
                         "_cuda_synchronize": gpu.synchronize,
                         "_cuda_getCurrentStream": gpu.getCurrentStream,
                         "_cuda_getDefaultStream": gpu.getDefaultStream, "_cuda_setStream": gpu.setStream,
                         "_cuda_memoryStats": gpu.memoryStats,
                         "_cuda_resetPeakMemoryStats": gpu.resetPeakMemoryStats,
                         "_cuda_resetAccumulatedMemoryStats": gpu.resetAccumulatedMemoryStats,
                         "_cuda_emptyCache": gpu.emptyCache}.items():
            mp.setattr(C, name, fn)
        # torch.cuda binds these two at import (torch/cuda/__init__.py: _exchange_device = torch._C...).
        mp.setattr(cuda, "_exchange_device", gpu.exchangeDevice)
        mp.setattr(cuda, "_maybe_exchange_device", gpu.maybeExchangeDevice)
        mp.setattr(cuda, "_raw_device_count_nvml", gpu.raw_device_count_nvml)
        mp.setattr(cuda, "_check_bf16_tensor_supported", gpu.check_bf16_tensor_supported)
        mp.setattr(cuda, "Stream", stream_cls)
        mp.setattr(cuda.streams, "Stream", stream_cls)
        mp.setattr(cuda, "Event", event_cls)
        mp.setattr(cuda.streams, "Event", event_cls)
        try:
            yield gpu
        finally:
            cuda._queued_calls[:] = saved_queue
    # torch._C's own lazy-init flag (torch/csrc/utils/device_lazy_init.cpp) stays set if a real CUDA
    # op ran under the stand-in: later real CUDA ops then fail in CUDAHooks::init instead, with the
    # same "Found no NVIDIA driver" RuntimeError.


def _params(param: Any) -> dict:
    if isinstance(param, str):
        return {"profile": param}
    if isinstance(param, tuple):
        return dict(zip(("profile", "count", "driver_cuda_version"), param, strict=False))
    return dict(param)


# The GPUs the pinned cu130 wheel has kernels for (sm_75 and up); P100 and V100 are for the tests that
# a build without their kernels is refused.
SUPPORTED = ("A100", "H100", "T4")


@pytest.fixture(params=SUPPORTED)
def fake_gpu(request) -> Iterator[FakeGpu]:
    """One stand-in session per supported profile (T4, A100, H100); override with indirect parametrize:
    a profile name, a (profile, count[, driver_cuda_version]) tuple, or a dict of standin()'s arguments."""
    with standin(**_params(request.param)) as gpu:
        yield gpu


@pytest.fixture()
def fake_gpus() -> Iterator[Any]:
    """A factory: fake_gpus("H100", count=4) starts a session that ends at the test's teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda profile="A100", count=1, driver_cuda_version=13000: stack.enter_context(
            standin(profile, count, driver_cuda_version))
