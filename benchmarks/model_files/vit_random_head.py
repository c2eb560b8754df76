"""torchvision ViTs whose classification head is random instead of zero.

torchvision initialises ViT's head to zeros, so a randomly initialised ViT outputs zeros and an
output parity check of it proves nothing. These factories give the head random weights (the
rest of the model as torchvision initialises it):

    rankfold compress benchmarks/model_files/vit_random_head.py:vit_b_32 --method svd \
        --macs-reduction 1.5 --no-latency
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

RANKFOLD_SPEC = {
    "input_shape": [3, 224, 224],
    "num_classes": 1000,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def _random_head(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02, generator=generator)
        model.heads.head.bias.normal_(0, 0.02, generator=generator)
    return model


def vit_b_32() -> nn.Module:
    return _random_head(torchvision.models.vit_b_32())


def vit_b_16() -> nn.Module:
    return _random_head(torchvision.models.vit_b_16())
