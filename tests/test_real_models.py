"""Real CIFAR-10 ResNet-20 weights through the whole pipeline, each method at 2× fewer MACs."""

from __future__ import annotations

import json

import pytest

from rankfold.converter import CompressConfig, LatencyConfig, run_compress
from rankfold.passes import RankPolicy

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["svd", "cp"])
def test_resnet20_each_method_at_2x(data_dir, tmp_path, method):
    config = CompressConfig(
        model="resnet20",
        weights=data_dir / "weights/resnet20-12fca82f.th",
        eval_data=data_dir / "cifar10/test_lossless_1017.npz",
        ranks=RankPolicy(method=method, macs_reduction=2.0),
        latency=LatencyConfig(enabled=False),
    )
    run_compress(config, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert abs(report["macs_reduction"] / 2 - 1) <= 0.05
    assert report["onnx"]["max_abs_diff"] <= 1e-4
    assert report["original"]["accuracy"] == pytest.approx(0.9164, abs=0.001)
    accuracy = report["compressed"]["accuracy_decomposed"]
    assert 0 < accuracy <= report["original"]["accuracy"]
    assert report["onnx"]["accuracy"] == pytest.approx(accuracy, abs=0.002)
