"""Graph clean-up before export: BN folding, 1×1 merging, identity dropping, parity kept."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from planning_helpers import plan_of
from torch import fx, nn
from torch.nn import functional as F

from rankfold.passes import RankPolicy, analyze, decompose, restructure, trace
from rankfold.passes.blocks import FactorizedBlock, pointwise
from rankfold.passes.cleanup import cleanup
from rankfold.runtime import export_onnx

SHAPE = (3, 12, 12)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a wrong fold shows in the output."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model.eval()


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(32, 10)
        self.bn3 = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(self.drop(x.mean((2, 3)))))


def traced(model: nn.Module) -> fx.GraphModule:
    torch.manual_seed(0)
    return trace(randomize_bn(model), torch.zeros(1, *SHAPE))


def assert_same_function(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(b(x).numpy(), a(x).numpy(), rtol=0, atol=atol)


def module_types(gm: fx.GraphModule) -> list[str]:
    return [
        type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"
    ]


def test_batchnorms_fold_into_convs_and_linear_and_dropout_goes() -> None:
    gm = traced(ConvBN())
    cleaned, counts = cleanup(gm)
    assert counts == {
        "identities_dropped": 1,
        "batchnorms_folded": 3,
        "batchnorms_folded_into_blocks": 0,
        "convs_merged": 0,
    }
    assert module_types(cleaned) == ["Conv2d", "Conv2d", "Linear"]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in cleaned.modules())
    assert cleaned.conv1.bias is not None  # the BN shift became a bias
    assert_same_function(gm, cleaned)
    # The input module is untouched, and shapes are recorded again for later passes.
    assert "BatchNorm2d" in module_types(gm)
    assert analyze(cleaned).total_macs == analyze(gm).total_macs


def test_cleanup_returns_eval_mode_and_leaves_a_training_model_alone() -> None:
    gm = traced(ConvBN())
    gm.train()
    cleaned, counts = cleanup(gm)
    assert counts["batchnorms_folded"] == 3 and not cleaned.training
    assert gm.training and gm.bn1.training
    gm.eval()
    assert_same_function(gm, cleaned)


class SharedConv(nn.Module):
    """One conv called twice, each call followed by its own BN: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_b(self.conv(F.relu(self.bn_a(self.conv(x)))))


class BNWithTwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.stats = nn.BatchNorm2d(8, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y + self.stats(self.conv(x) * 1.0)


def test_batchnorm_is_not_folded_when_that_would_change_the_function() -> None:
    for model in (SharedConv(), BNWithTwoReaders()):
        gm = traced(model)
        cleaned, counts = cleanup(gm)
        assert counts["batchnorms_folded"] == 0
        assert_same_function(gm, cleaned)


def test_batchnorm_after_a_factorized_block_folds_into_its_last_stage() -> None:
    torch.manual_seed(0)
    gm = traced(ConvBN())
    analysis = analyze(gm)
    for method in ("cp", "tucker2"):
        plan = plan_of(
            analysis, RankPolicy(method=method, rank=0.5, skip=["Linear"], min_macs_share=0), "m"
        )
        compressed, _ = decompose(gm, analysis, plan)
        cleaned, counts = cleanup(compressed)
        assert counts["batchnorms_folded_into_blocks"] == 2
        assert counts["batchnorms_folded"] == 1  # the linear's BN
        block = cleaned.get_submodule("conv2")
        assert isinstance(block, FactorizedBlock) and block.method == method
        assert block[-1].bias is not None
        assert_same_function(compressed, cleaned)


class Pointwise(nn.Module):
    """1×1 (stride 2) → 1×1 with nothing between, then ReLU → 1×1 → 1×1 with a ReLU between."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, hidden, 1, stride=2)
        self.b = nn.Conv2d(hidden, 4, 1)
        self.c = nn.Conv2d(4, hidden, 1, bias=False)
        self.d = nn.Conv2d(hidden, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(F.relu(self.c(F.relu(self.b(self.a(x))))))


def test_adjacent_pointwise_convs_merge_only_when_cheaper_and_linear() -> None:
    wide = traced(Pointwise(hidden=16))  # 3·4 < 16·(3 + 4): one conv is cheaper
    cleaned, counts = cleanup(wide)
    assert counts["convs_merged"] == 1
    assert module_types(cleaned) == ["Conv2d", "Conv2d", "Conv2d"]
    assert cleaned.a.out_channels == 4 and tuple(cleaned.a.stride) == (2, 2)
    assert_same_function(wide, cleaned)
    assert analyze(cleaned).layer("a").out_shape == (4, 6, 6)

    narrow = traced(Pointwise(hidden=1))  # 3·4 > 1·(3 + 4): the factorized pair is cheaper
    assert cleanup(narrow)[1]["convs_merged"] == 0


class Blocks(nn.Module):
    """plain 1×1 → block(1×1, 1×1, 1×1) → plain 1×1, all without nonlinearity."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 24, 1)
        stages = OrderedDict(
            p=pointwise(24, 20), q=pointwise(20, 20), r=pointwise(20, 6, bias=True)
        )
        self.block = FactorizedBlock(stages, "block", "test", (20,))
        self.last = nn.Conv2d(6, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.last(self.block(self.first(x))))


def test_pointwise_merges_reach_into_and_across_factorized_blocks() -> None:
    gm = traced(Blocks())
    cleaned, counts = cleanup(gm)
    # p+q inside the block, then first+pq, first+r (the emptied block goes), first+last: each
    # step is cheaper, so the five 1×1 maps end as one 3→32 conv.
    assert counts["convs_merged"] == 4
    assert module_types(cleaned) == ["Conv2d"]
    assert (cleaned.first.in_channels, cleaned.first.out_channels) == (3, 32)
    assert_same_function(gm, cleaned)


class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.keep = nn.Identity()
        self.drop2d = nn.Dropout2d(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop2d(self.keep(self.conv(x)))
        return F.dropout(x, 0.5, training=False) + F.dropout(x, 0.5, False)


def test_identity_and_eval_dropout_are_dropped() -> None:
    gm = traced(Identities())
    cleaned, counts = cleanup(gm)
    assert counts["identities_dropped"] == 4
    assert [n.op for n in cleaned.graph.nodes].count("call_function") == 1  # the add
    assert_same_function(gm, cleaned)


def test_cleaned_compressed_resnet_exports_and_matches_pytorch(tmp_path: Path) -> None:
    from rankfold.models import load_model

    model, spec = load_model("resnet20")
    torch.manual_seed(0)
    randomize_bn(model)
    gm = trace(model, torch.zeros(1, *spec.input_shape))
    analysis = analyze(gm)
    plan = plan_of(analysis, RankPolicy(method="tucker2", macs_reduction=2.0), "resnet20")
    # Unfilled blocks (random weights) exercise the same graph as factorized ones, in no time.
    compressed = restructure(gm, analysis, plan).eval()
    cleaned, counts = cleanup(compressed)
    assert counts["batchnorms_folded"] + counts["batchnorms_folded_into_blocks"] == 19
    path = export_onnx(cleaned, torch.zeros(1, *spec.input_shape), tmp_path / "m.onnx")
    x = torch.randn(8, *spec.input_shape, generator=torch.Generator().manual_seed(2))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = compressed(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)


@pytest.mark.parametrize("hidden", [8, 64])
def test_merge_decision_follows_the_weight_count(hidden: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, hidden, 1), nn.Conv2d(hidden, 16, 1)).eval()
    gm = trace(model, torch.zeros(1, *SHAPE))
    merged = cleanup(gm)[1]["convs_merged"]
    assert merged == int(3 * 16 < hidden * (3 + 16))
