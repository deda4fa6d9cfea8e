"""The CUDA stand-in is strict: torch's own Python logic runs, and what the real API refuses still fails.

Also the facts the CUDA code paths rely on, shown on the stand-in: what set_device accepts, bf16 on a
T4, and the FFCV loader thread that moves a cuda:1 rank onto GPU 0 (and the fix)."""
from __future__ import annotations

import threading
import warnings
from types import SimpleNamespace

import pytest
import torch

from cuda_standin import PROFILES, GpuProfile, standin

import data

# FFCV decides IS_CUDA once, when it is first imported: import it here, outside any stand-in, or a
# test that first imports it under one would leave every later loader of this process on "CUDA".
data.import_ffcv()

CAPABILITY = {"T4": (7, 5), "A100": (8, 0), "H100": (9, 0)}
NAME = {"T4": "Tesla T4", "A100": "NVIDIA A100-SXM4-80GB", "H100": "NVIDIA H100 80GB HBM3"}
NATIVE_BF16 = {"T4": False, "A100": True, "H100": True}


def profile_of(gpu) -> str:
    return next(k for k, v in PROFILES.items() if v == gpu.profile)


# --- set_device, as torch.cuda.set_device really checks it -------------------------------------

def test_set_device_needs_an_index(fake_gpu):
    for device in (torch.device("cuda"), "cuda"):
        with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
            torch.cuda.set_device(device)
    assert fake_gpu.set_device_calls == []


@pytest.mark.parametrize("fake_gpu", ["T4"], indirect=True)
def test_set_device_rejects_a_missing_gpu_and_records_the_rest(fake_gpu):
    with pytest.raises(torch.AcceleratorError, match="invalid device ordinal"):
        torch.cuda.set_device("cuda:1")
    torch.cuda.set_device(torch.device("cuda", 0))
    torch.cuda.set_device(-1)  # negative: a no-op that never reaches torch._C
    assert fake_gpu.set_device_calls == [(1, "MainThread"), (0, "MainThread")]
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("fake_gpu", [("A100", 2)], indirect=True)
def test_set_device_is_per_thread(fake_gpu):
    torch.cuda.set_device(1)
    seen = {}

    def worker():
        seen["start"] = torch.cuda.current_device()  # a new host thread starts on device 0
        torch.cuda.set_device(torch.device("cuda", 1))

    thread = threading.Thread(target=worker, name="loader")
    thread.start()
    thread.join()
    assert seen["start"] == 0 and torch.cuda.current_device() == 1
    assert fake_gpu.set_device_calls == [(1, "MainThread"), (1, "loader")]
    assert fake_gpu.contexts == {1: "MainThread"}  # the thread reused it: no context on GPU 0


# --- properties, capability, bf16, autocast, GradScaler ----------------------------------------

def test_capability_and_name(fake_gpu):
    profile = profile_of(fake_gpu)
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    assert torch.cuda.get_device_capability() == CAPABILITY[profile]
    assert torch.cuda.get_device_capability(torch.device("cuda")) == CAPABILITY[profile]
    assert torch.cuda.get_device_name(torch.device("cuda", 0)) == NAME[profile]
    with pytest.raises(AssertionError, match="Invalid device id"):  # torch's own range check
        torch.cuda.get_device_capability(1)


def test_bf16_support(fake_gpu):
    profile = profile_of(fake_gpu)
    assert torch.cuda.is_bf16_supported(including_emulation=False) is NATIVE_BF16[profile]
    # The default counts emulation: a T4 can hold bf16 tensors, so it says True there too.
    assert torch.cuda.is_bf16_supported() is True
    assert torch.cuda.is_tf32_supported() is NATIVE_BF16[profile]
    real_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert real_bf16 is NATIVE_BF16[profile]


def test_autocast_bf16_is_accepted_even_on_a_t4(fake_gpu):
    """autocast asks is_bf16_supported() with emulation allowed: a T4 gets bf16 autocast, emulated."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    assert autocast._enabled and autocast.fast_dtype == torch.bfloat16
    assert fake_gpu.calls_named("_check_bf16_tensor_supported") == (
        [] if NATIVE_BF16[profile_of(fake_gpu)] else [("_check_bf16_tensor_supported", (0,), "MainThread",
                                                       threading.get_ident())])


def test_autocast_bf16_refused_where_bf16_tensors_fail():
    old = GpuProfile("Old GPU", 6, 1, 8 * 2**30, 20, 2**20, bf16_tensors=False)
    with standin(old), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="does not support bfloat16"):
            torch.autocast("cuda", dtype=torch.bfloat16)
        assert torch.autocast("cuda", dtype=torch.float16)._enabled
    # torch's own lazy-init checks ran against the stand-in: this wheel has no sm_61 kernels.
    assert any("sm_61 is not compatible" in str(w.message) for w in caught)


def test_autocast_and_grad_scaler_without_a_gpu_disable_themselves():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert not torch.autocast("cuda", dtype=torch.bfloat16)._enabled
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert not torch.amp.GradScaler("cuda").is_enabled()


def test_grad_scaler_construction(fake_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler = torch.amp.GradScaler("cuda")
    assert scaler.is_enabled()


# --- what is not stood in still fails -----------------------------------------------------------

def test_real_cuda_tensors_still_fail(fake_gpu):
    with pytest.raises(RuntimeError):
        torch.empty(1, device="cuda")
    with pytest.raises(RuntimeError):
        torch.zeros(2).to(torch.device("cuda", 0))
    with pytest.raises(RuntimeError):
        torch.cuda.mem_get_info()
    with pytest.raises(RuntimeError):
        _ = torch.cuda.Stream().cuda_stream


def test_state_is_restored_after_the_session():
    with standin("H100", count=2):
        torch.cuda.set_device(1)
        assert torch.cuda.is_initialized() and torch.cuda.device_count() == 2
    assert not torch.cuda.is_available() and not torch.cuda.is_initialized()
    assert torch.cuda.device_count() == 0 and torch.cuda.default_generators == ()
    assert not hasattr(torch.cuda, "_get_device_properties")
    with pytest.raises(RuntimeError):
        torch.cuda.current_device()


# --- synchronize, memory stats, RNG state, cudnn ------------------------------------------------

@pytest.mark.parametrize("fake_gpu", [("A100", 2)], indirect=True)
def test_synchronize_and_memory_stats(fake_gpu):
    device = torch.device("cuda", 1)
    torch.cuda.synchronize(device)  # from device 0: torch.cuda.device(1) around it, 0 restored lazily
    assert fake_gpu.synchronize_calls == [(1, "MainThread")]
    assert torch.cuda.current_device() == 0 and fake_gpu.contexts == {1: "MainThread"}
    fake_gpu.allocate(1, 300)
    fake_gpu.free(1, 200)
    assert torch.cuda.max_memory_allocated(device) == 300
    assert torch.cuda.memory_allocated(device) == 100
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    assert torch.cuda.max_memory_allocated(device) == 100
    assert [c.args for c in fake_gpu.calls_named("_cuda_resetPeakMemoryStats")] == [(1,)]
    with pytest.raises(RuntimeError, match="Invalid device argument 2"):
        torch.cuda.reset_peak_memory_stats(2)


@pytest.mark.parametrize("fake_gpu", ["T4"], indirect=True)
def test_rng_state_round_trip(fake_gpu):
    device = torch.device("cuda", 0)
    torch.cuda.manual_seed(1234)
    state = torch.cuda.get_rng_state(device)
    assert state.dtype == torch.uint8 and state.numel() == 16
    torch.cuda.manual_seed(99)
    torch.cuda.set_rng_state(state, device)
    assert torch.cuda.initial_seed() == 1234
    with pytest.raises(RuntimeError, match="wrong size"):
        torch.cuda.set_rng_state(torch.zeros(3, dtype=torch.uint8), device)
    with pytest.raises(IndexError):
        torch.cuda.get_rng_state(torch.device("cuda", 1))


def test_cudnn_needs_no_driver():
    """cudnn.version() and cudnn.benchmark are library calls and a flag: no GPU needed (not stood in)."""
    was = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = was
    assert isinstance(torch.backends.cudnn.version(), int)


# --- a driver too old for this wheel -------------------------------------------------------------

def test_driver_present_but_too_old():
    with standin("T4", driver_cuda_version=12080) as gpu:
        with pytest.warns(UserWarning, match=r"driver on your system is too old \(found version 12080\)"):
            assert not torch.cuda.is_available()
        assert torch.cuda.device_count() == 1  # NVML, from the driver, still counts the GPU
        with pytest.raises(RuntimeError, match="too old"):
            torch.cuda.init()
        assert not torch.cuda.is_bf16_supported()
        assert gpu.driver_cuda_version() == 12080 and gpu.proc_driver_version.startswith("NVRM version")


def test_no_driver_at_all():
    with standin("T4", driver_cuda_version=0) as gpu:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
        with pytest.raises(RuntimeError, match="Found no NVIDIA driver"):
            torch.cuda.init()
        assert gpu.driver_cuda_version() is None and gpu.proc_driver_version is None


# --- init_process_group's device_id ---------------------------------------------------------------

@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_init_process_group_device_id_needs_an_index_in_range(fake_gpu):
    store = torch.distributed.HashStore()
    with pytest.raises(ValueError, match="device_id with index"):
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1,
                                             device_id=torch.device("cuda"))
    with pytest.raises(ValueError, match="out of range"):
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1, device_id=1)
    assert not torch.distributed.is_initialized()


# --- streams: a thread entering torch.cuda.stream() for a cuda:1 stream ---------------------------

def run_in_thread(fn, name="loader"):
    out = {}
    thread = threading.Thread(target=lambda: out.update(fn()), name=name)
    thread.start()
    thread.join()
    return out


@pytest.mark.parametrize("fake_gpu", [("A100", 2)], indirect=True)
@pytest.mark.parametrize("pin_thread", [False, True], ids=["as_ffcv", "set_device_first"])
def test_stream_context_in_a_new_thread(fake_gpu, pin_thread):
    torch.cuda.set_device(1)  # the rank's device, as train.py's resolve_device sets it
    stream = torch.cuda.Stream()  # FFCV makes its streams in the main thread: on cuda:1
    assert stream.device == torch.device("cuda", 1)

    def loader_thread():
        if pin_thread:
            torch.cuda.set_device(stream.device)
        with torch.cuda.stream(stream):
            inside = torch.cuda.current_device()
        return {"inside": inside, "after": torch.cuda.current_device()}

    seen = run_in_thread(loader_thread)
    assert seen["inside"] == 1
    if pin_thread:
        assert seen["after"] == 1 and fake_gpu.contexts == {1: "MainThread"}
        assert all(to == 1 for _, to, _ in fake_gpu.device_switches)
    else:
        # StreamContext.__exit__ sets back the thread's previous stream, the default stream of
        # device 0, and _cuda_setStream moves the thread to that stream's device: cudaSetDevice(0).
        assert seen["after"] == 0 and fake_gpu.contexts == {1: "MainThread", 0: "loader"}
        assert (1, 0, "loader") in fake_gpu.device_switches


# --- the real FFCV EpochIterator, on a minimal loader ---------------------------------------------

class FakeMemoryContext:
    state = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start_batch(self, b_ix):
        pass


def minimal_loader(batches: int, seen: list):
    """What EpochIterator reads from a Loader; its one pipeline stage notes the thread's device."""

    def stage(batch_indices, **_):
        seen.append((threading.current_thread().name, torch.cuda.current_device(),
                     torch.cuda.current_stream().device_index))
        return (list(batch_indices),)

    return SimpleNamespace(
        reader=SimpleNamespace(metadata=None), batch_size=2, batches_ahead=1, num_workers=1,
        traversal_order=None, memory_manager=SimpleNamespace(schedule_epoch=lambda b: FakeMemoryContext()),
        graph=SimpleNamespace(allocate_memory=lambda size, slots: {"operation": {}, "shared": {}}),
        code=([(stage, [0])], [0]))


@pytest.mark.parametrize("fake_gpu", [("A100", 2)], indirect=True)
@pytest.mark.parametrize("fixed", [False, True], ids=["ffcv_1.0.2", "fixed"])
def test_ffcv_loader_thread_and_gpu_0(fake_gpu, fixed, monkeypatch):
    """FFCV as released makes a context on GPU 0 from a cuda:1 rank's loader thread; data.import_ffcv's
    patch (data.run_loader_thread_on_its_device) keeps the thread on the rank's device."""
    import data
    data.import_ffcv()
    from ffcv.loader import epoch_iterator
    monkeypatch.setattr(epoch_iterator, "IS_CUDA", True)  # FFCV decides this once, at its import
    if not fixed:
        monkeypatch.setattr(epoch_iterator.EpochIterator, "run", epoch_iterator.EpochIterator.run.ffcv_run)
    torch.cuda.set_device(1)
    seen: list = []
    iterator = epoch_iterator.EpochIterator(minimal_loader(3, seen), list(range(6)))
    batches = list(iterator)
    assert batches == [([0, 1],), ([2, 3],), ([4, 5],)]
    thread = iterator.name
    assert all(device == 1 and stream_device == 1 for _, device, stream_device in seen)
    assert {name for name, _, _ in seen} == {thread}
    if fixed:
        assert fake_gpu.contexts == {1: "MainThread"}
        assert (1, thread) in fake_gpu.set_device_calls
        assert not [s for s in fake_gpu.device_switches if s[1] == 0]
    else:
        assert fake_gpu.contexts == {1: "MainThread", 0: thread}  # a context on GPU 0 from a cuda:1 rank
        assert (1, 0, thread) in fake_gpu.device_switches
