"""CIFAR ResNets of depth 6n+2 (He et al. 2016, section 4.2) in two shortcut styles.

* :class:`CifarResNet` -- projection shortcut (1x1 conv + BN) where a unit changes shape; module
  names follow pytorchcv's ``resnet{D}_cifar{10,100}``, the paper's full-precision models, so
  pytorchcv state dicts load as they are.
* :class:`CifarResNetA` -- the original "option A" shortcut: subsample by 2 and zero-pad the new
  channels (no parameters); module names follow akamaster/pytorch_resnet_cifar10.

Both: 3x3 conv 16 -> three stages of n basic blocks (16, 32, 64 channels; stride 2 at the start
of stages 2 and 3) -> global average pool -> linear. BatchNorm everywhere, ReLU after the sum.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

STAGE_CHANNELS = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
    """n for a ResNet of depth 6n+2; raises ValueError for other depths."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110...), "
                         f"got {depth}")
    return (depth - 2) // 6


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# pytorchcv layout: features.{init_block, stageS.unitU.{body.conv1, body.conv2, identity_conv}},
# output; each conv block is {conv, bn[, activ]}.


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activ = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return self.activ(x) if self.activ is not None else x


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = ConvBlock(cin, cout, 3, stride, relu=True)
        self.conv2 = ConvBlock(cout, cout, 3, 1, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class ResUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = ResBlock(cin, cout, stride)
        self.identity_conv = (ConvBlock(cin, cout, 1, stride, relu=False)
                              if cin != cout or stride != 1 else None)
        self.activ = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = self.identity_conv(x) if self.identity_conv is not None else x
        return self.activ(self.body(x) + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) with projection shortcuts, pytorchcv module names."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = blocks_per_stage(depth)
        self.features = nn.Sequential()
        self.features.add_module("init_block", ConvBlock(in_channels, 16, 3, 1, relu=True))
        cin = 16
        for s, cout in enumerate(STAGE_CHANNELS):
            stage = nn.Sequential()
            for u in range(n):
                stride = 2 if (u == 0 and s > 0) else 1
                stage.add_module(f"unit{u + 1}", ResUnit(cin, cout, stride))
                cin = cout
            self.features.add_module(f"stage{s + 1}", stage)
        # 8x8 average pool as pytorchcv (32x32 inputs): the same op gives bit-identical outputs
        self.features.add_module("final_pool", nn.AvgPool2d(kernel_size=8, stride=1))
        self.output = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.features(x).flatten(1))


# ----------------------------------------------------------------------------------------------
# akamaster layout: conv1, bn1, layerS.B.{conv1, bn1, conv2, bn2}, linear.


class ZeroPadShortcut(nn.Module):
    """Option A: take every second pixel, zero-pad the missing channels evenly on both sides."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_before = (cout - cin) // 2
        self.pad_after = cout - cin - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlockA(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (ZeroPadShortcut(cin, cout, stride)
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetA(nn.Module):
    """ResNet-(6n+2) with parameter-free zero-padding shortcuts, akamaster module names."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = blocks_per_stage(depth)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for s, cout in enumerate(STAGE_CHANNELS):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlockA(cin, cout, 2 if (b == 0 and s > 0) else 1))
                cin = cout
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
