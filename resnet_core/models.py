"""The ResNet v1 family of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016).

ImageNet nets (paper Table 1): ``resnet18``, ``resnet34`` (basic blocks), ``resnet50``,
``resnet101``, ``resnet152`` (bottleneck blocks), and the plain baselines ``plain18``, ``plain34``
(the same stacks without shortcuts, §4.1). They use torchvision's layout and state-dict keys, so
weights move both ways between ``create_model("resnet50", stride_in_3x3=True)`` and
``torchvision.models.resnet50()``.

CIFAR-10 nets (paper §4.2): ``resnet{6n+2}`` and ``plain{6n+2}`` for any n >= 1 (the paper trains
20, 32, 44, 56, 110 and 1202 layers): a 3x3 conv with 16 filters, three stages of n basic blocks
with 16/32/64 filters on 32/16/8 maps, global average pooling and a fully connected layer.

Every net is fully convolutional up to the pooling, so any input of at least 32x32 pixels works.
"""

import re
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SHORTCUTS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ResNet",
    "Shortcut",
    "ZeroPadShortcut",
    "create_model",
    "has_bottlenecks",
    "is_cifar_model",
    "model_names",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut (paper §3.3): identity with extra zero channels for increased dimensions.

    Parameter-free: subsamples the map by taking every ``stride``-th pixel, then appends
    ``extra_channels`` channels of zeros.
    """

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (paper Fig. 5 left): ResNet-18/34 and every CIFAR net.

    ``residual=False`` drops the shortcut and gives the plain block of §4.1.
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        # Both self.conv1 and self.downsample subsample the input when stride != 1.
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)
        if self.residual:
            out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by ``expansion`` (paper Fig. 5 right): ResNet-50/101/152.

    ``stride_in_3x3`` chooses where a downsampling block subsamples. The paper (v1) strides the
    first 1x1 conv (False, our default). torchvision and NVIDIA ship "ResNet v1.5", which strides
    the 3x3 conv instead (True): ~0.5% better top-1 by NVIDIA's account, ~6% more multiply-adds,
    the same parameters and state-dict keys. ``residual=False`` drops the shortcut (a plain block).
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
        stride_in_3x3: bool = False,
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (1, stride) if stride_in_3x3 else (stride, 1)
        # One of self.conv1/self.conv2, and self.downsample, subsample the input when stride != 1.
        self.conv1 = conv1x1(inplanes, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)
        if self.residual:
            out += identity
        return self.relu(out)


def _shortcut(kind: str | None, inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    """The transform on a block's shortcut (paper §3.3), or None for a plain identity.

    ``kind``: "A" zero-padding identity where dimensions increase, "B" projection (1x1 conv + BN)
    where they increase, "C" projection on every block, None for plain nets (no shortcut at all).
    """
    changes_shape = stride != 1 or inplanes != outplanes
    if kind == "C" or (kind == "B" and changes_shape):
        return nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))
    if kind == "A" and changes_shape:
        return ZeroPadShortcut(stride, outplanes - inplanes)
    return None


def _make_layer(
    block: type[BasicBlock | Bottleneck],
    inplanes: int,
    planes: int,
    blocks: int,
    stride: int,
    shortcut: str | None,
    **block_options: bool,
) -> nn.Sequential:
    """One stage of ``blocks`` blocks of width ``planes``; its first block subsamples by ``stride``."""
    outplanes = planes * block.expansion
    layers = []
    for index in range(blocks):
        block_stride = stride if index == 0 else 1
        downsample = _shortcut(shortcut, inplanes, outplanes, block_stride)
        residual = shortcut is not None
        layers.append(block(inplanes, planes, block_stride, downsample, residual, **block_options))
        inplanes = outplanes
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """He initialisation (paper §3.4) for convs, BN to identity; nn.Linear keeps its default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    # Deviation from the paper (off by default): zero the last BN gamma of each residual branch so
    # that every block starts as its shortcut alone (Goyal et al. 2017, arXiv:1706.02677).
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


class ResNet(nn.Module):
    """ImageNet ResNet (paper Table 1) with torchvision's module names and state-dict keys.

    Args:
        block: BasicBlock (18/34 layers) or Bottleneck (50/101/152 layers).
        layers: blocks per stage (conv2_x .. conv5_x), e.g. [3, 4, 6, 3].
        num_classes: outputs of the final fully connected layer.
        shortcut: "A", "B" or "C" (paper §3.3), or None for the plain net of §4.1.
        stride_in_3x3: bottleneck nets only: False strides the first 1x1 (v1), True the 3x3 (v1.5).
        zero_init_residual: start each residual branch's last BN gamma at zero.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        shortcut: str | None = "B",
        stride_in_3x3: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        # Where a block subsamples is a bottleneck-only choice: a basic block's first 3x3 always does.
        options = {"stride_in_3x3": stride_in_3x3} if block is Bottleneck else {}
        self.num_features = 512 * block.expansion
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_layer(block, 64, 64, layers[0], 1, shortcut, **options)
        self.layer2 = _make_layer(
            block, 64 * block.expansion, 128, layers[1], 2, shortcut, **options
        )
        self.layer3 = _make_layer(
            block, 128 * block.expansion, 256, layers[2], 2, shortcut, **options
        )
        self.layer4 = _make_layer(
            block, 256 * block.expansion, 512, layers[3], 2, shortcut, **options
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.num_features, num_classes)
        _init_weights(self, zero_init_residual)

    def forward_features(self, x: Tensor) -> Tensor:
        """Final feature map before pooling: (N, num_features, ceil(H/32), ceil(W/32))."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class CifarResNet(nn.Module):
    """CIFAR-10 ResNet of paper §4.2: 6n+2 layers, 16/32/64 filters on 32/16/8 maps.

    Args:
        blocks_per_stage: n; the net has 6n+2 weighted layers.
        num_classes: outputs of the final fully connected layer.
        shortcut: "A" (the paper's CIFAR choice), "B" or "C" (§3.3), or None for a plain net.
        zero_init_residual: start each residual branch's last BN gamma at zero.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        shortcut: str | None = "A",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        n = blocks_per_stage
        self.num_features = 64
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_layer(BasicBlock, 16, 16, n, 1, shortcut)
        self.layer2 = _make_layer(BasicBlock, 16, 32, n, 2, shortcut)
        self.layer3 = _make_layer(BasicBlock, 32, 64, n, 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.num_features, num_classes)
        _init_weights(self, zero_init_residual)

    def forward_features(self, x: Tensor) -> Tensor:
        """Final feature map before pooling: (N, 64, ceil(H/4), ceil(W/4))."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# Paper Table 1: block type and blocks per stage for each ImageNet depth.
_IMAGENET_LAYERS: dict[int, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
# §4.1 compares plain and residual nets at these ImageNet depths only.
_PLAIN_IMAGENET_DEPTHS = (18, 34)
# §4.2 / Table 6 and Fig. 6: the CIFAR depths the paper trains (plain nets up to 56 layers).
_CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110, 1202)
_CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56)
# §3.3: A zero-padding identity, B projections where dimensions increase, C projections everywhere.
Shortcut = Literal["A", "B", "C"]
SHORTCUTS: tuple[str, ...] = get_args(Shortcut)
_NAME = re.compile(r"(resnet|plain)([1-9][0-9]*)")
_VALID_FORMS = (
    "resnet18/34/50/101/152 or plain18/34 (ImageNet), resnet{6n+2} or plain{6n+2} with n >= 1 "
    "(CIFAR-10: resnet20, resnet56, resnet110, ...)"
)


def _parse(name: object) -> tuple[bool, int, bool]:
    """(residual, depth, is_cifar) of a model name; ValueError naming the bad value otherwise."""
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"unknown model name {name!r}; valid names: {_VALID_FORMS}")
    residual = match.group(1) == "resnet"
    depth = int(match.group(2))
    if depth in _IMAGENET_LAYERS:
        if not residual and depth not in _PLAIN_IMAGENET_DEPTHS:
            raise ValueError(
                f"unknown model name {name!r}: the paper's plain ImageNet nets are plain18 and "
                f"plain34 (§4.1); valid names: {_VALID_FORMS}"
            )
        return residual, depth, False
    if depth >= 8 and (depth - 2) % 6 == 0:
        return residual, depth, True
    raise ValueError(f"unknown model name {name!r}; valid names: {_VALID_FORMS}")


def model_names() -> list[str]:
    """The canonical names: ImageNet nets, then the CIFAR-10 depths the paper trains."""
    return [
        *(f"resnet{depth}" for depth in _IMAGENET_LAYERS),
        *(f"plain{depth}" for depth in _PLAIN_IMAGENET_DEPTHS),
        *(f"resnet{depth}" for depth in _CIFAR_RESNET_DEPTHS),
        *(f"plain{depth}" for depth in _CIFAR_PLAIN_DEPTHS),
    ]


def is_cifar_model(name: str) -> bool:
    """True for the CIFAR-10 nets (32x32 stem, 10 classes by default), False for ImageNet nets."""
    return _parse(name)[2]


def has_bottlenecks(name: str) -> bool:
    """True for the nets built of bottleneck blocks (ResNet-50/101/152), where
    ``stride_in_3x3`` chooses v1 or v1.5."""
    _, depth, cifar = _parse(name)
    return not cifar and _IMAGENET_LAYERS[depth][0] is Bottleneck


def create_model(
    name: str,
    num_classes: int | None = None,
    *,
    shortcut: Shortcut | None = None,
    stride_in_3x3: bool = False,
    zero_init_residual: bool = False,
) -> nn.Module:
    """Build one net of the ResNet v1 family, He-initialised (paper §3.4).

    Args:
        name: see the module docstring; ``model_names()`` lists the canonical ones.
        num_classes: outputs of the classifier; None gives 1000 (ImageNet) or 10 (CIFAR-10).
        shortcut: "A" zero-padding identity (parameter-free), "B" projections where dimensions
            increase, "C" projections everywhere (paper §3.3). None gives the paper's choice:
            "B" on ImageNet, "A" on CIFAR-10. Plain nets have no shortcuts and accept only None.
        stride_in_3x3: bottleneck nets (50/101/152) subsample in the 3x3 conv ("v1.5", as
            torchvision ships) instead of the first 1x1 conv (the paper). No effect on other nets.
        zero_init_residual: zero the last BN gamma of each residual branch (Goyal et al. 2017;
            not in the paper). Residual nets only.
    """
    residual, depth, cifar = _parse(name)
    if num_classes is None:
        num_classes = 10 if cifar else 1000
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be 'A', 'B' or 'C' (paper §3.3), got {shortcut!r}")
    if not residual and shortcut is not None:
        raise ValueError(
            f"{name} has no shortcuts (paper §4.1), got shortcut={shortcut!r}; drop the option "
            f"or use resnet{depth}"
        )
    if not isinstance(stride_in_3x3, bool):
        raise ValueError(f"stride_in_3x3 must be True or False, got {stride_in_3x3!r}")
    if not isinstance(zero_init_residual, bool):
        raise ValueError(f"zero_init_residual must be True or False, got {zero_init_residual!r}")
    if not residual and zero_init_residual:
        raise ValueError(
            f"{name} has no residual branches to zero-initialise, got zero_init_residual=True; "
            f"drop the option or use resnet{depth}"
        )

    if cifar:
        kind = (shortcut or "A") if residual else None
        return CifarResNet((depth - 2) // 6, num_classes, kind, zero_init_residual)
    block, layers = _IMAGENET_LAYERS[depth]
    kind = (shortcut or "B") if residual else None
    return ResNet(block, layers, num_classes, kind, stride_in_3x3, zero_init_residual)
