"""CIFAR-10 ResNets (He et al. 2016, §4.2), laid out to load the akamaster checkpoints as is.

Module names match the checkpoints' keys (after their `module.` prefix): `conv1`, `bn1`,
`layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}`, `linear`. The "option A" shortcut is a parameter-free
module rather than the original lambda, so torch.fx traces it and it shows up by name in plans.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (16, 32, 64)


class SubsampleShortcut(nn.Module):
    """Option-A shortcut: keep every second pixel, zero-pad channels by `pad` on each side.

    Computed as a stride-2 1×1 conv with a fixed 0/1 kernel (not slicing and padding): the
    result is identical, and onnxruntime keeps the whole residual stage in its blocked NCHWc
    layout, where a Slice/Pad shortcut forced every later add and ReLU out of it (ResNet-56:
    reorders, adds and ReLUs cost ~0.3 ms of a 3 ms run at batch 1).
    """

    def __init__(self, in_planes: int, pad: int) -> None:
        super().__init__()
        self.pad = pad
        kernel = torch.zeros(in_planes + 2 * pad, in_planes, 1, 1)
        kernel[pad : pad + in_planes, :, 0, 0] = torch.eye(in_planes)
        # Not in the state dict: checkpoints have no such key, and it is not a weight.
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, stride=2)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the shortcut, then relu."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = SubsampleShortcut(in_planes, planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 3×32×32 inputs: 16-channel stem, three stages of n blocks, linear head."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        in_planes = WIDTHS[0]
        stages = []
        for index, planes in enumerate(WIDTHS):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(WIDTHS[-1], num_classes)
        for module in self.modules():
            # Kaiming init as in the original training code, so an untrained model is a fair start.
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# Blocks per stage for each depth 6n + 2 of He et al. (2016), Table 6.
BLOCKS_PER_STAGE = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(BLOCKS_PER_STAGE["resnet20"], num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(BLOCKS_PER_STAGE["resnet32"], num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(BLOCKS_PER_STAGE["resnet44"], num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(BLOCKS_PER_STAGE["resnet56"], num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(BLOCKS_PER_STAGE["resnet110"], num_classes)
