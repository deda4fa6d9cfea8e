"""train.py's CUDA branches, driven through the strict CUDA stand-in (tests/cuda_standin.py) for a
T4 (7.5, bf16 only emulated), an A100 (8.0) and an H100 (9.0). Only torch's lowest CUDA entry
points are stood in: torch's own checks stay real, so a call a real GPU would refuse fails here."""
from __future__ import annotations

import json
import re
import threading
import types

import data
import pytest
import speed
import torch
import train
from conftest import tiny_model

EXPECTED_AMP = {"Tesla T4": "fp16", "NVIDIA A100-SXM4-80GB": "bf16", "NVIDIA H100 80GB HBM3": "bf16"}


@pytest.fixture(autouse=True)
def keep_cudnn_benchmark():
    before = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("name", ["auto", "cuda", "cuda:0"])
def test_auto_and_cuda_resolve_to_an_indexed_device_and_set_it(fake_gpu, name):
    device = speed.resolve_device(name, None)
    assert device == torch.device("cuda", 0)
    assert fake_gpu.set_device_calls == [(0, threading.current_thread().name)]
    assert torch.backends.cudnn.benchmark is True  # shapes never change


def test_torchrun_local_rank_picks_the_rank_gpu(fake_gpus):
    gpu = fake_gpus("H100", count=4)
    assert speed.resolve_device("auto", 2) == torch.device("cuda", 2)
    assert speed.resolve_device("cuda", 3) == torch.device("cuda", 3)
    assert [index for index, _ in gpu.set_device_calls] == [2, 3]
    # where NCCL's object collectives (gather_evaluation's all_gather_object, rank0_value's broadcast)
    # put their pickled tensors: the current device, "cuda" (distributed_c10d._get_object_coll_device)
    assert torch.cuda.current_device() == 3


@pytest.mark.parametrize("fake_gpu", [("A100", 2)], indirect=True)
def test_a_gpu_index_beyond_the_visible_ones_is_one_line(fake_gpu):
    assert speed.resolve_device("cuda:1", None) == torch.device("cuda", 1)
    with pytest.raises(SystemExit, match=r"cuda:2 but this process sees 2 CUDA device\(s\).*cuda:0 to cuda:1"):
        speed.resolve_device("cuda:2", None)


@pytest.mark.parametrize("fake_gpu", [{"profile": "A100", "driver_cuda_version": 12080}], indirect=True)
def test_a_driver_too_old_for_the_wheel_stops_auto_instead_of_training_on_cpu(fake_gpu, monkeypatch):
    monkeypatch.setattr(speed, "driver_cuda_version", fake_gpu.driver_cuda_version)
    with pytest.warns(UserWarning, match="too old"):
        assert not torch.cuda.is_available()
    for name in ("auto", "cuda"):
        with pytest.raises(SystemExit, match=r"driver supports CUDA 12\.8, but torch .* built for CUDA 13\.0.*580"):
            speed.resolve_device(name, None)
    assert speed.resolve_device("cpu", None) == torch.device("cpu")  # asked for: allowed


@pytest.mark.parametrize("fake_gpu", [{"profile": "A100", "driver_cuda_version": 0}], indirect=True)
def test_a_machine_without_a_driver_trains_on_cpu(fake_gpu, monkeypatch):
    monkeypatch.setattr(speed, "driver_cuda_version", fake_gpu.driver_cuda_version)
    assert speed.resolve_device("auto", None) == torch.device("cpu")
    with pytest.raises(SystemExit, match="--device cuda but no CUDA device is visible"):
        speed.resolve_device("cuda", None)


@pytest.mark.parametrize("cpu_only_torch", [False, True])
def test_a_driver_that_works_but_no_gpu_torch_can_use_stops_auto_with_the_reason(fake_gpu, monkeypatch, cpu_only_torch):
    """CUDA_VISIBLE_DEVICES hides every GPU (the driver answers, torch counts none), or torch is a CPU-only
    build on a GPU machine: auto names why rather than training on the CPU."""
    monkeypatch.setattr(speed, "driver_cuda_version", fake_gpu.driver_cuda_version)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    fake_gpu.count = 0  # what the driver reports to a process that may see no GPU
    if cpu_only_torch:
        monkeypatch.setattr(torch.version, "cuda", None)
    reason = "is a CPU-only build" if cpu_only_torch else r"driver works \(CUDA 13\.0\) but CUDA sees no GPU"
    for name in ("auto", "cuda"):
        with pytest.raises(SystemExit, match=reason):
            speed.resolve_device(name, None)
    assert speed.resolve_device("cpu", None) == torch.device("cpu")


def test_amp_auto_takes_real_bf16_only_and_all_switches_on(fake_gpu):
    device = speed.resolve_device("auto", None)
    args = train.parse_config([])
    args.batch_size_per_rank = 512
    switches = speed.choose_switches(args, tiny_model(), device)
    assert switches["amp"] == EXPECTED_AMP[fake_gpu.profile.name]
    assert (switches["channels_last"], switches["compile"], switches["probe_img_per_s"]) == (True, True, {})
    scaler = torch.amp.GradScaler("cuda", enabled=switches["amp"] == "fp16")
    assert scaler.is_enabled() == (fake_gpu.profile.name == "Tesla T4")  # fp16 needs loss scaling
    with speed.autocast(torch.device("cuda", 0), switches["amp"]):
        pass  # torch's own autocast accepts the choice on that GPU


def test_only_a_single_cpu_process_with_a_switch_left_to_auto_has_a_switch_cache_key(fake_gpu):
    """The key build_training looks the CPU's decision up by: none on CUDA (auto turns every switch on,
    nothing is probed, the cache file is not read), under torchrun, or with every switch given."""
    def key(argv: list[str], device: torch.device, world: int = 1) -> str | None:
        args = train.parse_config(argv)
        args.batch_size_per_rank = 512
        return train.switch_key(types.SimpleNamespace(args=args, device=device, world=world))
    cpu, given = torch.device("cpu"), ["--amp", "fp32", "--channels-last", "--no-compile"]
    assert key([], speed.resolve_device("auto", None)) is None
    assert key([], cpu, world=2) is None and key(given, cpu) is None
    probed = json.loads(key(["--arch", "resnet20", "--amp", "fp32"], cpu))
    assert (probed["arch"], probed["amp"], probed["compile"], probed["batch"]) == ("resnet20", "fp32", None, 512)


def test_sync_bn_leaves_compile_off_unless_asked_and_says_why(fake_gpu):
    device = speed.resolve_device("auto", None)
    cases = ((["--sync-bn"], False, "SyncBatchNorm"), (["--sync-bn", "--compile"], True, "asked"),
             ([], True, "auto on CUDA"))
    for argv, compiled, reason in cases:
        args = train.parse_config(argv)
        args.batch_size_per_rank = 64
        switches = speed.choose_switches(args, tiny_model(), device)
        assert switches["compile"] is compiled and reason in switches["compile_reason"]


def test_cuda_runs_are_recorded_with_the_gpu_and_its_peak_memory_after_compiling(fake_gpu):
    device = speed.resolve_device("auto", None)
    env = train.environment(device)
    assert env["device_name"] == fake_gpu.profile.name and env["cuda"] == torch.version.cuda
    fake_gpu.allocate(0, 900 * 2**20)  # what compiling held
    fake_gpu.free(0, 900 * 2**20)
    speed.reset_peak_memory(device)
    fake_gpu.allocate(0, 100 * 2**20)
    assert speed.peak_memory_mb(device) == pytest.approx(100)
    speed.synchronize(device)
    assert fake_gpu.synchronize_calls[-1][0] == 0


def test_bench_gives_each_mode_the_peak_memory_of_its_own_steps(fake_gpu):
    import bench
    device = speed.resolve_device("auto", None)
    fake_gpu.allocate(0, 900 * 2**20)  # the mode timed before: its model and compiled graphs
    fake_gpu.free(0, 900 * 2**20)
    bench.release_memory(device)
    fake_gpu.allocate(0, 100 * 2**20)
    assert speed.peak_memory_mb(device) == pytest.approx(100)
    assert fake_gpu.calls_named("_cuda_emptyCache")  # the cached blocks go back before the next mode


def test_checkpoint_keeps_and_restores_the_gpu_rng(fake_gpu, tmp_path):
    device = speed.resolve_device("auto", None)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    torch.cuda.manual_seed(7)
    saved = torch.cuda.get_rng_state(device)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(), "rng_cuda": saved}
    train.save_checkpoint(tmp_path / "c.pt", state)
    torch.cuda.manual_seed(8)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    train.restore(loaded, model, optimizer, scheduler, scaler, device)
    assert torch.equal(torch.cuda.get_rng_state(device), saved)


@pytest.mark.parametrize("fake_gpu", [("A100", 2)], indirect=True)
def test_nccl_process_group_is_bound_to_the_rank_gpu(fake_gpu, monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    device = speed.resolve_device("auto", 1)
    assert train.init_distributed(2, device) == 1
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert train.init_distributed(1, device) == 0


@pytest.mark.parametrize("cpus, local_ranks, asked, workers, said", [
    (1, 1, None, 1, False),  # taskset -c 0, Slurm --cpus-per-task=1
    (16, 1, None, 8, False),  # capped
    (16, 4, None, 4, False),  # torchrun --nproc_per_node=4 shares the node's CPUs
    (2, 8, None, 1, False),
    (1, 1, 8, 1, True),  # asked for more than may run: clamped, and said
    (16, 1, 3, 3, False),
])
def test_loader_workers_follow_the_cpus_this_process_may_use(monkeypatch, cpus, local_ranks, asked, workers, said):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    args = train.parse_config([] if asked is None else ["--workers", str(asked)])
    lines = []
    assert train.check_run(args, torch.device("cpu"), 1, local_ranks, lines.append) == workers
    assert bool(lines) == said and all("--workers" in line for line in lines)


def test_asked_bf16_on_a_gpu_that_only_emulates_it_is_warned_about(fake_gpu):
    device = speed.resolve_device("auto", None)
    lines = []
    train.check_run(train.parse_config(["--amp", "bf16"]), device, 1, 1, lines.append)
    emulated = fake_gpu.profile.name == "Tesla T4"
    assert bool(lines) == emulated and all("emulated" in line and "--amp fp16" in line for line in lines)


@pytest.mark.parametrize("fake_gpu", ["V100", "P100"], indirect=True)
@pytest.mark.filterwarnings("ignore::UserWarning:torch.cuda")  # torch's own: it only warns
def test_a_gpu_the_build_has_no_kernels_for_is_refused_naming_a_build_that_has(fake_gpu):
    """torch only warns on a V100 (7.0) or P100 (6.0) with the cu130 wheel (sm_75 and up); the first
    kernel would then die with "no kernel image is available"."""
    cc = "{}.{}".format(fake_gpu.profile.major, fake_gpu.profile.minor)
    for name in ("auto", "cuda:0"):
        with pytest.raises(SystemExit, match=rf"{fake_gpu.profile.name} \(compute capability {cc}\) has no kernels "
                                              r"in torch .* built for sm_75 .*make setup TORCH_CUDA=cu126"):
            speed.resolve_device(name, None)
    assert fake_gpu.set_device_calls == []  # refused before it touches the GPU


@pytest.mark.parametrize("capability, arch_list, runs", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # V100 on cu130
    ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], True),  # V100 on cu126
    ((8, 9), ["sm_80", "sm_86", "sm_90"], True),  # an L4: sm_86's cubin runs on 8.9
    ((9, 0), ["sm_80", "sm_90a"], True),
    ((10, 0), ["sm_80", "sm_90a"], False),  # an arch-specific cubin runs on its own GPU only
    ((12, 0), ["sm_80", "compute_90"], True),  # PTX: the driver compiles it for newer GPUs
    ((8, 0), ["sm_86"], False),  # a cubin needs at least its own minor version
])
def test_which_gpus_a_build_runs_on(capability, arch_list, runs):
    assert speed.has_kernels_for(capability, arch_list) is runs


@pytest.mark.parametrize("amp", ["bf16", "fp16", "auto"])
def test_bf16_on_a_gpu_without_it_records_that_it_runs_eager(fake_gpu, amp):
    """Inductor skips bf16 graphs on a T4 and runs them eager: the record must not say compiled."""
    device = speed.resolve_device("auto", None)
    for flags in ([], ["--compile"]):
        args = train.parse_config(["--amp", amp, *flags])
        args.batch_size_per_rank = 64
        switches = speed.choose_switches(args, tiny_model(), device)
        emulated_bf16 = fake_gpu.profile.name == "Tesla T4" and amp == "bf16"
        assert switches["compile"] is (not emulated_bf16)
        assert ("does not compile bf16 graphs" in switches["compile_reason"]) is emulated_bf16


def test_torchrun_ranks_share_the_nodes_cpus_for_compiling(monkeypatch):
    import torch._inductor.config as inductor
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(inductor, "compile_threads", 32)
    speed.share_compile_threads(1, 64)  # one process: Inductor's own choice stands
    assert inductor.compile_threads == 32 and "TORCHINDUCTOR_COMPILE_THREADS" not in speed.os.environ
    speed.share_compile_threads(8, 64)  # torchrun --nproc_per_node=8 on 64 CPUs
    assert inductor.compile_threads == 8 and speed.os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "8"
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")  # the user's own setting stands
    speed.share_compile_threads(8, 64)
    assert inductor.compile_threads == 8 and speed.os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "3"


@pytest.mark.parametrize("version, refused", [("2.2.2+cu121", True), ("1.13.1", True), ("2.3.0", False),
                                              ("2.11.0a0+git", False), ("2.14.1+cu130", False)])
def test_a_torch_older_than_the_code_needs_is_one_line_at_start(monkeypatch, version, refused):
    monkeypatch.setattr(torch, "__version__", version)
    if not refused:
        speed.check_torch()
        return
    for main in (train.main, __import__("bench").main):
        with pytest.raises(SystemExit, match=rf"error: torch {re.escape(version)} is older than this code supports "
                                              r"\(torch 2\.3 or newer; tested with 2\.14\.1\): run 'make setup'"):
            main(["--help"])
