"""One small member of every torchvision classification family, a segmentation model and a
detection backbone: planned at 1.5× fewer MACs, decomposed, exported to ONNX and checked.

Each asserts ONNX parity ≤ 1e-4 of every output's scale, the MAC reduction within 5 % of the
request, and a reason for every layer kept whole. Random init; each member is built from its
family's own torchvision class (the same blocks, fewer and narrower: one block per stage where
the class takes a depth, small widths where it takes one) at a small input, because the torch
.export-based ONNX export costs seconds per model and grows with the graph. GoogLeNet,
Inception-v3, MNASNet, SqueezeNet and AlexNet take no depth, so they run at full depth; VGG's
and AlexNet's classifiers are 128 wide instead of 4096 (`_narrow_head`).

Methods: tucker2 where the family's dense k×k convs hold the MACs it factorizes into Tucker-2
blocks (ResNeXt's and RegNet's grouped convs per group, DenseNet, SqueezeNet's 3×3 expands,
AlexNet, VGG, EfficientNetV2's fused MBConvs), svd on 1×1-and-depthwise networks and transformers
(whose budgeted layers are 1×1 convs and linears: SVD whatever the method, so tucker2 would repeat
the svd run), and both on ResNet, whose 3×3 convs the two methods factorize differently (spatial
k×1 → 1×k against Tucker-2). Wide ResNet, GoogLeNet and Inception-v3 run svd only: their kernel
shapes (3×3, 5×5, 1×k, k×1) under both methods are test_factorized_layers' hypothesis cases, and a
second whole-network run would cost 25–85 s each (Wide ResNet's Tucker-2 mostly HOOI on flat
1,024-channel random-init spectra) for no block kind the other rows do not export.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torchvision.models import (
    convnext,
    densenet,
    efficientnet,
    inception,
    maxvit,
    mnasnet,
    mobilenetv2,
    mobilenetv3,
    regnet,
    resnet,
    shufflenetv2,
    squeezenet,
    swin_transformer,
    vgg,
    vision_transformer,
)
from torchvision.models.alexnet import AlexNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.googlenet import GoogLeNet
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rankfold.passes import RankPolicy, decompose, plan_cost, select_ranks
from rankfold.passes.capture import trace_or_capture
from rankfold.passes.selectors import PlanningContext
from rankfold.runtime import check_parity, export_onnx

CLASSES = 10
TARGET = 1.5


def _tiny_resnet(**kwargs) -> resnet.ResNet:
    block = kwargs.pop("block", resnet.BasicBlock)
    return resnet.ResNet(block, [1, 1, 1, 1], num_classes=CLASSES, **kwargs)


def _efficientnet() -> nn.Module:
    setting, last = efficientnet._efficientnet_conf(
        "efficientnet_b0", width_mult=0.25, depth_mult=0.25
    )
    return efficientnet.EfficientNet(setting[:4], 0.2, last_channel=64, num_classes=CLASSES)


def _efficientnet_v2() -> nn.Module:
    fused, mb = efficientnet.FusedMBConvConfig, efficientnet.MBConvConfig
    setting = [fused(1, 3, 1, 8, 8, 1), fused(4, 3, 2, 8, 16, 1), mb(4, 3, 2, 16, 32, 1)]
    norm = functools.partial(nn.BatchNorm2d, eps=1e-3)
    return efficientnet.EfficientNet(
        setting, 0.2, last_channel=64, num_classes=CLASSES, norm_layer=norm
    )


def _mobilenet_v3() -> nn.Module:
    setting, _ = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.5)
    return mobilenetv3.MobileNetV3(setting[:4], last_channel=64, num_classes=CLASSES)


def _vit() -> nn.Module:
    model = vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=CLASSES,
    )  # fmt: skip
    # torchvision zeroes the head: all-zero logits would make parity say nothing.
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


def _swin(v2: bool) -> nn.Module:
    extra = (
        {"block": swin_transformer.SwinTransformerBlockV2,
         "downsample_layer": swin_transformer.PatchMergingV2}
        if v2 else {}
    )  # fmt: skip
    return swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
        num_classes=CLASSES, **extra,
    )  # fmt: skip


def _narrow_head(model: nn.Module, width: int = 128) -> nn.Module:
    """VGG's and AlexNet's classifier (Linear-ReLU-Dropout twice, then Linear) at `width`
    instead of 4096: the 4096-wide layers' SVDs alone would take minutes."""
    first = (
        model.classifier[1] if isinstance(model.classifier[0], nn.Dropout) else model.classifier[0]
    )
    model.classifier = nn.Sequential(
        nn.Dropout(), nn.Linear(first.in_features, width), nn.ReLU(inplace=True),
        nn.Dropout(), nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, CLASSES),
    )  # fmt: skip
    return model


def _regnet() -> nn.Module:
    params = regnet.BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8)
    return regnet.RegNet(params, num_classes=CLASSES)


def _fcn() -> nn.Module:
    """FCN on a one-block ResNet cut after layer2 (torchvision's FCN reads layer3/layer4 of a
    ResNet-50; the heads and the dict are the same): returns {"out", "aux"} at the input's
    size."""
    from torchvision.models._utils import IntermediateLayerGetter

    backbone = IntermediateLayerGetter(_tiny_resnet(), {"layer2": "out", "layer1": "aux"})
    return FCN(backbone, FCNHead(128, 3), FCNHead(64, 3))


def _fpn_backbone() -> nn.Module:
    """Faster R-CNN's kind of backbone: a ResNet with an FPN, five named feature maps."""
    return BackboneWithFPN(
        _tiny_resnet(),
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512],
        out_channels=32,
        extra_blocks=LastLevelMaxPool(),
    )


# family → (builder, input side, method)
FAMILIES = {
    "resnet": (_tiny_resnet, 32, "svd"),
    "resnext": (
        lambda: _tiny_resnet(block=resnet.Bottleneck, groups=4, width_per_group=4),
        32,
        "tucker2",
    ),
    "wide_resnet": (
        lambda: _tiny_resnet(block=resnet.Bottleneck, width_per_group=128),
        32,
        "svd",
    ),
    "densenet": (
        lambda: densenet.DenseNet(8, (2, 2, 2, 2), 16, num_classes=CLASSES),
        32,
        "tucker2",
    ),
    "googlenet": (
        lambda: GoogLeNet(CLASSES, aux_logits=False, init_weights=True),
        32,
        "svd",
    ),
    "inception_v3": (
        lambda: inception.Inception3(CLASSES, aux_logits=False, init_weights=True),
        75,
        "svd",
    ),
    "efficientnet": (_efficientnet, 32, "svd"),
    "efficientnet_v2": (_efficientnet_v2, 32, "tucker2"),
    "mobilenet_v2": (
        lambda: mobilenetv2.MobileNetV2(
            CLASSES, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 1, 2], [6, 32, 1, 2]]
        ),
        32,
        "svd",
    ),
    "mobilenet_v3": (_mobilenet_v3, 32, "svd"),
    "shufflenet_v2": (
        lambda: shufflenetv2.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], CLASSES),
        32,
        "svd",
    ),
    "mnasnet": (lambda: mnasnet.MNASNet(0.25, CLASSES), 32, "svd"),
    "squeezenet": (lambda: squeezenet.SqueezeNet("1_1", CLASSES), 32, "tucker2"),
    "regnet": (_regnet, 32, "tucker2"),
    "convnext": (
        lambda: convnext.ConvNeXt(
            [convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)],
            num_classes=CLASSES,
        ),
        32,
        "svd",
    ),
    "vgg": (
        lambda: _narrow_head(vgg.VGG(vgg.make_layers([16, "M", 32, "M", 512, "M"]))),
        32,
        "tucker2",
    ),
    "alexnet": (lambda: _narrow_head(AlexNet(CLASSES)), 64, "tucker2"),
    "vit": (_vit, 32, "svd"),
    "swin": (lambda: _swin(v2=False), 32, "svd"),
    "swin_v2": (lambda: _swin(v2=True), 32, "svd"),
    "maxvit": (
        lambda: maxvit.MaxVit(
            input_size=(32, 32),
            stem_channels=8,
            partition_size=2,
            block_channels=[8, 16],
            block_layers=[1, 1],
            head_dim=4,
            stochastic_depth_prob=0.0,
            num_classes=CLASSES,
        ),
        32,
        "svd",
    ),  # fmt: skip
    "segmentation (fcn)": (_fcn, 32, "tucker2"),
    "detection backbone (resnet+fpn)": (_fpn_backbone, 32, "svd"),
}


def test_every_torchvision_classification_family_is_here():
    """A guard: a classifier torchvision adds in a new family must get a row here."""
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)
    missing = [name for name in names if not name.startswith(tuple(FAMILIES))]
    assert not missing, f"no family row for {missing}"


BOTH_METHODS = ("resnet",)
CASES = [
    (family, method)
    for family, (_, _, first) in FAMILIES.items()
    for method in ((first, "tucker2") if family in BOTH_METHODS else (first,))
]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_family_compresses_and_exports(family, method, tmp_path):
    build, side, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    example = torch.randn(1, 3, side, side)
    captured = trace_or_capture(model, example)
    analysis = captured.analysis
    policy = RankPolicy(method=method, macs_reduction=TARGET, round_to=None)
    # Tucker-2 plans by energy, which reads the weights.
    plan = select_ranks(analysis, policy, PlanningContext(gm=captured.module)).plan
    compressed, report = decompose(captured.module, analysis, plan, compare_weight_only=False)
    reduction = analysis.total_macs / plan_cost(analysis, plan).macs
    assert abs(reduction / TARGET - 1) <= 0.05, f"{family}: {reduction:.3f}× for {TARGET}×"
    assert plan.decomposed(), family
    kept = [row for row in report.layers if row.status == "skipped"]
    assert all(row.reason.strip() for row in kept), [r.name for r in kept if not r.reason]
    path = export_onnx(compressed, example, tmp_path / "model.onnx")
    inputs = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    parity = check_parity(compressed, path, inputs, atol=0.0, rtol=1e-4)
    assert parity.outputs and all(o.scale > 0 for o in parity.outputs), parity
    assert parity.passed, [(o.name, o.max_rel_diff) for o in parity.outputs]
