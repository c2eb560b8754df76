"""Models whose forward returns a tuple, list or dict of tensors: named ONNX outputs, parity per
output on its own scale, a task metric in place of top-1, and torchvision's segmentation models
and detection backbones by name."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from rankfold.converter import (
    CompressConfig,
    ExportConfig,
    LatencyConfig,
    TaskMetric,
    compress,
    run_compress,
    validate,
)
from rankfold.converter.results import Report
from rankfold.converter.summary import summary_lines
from rankfold.models import load_model
from rankfold.passes import RankPolicy
from rankfold.passes.core import ConfigError, ExportError, ModelLoadError
from rankfold.runtime import check_parity, export_onnx, parity_error
from rankfold.runtime.outputs import named_outputs, output_layout
from rankfold.runtime.validate import OnnxModule

CLASSES = 3
SIDE = 16


class TinySeg(nn.Module):
    """A segmentation net: per-pixel class scores "out", and an auxiliary head "aux" whose
    outputs are `aux_scale` times larger (as a differently scaled head would be)."""

    def __init__(self, aux_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Conv2d(32, CLASSES, 1)
        self.aux = nn.Conv2d(32, CLASSES, 3, padding=1)
        self.aux_scale = aux_scale

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return OrderedDict(out=self.head(features), aux=self.aux(features) * self.aux_scale)


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor):
        y = self.conv(x)
        return y, [y.mean(dim=(2, 3)), y.amax(dim=(2, 3))]


class WithNumber(Pair):
    def forward(self, x: torch.Tensor):
        return {"features": self.conv(x), "stride": 4}


def _config(**kwargs) -> CompressConfig:
    settings = {
        "model": "tiny-seg",
        "ranks": RankPolicy(method="tucker2", macs_reduction=2.0, min_macs_share=0.0),
        "export": ExportConfig(parity_samples=4),
        "latency": LatencyConfig(enabled=False),
        **kwargs,
    }
    return CompressConfig(**settings)


def test_outputs_are_named_by_dict_key_sequence_position_or_logits():
    x = torch.zeros(1, 3, 4, 4)
    assert [n for n, _ in named_outputs(TinySeg()(x))] == ["out", "aux"]
    assert [n for n, _ in named_outputs(Pair()(x))] == ["output_0", "output_1.0", "output_1.1"]
    assert [n for n, _ in named_outputs(torch.zeros(2, 5))] == ["logits"]
    layout = output_layout(TinySeg()(x))
    assert layout.shapes == ((CLASSES, 4, 4), (CLASSES, 4, 4)) and not layout.is_logits
    assert output_layout(torch.zeros(1, 5)).is_logits
    assert not output_layout(torch.zeros(1, 5, 2, 2)).is_logits  # a map, not logits
    with pytest.raises(ExportError, match="output stride is a int, not a tensor"):
        named_outputs(WithNumber()(x))


def test_export_writes_one_named_output_per_tensor_and_parity_is_per_output(tmp_path: Path):
    torch.manual_seed(0)
    model = TinySeg(aux_scale=1e4).eval()
    path = export_onnx(model, torch.randn(1, 3, SIDE, SIDE), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == ["out", "aux"]
    assert proto.graph.output[1].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    inputs = torch.randn(3, 3, SIDE, SIDE)
    parity = check_parity(model, path, inputs, atol=1e-4, rtol=1e-5)
    out, aux = parity.outputs
    assert (out.name, aux.name) == ("out", "aux")
    assert aux.scale / out.scale == pytest.approx(1e4, rel=0.5)
    for output in parity.outputs:
        assert output.max_rel_diff == pytest.approx(output.max_abs_diff / output.scale)
        assert output.max_rel_diff < 1e-5 and output.passed
    assert parity.passed and parity.max_abs_diff == max(out.max_abs_diff, aux.max_abs_diff)
    # aux's absolute difference would fail an absolute 1e-4 alone: its own scale admits it,
    # and out is not judged on aux's scale.
    assert aux.max_abs_diff > 1e-4 > out.max_abs_diff


def test_parity_fails_on_the_output_that_differs_and_names_it(tmp_path: Path):
    torch.manual_seed(0)
    model = TinySeg().eval()
    path = export_onnx(model, torch.randn(1, 3, SIDE, SIDE), tmp_path / "m.onnx")
    with torch.no_grad():
        model.aux.bias += 1e-2  # only the auxiliary head moves
    parity = check_parity(model, path, torch.randn(2, 3, SIDE, SIDE))
    assert [o.passed for o in parity.outputs] == [True, False] and not parity.passed
    assert parity.outputs[1].max_abs_diff == pytest.approx(1e-2, rel=1e-3)
    message = str(parity_error(parity))
    assert "(output aux)" in message and "1.0e-02" in message


def test_tuple_outputs_export_and_run_back_through_onnx_module(tmp_path: Path):
    torch.manual_seed(0)
    model = Pair().eval()
    x = torch.randn(2, 3, 8, 8)
    path = export_onnx(model, x[:1], tmp_path / "p.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == [
        "output_0",
        "output_1.0",
        "output_1.1",
    ]
    deployed = OnnxModule(path, model(x[:1]))
    got, (mean, peak) = deployed(x)
    want, (want_mean, want_peak) = model(x)
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(peak, want_peak.detach(), atol=1e-5, rtol=1e-5)
    assert mean.shape == (2, 4)


def mean_iou(model: nn.Module, data) -> float:
    """Mean over classes of |prediction ∩ label| / |prediction ∪ label|, over all pixels."""
    intersection = np.zeros(CLASSES)
    union = np.zeros(CLASSES)
    for x, labels in data:
        predicted = model(x)["out"].argmax(dim=1)
        for c in range(CLASSES):
            p, t = predicted == c, labels == c
            intersection[c] += float((p & t).sum())
            union[c] += float((p | t).sum())
    present = union > 0
    return float((intersection[present] / union[present]).mean())


def test_task_metric_is_reported_before_after_and_on_onnx(tmp_path: Path):
    torch.manual_seed(0)
    model = TinySeg().eval()
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, SIDE, SIDE, generator=generator) for _ in range(2)]
    # The original's own predictions as labels: it scores exactly 1, the compressed model less.
    with torch.no_grad():
        data = [(x, model(x)["out"].argmax(dim=1)) for x in images]
    metric = TaskMetric("mIoU", mean_iou, data)
    example = torch.zeros(1, 3, SIDE, SIDE)
    result = compress(model, example, _config(), metric=metric)
    with torch.no_grad():
        expected = mean_iou(result.compressed.eval(), data)
    assert result.accuracy["original"] == 1.0
    assert result.accuracy["decomposed"] == pytest.approx(expected, abs=1e-12)
    assert 0.2 < expected < 1.0  # 2× fewer MACs moves some pixels to other classes
    artifacts = result.save(tmp_path)
    validation = validate(result, artifacts)
    # model.onnx scored by the same function through onnxruntime: the same pixels win.
    assert validation.accuracy == pytest.approx(expected, abs=1e-3)
    report = result.to_report(artifacts, validation)
    assert report.metric == "mIoU" and report.original.accuracy == 1.0
    assert [(o.name, o.shape) for o in report.outputs] == [
        ("out", [CLASSES, SIDE, SIDE]),
        ("aux", [CLASSES, SIDE, SIDE]),
    ]
    assert [o.name for o in report.onnx.outputs] == ["out", "aux"]
    assert all(o.passed and o.scale > 0 for o in report.onnx.outputs)
    lines = summary_lines(report, tmp_path)
    assert any(line.startswith("mIoU: original 1, decomposed 0.") for line in lines), lines
    assert Report.model_validate(report.to_json()).metric == "mIoU"


def test_a_metric_that_returns_no_number_is_one_line():
    data = [(torch.zeros(1, 3, SIDE, SIDE), None)]
    metric = TaskMetric("broken", lambda model, batches: None, data)
    with pytest.raises(Exception, match="task metric 'broken' returned None, not a finite number"):
        compress(TinySeg().eval(), torch.zeros(1, 3, SIDE, SIDE), _config(), metric=metric)


def test_label_options_are_refused_for_non_classifier_outputs(tmp_path: Path):
    eval_file = tmp_path / "eval.npz"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(4, 3, SIDE, SIDE), dtype=np.uint8)
    np.savez(eval_file, x=x, y=np.zeros(4, dtype=np.int64))
    model = TinySeg().eval()
    _, spec = _file_model(tmp_path)
    example = torch.zeros(1, 3, SIDE, SIDE)
    cases = [
        (_config(eval_data=eval_file), "--eval-data scores top-1", "metric=TaskMetric"),
        (_config(train_data=eval_file, finetune={"epochs": 1}), "fine-tuning trains on", ""),
        (
            _config(train_data=eval_file, quantize={"dtype": "int8"}),
            "--quantize checks INT8 by top-1",
            "",
        ),
        (
            _config(ranks=RankPolicy(method="svd", macs_reduction=2, select="eps-search")),
            "--select eps-search scores",
            "",
        ),
    ]
    for config, first, second in cases:
        with pytest.raises(ConfigError) as error:
            compress(model, example, config, spec)
        message = str(error.value)
        assert "\n" not in message and first in message and second in message, message
        assert "returns out N×3×16×16, aux N×3×16×16" in message
    metric = TaskMetric("mIoU", mean_iou, [])
    with pytest.raises(ConfigError, match="pass one of them"):
        compress(model, example, _config(eval_data=eval_file), spec, metric=metric)


def _file_model(tmp_path: Path):
    """TinySeg as a user's model file: a dict output loads, its classes read off "out"."""
    source = Path(__file__).read_text()
    start, end = source.index("class TinySeg"), source.index("class Pair")
    (tmp_path / "seg.py").write_text(
        "from collections import OrderedDict\nimport torch\nfrom torch import nn\n"
        f"CLASSES = {CLASSES}\n{source[start:end]}\n"
        f"RANKFOLD_SPEC = {{'input_shape': [3, {SIDE}, {SIDE}], 'num_classes': {CLASSES}, "
        "'mean': [0.5] * 3, 'std': [0.25] * 3}\n"
    )
    return load_model(f"{tmp_path / 'seg.py'}:TinySeg")


def test_a_user_file_may_return_a_dict_and_the_cli_says_no_metric_applies(tmp_path: Path):
    model, spec = _file_model(tmp_path)
    assert isinstance(model(torch.zeros(1, 3, SIDE, SIDE)), dict) and spec.num_classes == CLASSES
    # Latency runs with two outputs too.
    config = _config(
        model=f"{tmp_path / 'seg.py'}:TinySeg", latency=LatencyConfig(warmup=1, repeats=2)
    )
    result = run_compress(config, tmp_path / "out")
    report = Report.load(tmp_path / "out" / "report.json")
    assert report.metric is None and report.onnx.parity_passed
    assert report.latency is not None and report.latency.compressed_ms > 0
    assert result.accuracy == {}
    lines = summary_lines(report, tmp_path)
    assert "task metric: none applies (the model returns out N×3×16×16, aux N×3×16×16" in (
        "\n".join(lines)
    )


def test_torchvision_task_models_by_name():
    with pytest.raises(ModelLoadError, match=r"detection.fasterrcnn_resnet50_fpn.backbone$"):
        load_model("torchvision:detection.fasterrcnn_resnet50_fpn")
    with pytest.raises(ModelLoadError, match="did you mean 'fcn_resnet50'"):
        load_model("torchvision:segmentation.fcn_resnet5")
    backbone, spec = load_model(
        "torchvision:detection.fasterrcnn_mobilenet_v3_large_320_fpn.backbone"
    )
    assert spec.input_shape == (3, 320, 320) and spec.num_classes == 91
    features = backbone(torch.zeros(1, 3, 64, 64))
    assert list(features) == ["0", "1", "pool"]


def test_a_torchvision_segmentation_model_compresses_with_parity_per_output(tmp_path: Path):
    config = CompressConfig(
        model="torchvision:segmentation.lraspp_mobilenet_v3_large",
        input_shape=(3, 32, 32),
        ranks=RankPolicy(method="svd", macs_reduction=1.5),
        export=ExportConfig(parity_samples=2),
        latency=LatencyConfig(enabled=False),
    )
    run_compress(config, tmp_path)
    report = Report.load(tmp_path / "report.json")
    assert [(o.name, o.shape) for o in report.outputs] == [("out", [21, 32, 32])]
    assert [o.name for o in onnx.load(str(tmp_path / "model.onnx")).graph.output] == ["out"]
    assert report.onnx.outputs[0].max_rel_diff < 1e-4 and report.onnx.parity_passed
    assert report.macs_reduction == pytest.approx(1.5, rel=0.05)
    assert report.metric is None


def test_the_cli_lists_the_model_forms_and_refuses_eval_data_in_one_line(tmp_path: Path):
    from typer.testing import CliRunner

    from rankfold.converter.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0
    assert "torchvision:segmentation.NAME" in listed.output
    assert "torchvision:detection.NAME.backbone" in listed.output
    _file_model(tmp_path)
    eval_file = tmp_path / "eval.npz"
    x = np.zeros((2, 3, SIDE, SIDE), dtype=np.uint8)
    np.savez(eval_file, x=x, y=np.zeros(2, dtype=np.int64))
    refused = runner.invoke(
        app,
        [
            "compress",
            f"{tmp_path / 'seg.py'}:TinySeg",
            "--eval-data",
            str(eval_file),
            "--no-latency",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert refused.exit_code == 1
    message = refused.output.strip()
    assert message.count("\n") == 0 and "--eval-data scores top-1" in message, message
    assert "metric=TaskMetric" in message and not (tmp_path / "out" / "model.onnx").exists()
