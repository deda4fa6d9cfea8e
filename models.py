"""CIFAR-10 models: one table of architectures (ARCHS) and build_model(arch, ...) to make them.

  resnet18..152  torchvision's ResNets. stem="cifar" (default): a 3x3 stride-1 conv1 and no max-pool,
                 so layer1 sees 32x32; stem="imagenet": torchvision's own (layer1 sees 8x8); pretrained.
  resnet20..110  the CIFAR ResNets of He et al. 2015: 6n+2 layers, 16/32/64 channels, option-A shortcuts.
  resnet9        the DAWNBench / FFCV CIFAR example network (FFCV pools with max: pass pool="max").
  resnet_custom  basic-block ResNet with chosen blocks, channels and MLP head (see basic_resnet).
  cnn            plain baseline without shortcuts (see plain_cnn).

Every architecture takes pool="avg"|"max" (the global pooling before the classifier) and pool_norm
(off by default: each is then the network its name says; see pooling); only the torchvision ResNets
take stem="imagenet" and pretrained=True.
`python models.py` prints params and forward MFLOPs as Markdown.
"""
from collections import OrderedDict
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

POOLS = ("avg", "max")
STEMS = ("cifar", "imagenet")


def pooling(pool: str, channels: int, size: int = 1, pool_norm: bool = False) -> nn.Module:
    """The global pool to size x size before the classifier; with pool_norm, its output standardised
    per channel by a BatchNorm without parameters. Off by default: the plain pool is the network the
    arch names, and the norm is a choice to compare (docs/models.md).

    Why the norm: the classifier's curvature grows with the size of what it reads. In ResNet-20 at init a max
    pool's features have mean squared norm 2,271 (avg: 121) and the top Hessian eigenvalue of the
    loss is 691 (avg: 24): SGD with momentum 0.9 is then stable only below lr 2(1 + 0.9) / 691 = 0.005.
    Standardised, it is 6.2 (avg: 7.0), stable up to lr 0.5, past SGD's peak of 0.4. In eval mode the
    norm is a fixed per-channel affine map, which the classifier absorbs: no more parameters."""
    pooled = nn.AdaptiveAvgPool2d(size) if pool == "avg" else nn.AdaptiveMaxPool2d(size)
    return nn.Sequential(pooled, nn.BatchNorm2d(channels, affine=False)) if pool_norm else pooled


# ---------------------------------------------------------------- torchvision ResNets
def torchvision_resnet(name: str, num_classes: int, pool: str, stem: str, pretrained: bool,
                       pool_norm: bool = False) -> nn.Module:
    model = getattr(torchvision.models, name)()  # 1000 classes, so the ImageNet state dict fits as is
    if pretrained:  # IMAGENET1K_V1 at every depth (one recipe), cached in $TORCH_HOME/hub/checkpoints
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        model.load_state_dict(weights.get_state_dict(progress=True, check_hash=True))
    if stem == "cifar":  # a stride-4 stem would leave 8x8 maps in layer1: keep CIFAR's 32x32
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        model.maxpool = nn.Identity()
        if pretrained:
            print(f"{name}: ImageNet's 7x7 conv1 does not fit the 3x3 cifar stem; "
                  "loaded all other weights, conv1 starts from scratch")
    model.avgpool = pooling(pool, model.fc.in_features, pool_norm=pool_norm)  # torchvision's name, even for max
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


# ---------------------------------------------------------------- basic-block ResNets
class ZeroPadShortcut(nn.Module):
    """Option A of He et al. 2015: subsample by the stride and zero-pad the new channels (no weights)."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add the shortcut, ReLU. Where the shape changes the shortcut is a
    1x1 conv + BN (option B, as torchvision) or, with zero_pad, option A."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel_size: int = 3, zero_pad: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size, 1, kernel_size // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         ZeroPadShortcut(c_out - c_in, stride) if zero_pad else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def mlp_head(c_in: int, hidden: tuple[int, ...], num_classes: int, dropout: float) -> nn.Module:
    """Linear layers of widths hidden..., num_classes, with ReLU between them and dropout before each."""
    layers: list[nn.Module] = []
    for width in (*hidden, num_classes):
        if layers:
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(c_in, width))
        c_in = width
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def basic_resnet(num_classes: int, pool: str, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 channels: tuple[int, ...] = (64, 128, 256, 512), kernel_size: int = 3, zero_pad: bool = False,
                 avgpool_size: int = 1, head: tuple[int, ...] = (), dropout: float = 0.0,
                 pool_norm: bool = False) -> nn.Sequential:
    """Basic-block ResNet: 3x3 stem conv, one stage per entry of blocks/channels (the first at
    stride 1, the others stride 2), 1x1 projection shortcuts (option A with zero_pad), global pool to
    avgpool_size^2, then an MLP with `head` hidden widths and dropout before each Linear. The
    defaults are exactly resnet18 with the cifar stem (11,173,962 params). Examples (10 classes):
      blocks=(3, 4, 4, 3), channels=(32, 64, 128, 256), head=(256, 128)   4,833,066 params
      blocks=(2, 2, 2), channels=(32, 64, 96)                               481,962 params
    """
    if len(blocks) != len(channels) or min(blocks, default=0) < 1 or min(channels, default=0) < 1:
        raise ValueError(f"resnet_custom: blocks {tuple(blocks)} and channels {tuple(channels)} need one positive "
                         "entry per stage, e.g. blocks=(2, 2, 2), channels=(32, 64, 128)")
    if kernel_size % 2 == 0:
        raise ValueError(f"resnet_custom: kernel_size={kernel_size} must be odd to keep 'same' padding")
    if not 0 <= dropout < 1:
        raise ValueError(f"resnet_custom: dropout={dropout} must be in [0, 1)")
    # torchvision's module names (conv1, layer1, avgpool, fc): hooks and "fc." param groups work for all
    layers: dict[str, nn.Module] = dict(conv1=nn.Conv2d(3, channels[0], 3, 1, 1, bias=False),
                                        bn1=nn.BatchNorm2d(channels[0]), relu=nn.ReLU(inplace=True))
    c_in = channels[0]
    for i, (n, c) in enumerate(zip(blocks, channels, strict=True)):
        layers[f"layer{i + 1}"] = nn.Sequential(*[
            BasicBlock(c_in if j == 0 else c, c, 2 if i > 0 and j == 0 else 1, kernel_size, zero_pad)
            for j in range(n)])
        c_in = c
    layers.update(avgpool=pooling(pool, c_in, avgpool_size, pool_norm), flatten=nn.Flatten(),
                  fc=mlp_head(c_in * avgpool_size**2, tuple(head), num_classes, dropout))
    return nn.Sequential(OrderedDict(layers))


# ---------------------------------------------------------------- ResNet-9 and plain CNN
def conv_bn(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.module = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.module(x)


class Mul(nn.Module):
    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def resnet9(num_classes: int, pool: str, pool_norm: bool = False) -> nn.Module:
    """Layout of FFCV's CIFAR example (after Page's DAWNBench net); 0.2 scales the logits down."""
    return nn.Sequential(
        conv_bn(3, 64), conv_bn(64, 128, kernel_size=5, stride=2, padding=2),
        Residual(conv_bn(128, 128), conv_bn(128, 128)),
        conv_bn(128, 256), nn.MaxPool2d(2),
        Residual(conv_bn(256, 256), conv_bn(256, 256)),
        conv_bn(256, 128, padding=0), pooling(pool, 128, pool_norm=pool_norm), nn.Flatten(),
        nn.Linear(128, num_classes, bias=False), Mul(0.2))


def plain_cnn(num_classes: int, pool: str, pool_norm: bool = False) -> nn.Module:
    """conv-conv-pool x2 (32, 32, pool, 64, 64, pool), flatten 64x8x8, Linear 512, Linear classes (2.17 M
    params). conv-BN-ReLU, so it trains at the ResNets' learning rates: the comparison isolates depth and
    shortcuts. No global pool: `pool` picks its two 2x2 pools (the second with pool_norm); 32x32 inputs only."""
    down = nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)
    return nn.Sequential(conv_bn(3, 32), conv_bn(32, 32), down, conv_bn(32, 64), conv_bn(64, 64),
                         pooling(pool, 64, 8, pool_norm), nn.Flatten(), nn.Linear(64 * 8 * 8, 512),  # 16x16 -> 8x8
                         nn.ReLU(inplace=True), nn.Linear(512, num_classes))


# ---------------------------------------------------------------- the table
class Arch(NamedTuple):
    build: Callable[..., nn.Module]  # build(num_classes=, pool=, pool_norm=, [stem=, pretrained=,] **options)
    about: str
    stems: tuple[str, ...] = ("cifar",)
    pretrained: bool = False  # ImageNet weights exist (torchvision); its builders also take stem=
    options: tuple[str, ...] = ()  # the keyword options build_model passes through (train.py's flags)


ARCHS: dict[str, Arch] = {
    **{f"resnet{d}": Arch(partial(torchvision_resnet, f"resnet{d}"), "torchvision", STEMS, True)
       for d in (18, 34, 50, 101, 152)},
    **{f"resnet{d}": Arch(partial(basic_resnet, blocks=((d - 2) // 6,) * 3, channels=(16, 32, 64), zero_pad=True),
                          "He et al. 2015 CIFAR") for d in (20, 32, 44, 56, 110)},
    "resnet9": Arch(resnet9, "DAWNBench / FFCV"),
    "resnet_custom": Arch(basic_resnet, "custom basic-block", options=(
        "blocks", "channels", "kernel_size", "avgpool_size", "head", "dropout")),
    "cnn": Arch(plain_cnn, "plain CNN"),
}


def build_model(arch: str, num_classes: int = 10, pool: str = "avg", stem: str = "cifar",
                pretrained: bool = False, pool_norm: bool = False, **options) -> nn.Module:
    for what, value, choices in (("arch", arch, tuple(ARCHS)), ("pool", pool, POOLS), ("stem", stem, STEMS)):
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")
    spec = ARCHS[arch]
    if stem not in spec.stems:
        raise ValueError(f"{arch} takes only stem={spec.stems[0]!r}; stem={stem!r} is for "
                         f"{', '.join(a for a in ARCHS if stem in ARCHS[a].stems)}")
    if pretrained and not spec.pretrained:
        raise ValueError(f"{arch} has no pretrained weights; pretrained=True is for "
                         f"{', '.join(a for a in ARCHS if ARCHS[a].pretrained)}")
    for option in set(options) - set(spec.options):
        raise ValueError(f"{arch} does not take option {option!r}: it takes num_classes, pool, pool_norm, stem"
                         + ", pretrained" * spec.pretrained + "".join(f", {o}" for o in spec.options))
    if spec.pretrained:
        options.update(stem=stem, pretrained=pretrained)
    return spec.build(num_classes=num_classes, pool=pool, pool_norm=pool_norm, **options)


def build_from_config(config: dict, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The network of a train.py config (its arch, pool, stem, pool_norm and the arch's options), e.g.
    the untrained network of a record, ready for its kept state dict:
        model = build_from_config(record["config"], num_classes=len(record["classes"]))
        model.load_state_dict(torch.load(weights_path, weights_only=True))
    pretrained is off by default: kept weights replace ImageNet's, so nothing need be downloaded."""
    options = {k: config[k] for k in ARCHS[config["arch"]].options if config[k] is not None}
    return build_model(config["arch"], num_classes, config["pool"], config["stem"], pretrained, config["pool_norm"],
                       **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, image_size: int = 32) -> int:
    """Forward FLOPs for one image (batch of 1, eval mode), as FlopCounterMode counts them:
    2 per multiply-add in convs and Linears; BN, ReLU, pooling and residual adds are not counted."""
    p = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()  # train-mode BN fails on a batch of 1 with 1x1 maps, and would update its stats
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


if __name__ == "__main__":
    print("| arch | family | stem | params | MFLOPs / 32x32 image |")
    print("|---|---|---|--:|--:|")
    for name, spec in ARCHS.items():
        for stem in spec.stems:
            model = build_model(name, stem=stem)
            print(f"| {name} | {spec.about} | {stem} | {count_parameters(model):,} "
                  f"| {forward_flops(model) / 1e6:,.1f} |")
