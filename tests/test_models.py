"""Specification of models.py (issue 3). CPU only, offline; the whole file runs in well under a minute."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import ARCHS, POOLS, STEMS, build_model, count_parameters, forward_flops  # noqa: E402

# one thread: these nets are tiny at batch 2, and OpenMP threads competing with other jobs on a
# 2-core machine made single forwards take seconds instead of milliseconds
torch.set_num_threads(1)
DEEP = ("resnet101", "resnet152")  # checked once only: building and running them is slow on CPU
COMBOS = [(a, p, s) for a in ARCHS if a not in DEEP for p in POOLS for s in ARCHS[a].stems]


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("arch, stem, expected", [
    ("resnet18", "imagenet", 11_181_642),
    ("resnet18", "cifar", 11_173_962),
    ("resnet34", "imagenet", 21_289_802),
    ("resnet50", "imagenet", 23_528_522),
    ("resnet20", "cifar", 269_722),
    ("resnet32", "cifar", 464_154),
    ("resnet44", "cifar", 658_586),
    ("resnet56", "cifar", 853_018),
    ("resnet110", "cifar", 1_727_962),
])
def test_parameter_counts_match_torchvision_and_he_et_al(arch, stem, expected):
    assert count_parameters(build_model(arch, stem=stem)) == expected


def test_custom_resnet_defaults_are_resnet18_with_cifar_stem():
    assert count_parameters(build_model("resnet_custom")) == count_parameters(build_model("resnet18"))


@pytest.mark.parametrize("options, expected", [
    (dict(blocks=(3, 4, 4, 3), channels=(32, 64, 128, 256), head=(256, 128)), 4_833_066),
    (dict(blocks=(2, 2, 2), channels=(32, 64, 96)), 481_962),
])
def test_custom_resnet_docstring_examples_have_the_stated_parameter_counts(options, expected):
    assert count_parameters(build_model("resnet_custom", **options)) == expected
    assert f"{expected:,}" in ARCHS["resnet_custom"].build.__doc__


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("arch, pool, stem", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_arch_pool_and_stem_maps_images_to_logits(arch, pool, stem):
    # train in channels-last (how train.py runs) and eval in the default layout: each mode and
    # each layout once per combination, half the cost of the full cross on 2 cores
    model = build_model(arch, pool=pool, stem=stem)
    with torch.no_grad():
        model.train().to(memory_format=torch.channels_last)
        assert model(images().to(memory_format=torch.channels_last)).shape == (2, 10)
        model.eval().to(memory_format=torch.contiguous_format)
        assert model(images()).shape == (2, 10)


@pytest.mark.parametrize("arch", DEEP)
def test_deep_torchvision_resnets_map_images_to_logits(arch):
    model = build_model(arch, pool="max", stem="imagenet").eval()  # imagenet stem: 16x cheaper
    with torch.no_grad():
        assert model(images().to(memory_format=torch.channels_last)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet20", "resnet9", "resnet_custom", "cnn"])
def test_num_classes_sets_the_logit_width(arch):
    options = dict(blocks=(1, 1), channels=(8, 16)) if arch == "resnet_custom" else {}
    with torch.no_grad():
        assert build_model(arch, num_classes=100, **options).eval()(images()).shape == (2, 100)


def test_custom_resnet_options_shape_the_network():
    model = build_model("resnet_custom", blocks=(1, 2, 1), channels=(8, 16, 32), kernel_size=5,
                        avgpool_size=2, head=(64, 32), dropout=0.1)
    linears = [m for m in model.fc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32 * 2 * 2, 64), (64, 32), (32, 10)]
    assert sum(isinstance(m, nn.Dropout) for m in model.fc.modules()) == 3
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [1, 2, 1]
    assert model.layer2[0].conv1.kernel_size == (5, 5)
    with torch.no_grad():
        assert model(images()).shape == (2, 10)


# ---------------------------------------------------------------- pool and stem

@pytest.mark.parametrize("arch", ["resnet18", "resnet20", "resnet9", "resnet_custom", "cnn"])
def test_max_pool_head_differs_from_avg(arch):
    options = dict(blocks=(1, 1), channels=(8, 16)) if arch == "resnet_custom" else {}
    avg = build_model(arch, pool="avg", **options).eval()
    max_ = build_model(arch, pool="max", **options).eval()
    max_.load_state_dict(avg.state_dict())  # same weights: only the pooling differs
    with torch.no_grad():
        assert not torch.allclose(avg(images()), max_(images()))


def test_max_pool_is_torchvisions_resnet_with_a_max_pool_and_the_norm_only_when_asked_for():
    reference = torchvision.models.resnet18(num_classes=10)
    reference.avgpool = nn.AdaptiveMaxPool2d(1)
    assert repr(build_model("resnet18", pool="max", stem="imagenet")) == repr(reference)
    normed = build_model("resnet18", pool="max", stem="imagenet", pool_norm=True).avgpool
    assert repr(normed) == repr(nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.BatchNorm2d(512, affine=False)))


def classifier_curvature(model: nn.Module, x: torch.Tensor) -> float:
    """Top eigenvalue of the training loss's Hessian in the classifier's weights, at images x. For a
    linear classifier reading features f with softmax output p it is exactly that of
    mean over images of (diag p - p p^T) (x) f f^T (label smoothing moves only the gradient)."""
    seen = {}
    hook = model.fc.register_forward_hook(lambda m, i, o: seen.update(f=i[0].double(), p=o.double().softmax(1)))
    with torch.no_grad():
        model.train()(x)  # in training the classifier reads features normalised with the batch's statistics
    hook.remove()
    f, p = seen["f"], seen["p"]
    a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    hessian = torch.einsum("nab,ni,nj->aibj", a, f, f).reshape(p.shape[1] * f.shape[1], -1) / len(f)
    return torch.linalg.eigvalsh(hessian)[-1].item()


@pytest.mark.parametrize("pool", POOLS)
def test_pool_norm_keeps_the_classifier_stable_at_sgds_peak_lr_with_either_pool(pool):
    """SGD with momentum 0.9 on a quadratic of curvature c is stable only for lr < 2 (1 + 0.9) / c.
    Without the norm a max pool's classifier passed that limit at a 20th of the peak lr (the quick
    look's loss rose to 10 in the warm-up); standardised, both pools' limit lies past the peak."""
    import train
    from conftest import synthetic_images
    peak, momentum = train.OPTIMIZER_DEFAULTS["sgd"]["lr"], train.OPTIMIZER_DEFAULTS["sgd"]["momentum"]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 256)
    x = torch.tensor(np.concatenate([synthetic_images(1, int(label), rng) for label in labels]))
    x = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    limits = {}
    for pool_norm in (True, False):
        torch.manual_seed(0)
        limits[pool_norm] = 2 * (1 + momentum) / classifier_curvature(build_model("resnet20", pool=pool,
                                                                                  pool_norm=pool_norm), x)
    assert limits[True] > peak
    if pool == "max":
        assert limits[False] < peak / 20


@pytest.mark.parametrize("arch", ["resnet18", "resnet20"])
@pytest.mark.parametrize("pool", POOLS)
def test_pool_norm_adds_no_parameters_and_folds_into_the_classifier_in_eval_mode(arch, pool):
    torch.manual_seed(0)
    normed, plain = build_model(arch, pool=pool, pool_norm=True).eval(), build_model(arch, pool=pool).eval()
    assert count_parameters(normed) == count_parameters(plain)
    norm = normed.avgpool[1]
    norm.running_mean.uniform_(-1, 3)
    norm.running_var.uniform_(0.5, 4)
    # the same network with the norm's fixed affine map folded into the classifier
    scale = (norm.running_var + norm.eps).rsqrt()
    state = {k: v for k, v in normed.state_dict().items() if not k.startswith("avgpool.1.")}
    state["fc.weight"] = normed.fc.weight * scale
    state["fc.bias"] = normed.fc.bias - state["fc.weight"] @ norm.running_mean
    plain.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(normed(images()), plain(images()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, stem, size", [
    ("resnet18", "cifar", 32), ("resnet18", "imagenet", 8), ("resnet50", "imagenet", 8), ("resnet20", "cifar", 32),
])
def test_stem_sets_the_resolution_into_the_first_stage(arch, stem, size):
    model = build_model(arch, stem=stem).eval()
    seen = []
    model.layer1.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        model(images())
    assert seen == [(size, size)]


def test_cifar_stem_is_a_3x3_stride_1_conv_without_max_pool():
    model = build_model("resnet18", stem="cifar")
    conv1 = model.conv1
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.stride, conv1.padding) == (
        3, 64, (3, 3), (1, 1), (1, 1))
    assert conv1.bias is None and isinstance(model.maxpool, nn.Identity)


# ---------------------------------------------------------------- pretrained weights

@pytest.mark.parametrize("stem", STEMS)
def test_pretrained_loads_imagenet_weights_from_torch_home(tmp_path, monkeypatch, capsys, stem):
    # a stand-in checkpoint with random values, where torchvision caches the real one
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in torchvision.models.resnet18().state_dict().items()}
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    checkpoint = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    checkpoint.parent.mkdir(parents=True)
    torch.save(state, checkpoint)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    model = build_model("resnet18", stem=stem, pretrained=True)

    fresh = {"fc.weight", "fc.bias"} | ({"conv1.weight"} if stem == "cifar" else set())
    loaded = model.state_dict()
    assert set(loaded) == set(state)  # the plain pool, as ImageNet's network has it
    for name, value in state.items():
        if name in fresh:
            assert loaded[name].shape != value.shape or not torch.equal(loaded[name], value), name
        else:
            assert torch.equal(loaded[name], value), name
    assert model.fc.out_features == 10
    message = capsys.readouterr().out
    if stem == "cifar":
        assert message.count("\n") == 1 and "conv1" in message
    else:
        assert message == ""


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="resnet19"), "unknown arch 'resnet19': choose one of resnet18, resnet34, "),
    (dict(arch="resnet18", pool="mean"), "unknown pool 'mean': choose one of avg, max"),
    (dict(arch="resnet18", stem="tiny"), "unknown stem 'tiny': choose one of cifar, imagenet"),
    (dict(arch="resnet20", stem="imagenet"), "resnet20 takes only stem='cifar'; stem='imagenet' is for resnet18, "),
    (dict(arch="cnn", pretrained=True), "cnn has no pretrained weights; pretrained=True is for resnet18, "),
    (dict(arch="resnet20", blocks=(1, 1, 1)),
     "resnet20 does not take option 'blocks': it takes num_classes, pool, pool_norm, stem"),
    (dict(arch="resnet18", dropout=0.5),
     "resnet18 does not take option 'dropout': it takes num_classes, pool, pool_norm, stem, pretrained"),
    (dict(arch="resnet_custom", width=2), "resnet_custom does not take option 'width': it takes num_classes, "
     "pool, pool_norm, stem, blocks, channels, kernel_size, avgpool_size, head, dropout"),
    (dict(arch="resnet_custom", blocks=(2, 2), channels=(8, 16, 32)), "one positive entry per stage"),
    (dict(arch="resnet_custom", kernel_size=4), "must be odd"),
])
def test_bad_arguments_raise_errors_listing_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError) as error:
        build_model(**kwargs)
    assert message in str(error.value)


# ---------------------------------------------------------------- FLOPs

def conv_macs(size: int, c_in: int, c_out: int, k: int = 3) -> int:
    """Multiply-adds of a conv whose output is size x size."""
    return size * size * c_out * c_in * k * k


def test_forward_flops_counts_two_per_multiply_add_of_a_conv():
    conv = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
    assert forward_flops(conv) == 2 * 32 * 32 * 16 * 3 * 9 == 884_736


def test_forward_flops_of_resnet20_matches_a_hand_count():
    macs = (conv_macs(32, 3, 16)
            + 6 * conv_macs(32, 16, 16)
            + conv_macs(16, 16, 32) + 5 * conv_macs(16, 32, 32)
            + conv_macs(8, 32, 64) + 5 * conv_macs(8, 64, 64)
            + 64 * 10)
    assert macs == 40_551_040  # the ~41 M multiply-adds of He et al.'s 0.27 M-param net
    assert forward_flops(build_model("resnet20")) == 2 * macs


def test_forward_flops_of_resnet18_matches_a_hand_count_for_each_stem():
    def stages(s: int) -> int:  # s: resolution into layer1
        macs = 4 * conv_macs(s, 64, 64)
        for i, c in ((1, 128), (2, 256), (3, 512)):  # stride 2, then a 1x1 projection shortcut
            r = s // 2**i
            macs += conv_macs(r, c // 2, c) + 3 * conv_macs(r, c, c) + conv_macs(r, c // 2, c, k=1)
        return macs + 512 * 10

    imagenet = conv_macs(16, 3, 64, 7) + stages(8)
    cifar = conv_macs(32, 3, 64, 3) + stages(32)
    assert 70e6 < 2 * imagenet < 80e6 and 1.0e9 < 2 * cifar < 1.2e9
    assert forward_flops(build_model("resnet18", stem="imagenet")) == 2 * imagenet
    assert forward_flops(build_model("resnet18", stem="cifar")) == 2 * cifar


def test_forward_flops_leaves_the_model_in_its_mode():
    model = build_model("resnet20").train()
    forward_flops(model)
    assert model.training
