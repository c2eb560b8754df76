"""--quantize int8: onnxruntime static quantization of both exports, checked like float files."""

from __future__ import annotations

import contextlib
import io
import json
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from rankfold.converter.cli import app
from rankfold.converter.config import CompressConfig, QuantizeConfig
from rankfold.converter.quantization import (
    FIRST_CONV,
    LAST_LINEAR,
    calibration_inputs,
    float_layer_choice,
    quantize_export,
    sensitive_reasons,
)
from rankfold.converter.results import CalibrationPick, Report
from rankfold.converter.summary import pick_text
from rankfold.models import (
    DIGITS_SPEC,
    ArrayDataset,
    ModelSpec,
    digits_splits,
    normalize,
    train_digits_cnn,
)
from rankfold.passes import analyze, trace
from rankfold.passes.blocks import FactorizedBlock
from rankfold.passes.core import ConfigError, DataError
from rankfold.runtime import SensitiveSearch, create_session, export_onnx, read_metadata
from rankfold.runtime import quantize as quantize_module
from rankfold.runtime.quantize import (
    AUTO_CALIBRATIONS,
    CALIBRATION_METHODS,
    NEARLY_CONSTANT,
    BatchReader,
    compute_nodes,
    equalize_conv_chains,
    output_error,
    pool_before_relu,
    quantize_int8,
)
from rankfold.runtime.validate import AgreementReport, agreement_error, check_agreement

runner = CliRunner()
# The stated tolerance of these tests: a quantized digits model keeps its float model's top-1 on
# at least this share of the test images, and its logits within this share of their range.
MIN_AGREEMENT = 0.97
MAX_LOGIT_SHARE = 0.15


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """The 8×8 digits CNN trained briefly, its float export, and the splits as .npz."""
    root = tmp_path_factory.mktemp("digits")
    train, test = digits_splits()
    model = train_digits_cnn(epochs=3)
    torch.save(model.state_dict(), root / "digits.pt")
    np.savez(root / "train.npz", x=train.x, y=train.y)
    np.savez(root / "test.npz", x=test.x, y=test.y)
    export_onnx(model, torch.zeros(1, 1, 8, 8), root / "float.onnx")
    return {"root": root, "model": model, "train": train, "test": test}


def _labelled(data: ArrayDataset):
    return ((normalize(data.x[i : i + 128], DIGITS_SPEC), torch.from_numpy(data.y[i : i + 128]))
            for i in range(0, len(data), 128))  # fmt: skip


def test_tiny_model_quantizes_passes_checker_and_agrees(digits, tmp_path):
    out = tmp_path / "int8.onnx"
    result = quantize_int8(
        digits["root"] / "float.onnx",
        out,
        calibration_inputs(digits["train"].subset(256), DIGITS_SPEC),
        float_layers=[],
    )
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    ops = [node.op_type for node in model.graph.node]
    # Every conv and the linear layer run on quantized inputs and weights.
    assert result.quantized_nodes == 4 and result.samples == 256 and not result.float_nodes
    assert ops.count("DequantizeLinear") >= 8 and ops.count("QuantizeLinear") >= 4
    int8 = onnx.TensorProto.INT8
    weights = [i for i in model.graph.initializer if i.data_type == int8 and len(i.dims) > 1]
    assert len(weights) == 4  # conv1..3 and fc, int8
    agreement = check_agreement(
        digits["root"] / "float.onnx", out, _labelled(digits["test"]), min_agreement=MIN_AGREEMENT
    )
    assert agreement.samples == len(digits["test"])
    assert agreement.passed and agreement.top1_agreement >= MIN_AGREEMENT
    assert 0 < agreement.max_logit_diff <= MAX_LOGIT_SHARE * agreement.logit_scale
    assert agreement.float_accuracy > 0.9
    assert abs(agreement.accuracy - agreement.float_accuracy) <= 0.02


def _activation_scales(path: Path) -> dict[str, float]:
    """The per-tensor (activation) scales of a QDQ file, by name."""
    return {
        init.name: float(numpy_helper.to_array(init))
        for init in onnx.load(str(path)).graph.initializer
        if init.name.endswith("_scale") and not init.dims
    }


def test_entropy_calibration_clips_ranges_minmax_keeps_whole(digits, tmp_path):
    scales = {}
    for method in ("minmax", "entropy"):
        out = tmp_path / f"{method}.onnx"
        quantize_int8(
            digits["root"] / "float.onnx",
            out,
            calibration_inputs(digits["train"].subset(256), DIGITS_SPEC),
            method=method,
            float_layers=[],
        )
        scales[method] = _activation_scales(out)
        agreement = check_agreement(
            digits["root"] / "float.onnx", out, _labelled(digits["test"]), min_agreement=0.0
        )
        assert agreement.top1_agreement >= MIN_AGREEMENT, method
    assert scales["entropy"].keys() == scales["minmax"].keys() and len(scales["minmax"]) >= 5
    ratios = [scales["entropy"][name] / scales["minmax"][name] for name in scales["minmax"]]
    # The KL search picks a threshold inside the observed range (onnxruntime's defaults through
    # quantize_static left it the range itself: every ratio 1).
    assert max(ratios) <= 1 + 1e-6 and min(ratios) <= 0.8


def test_auto_calibration_keeps_the_candidate_closest_to_the_float_outputs(digits, tmp_path):
    float_file = digits["root"] / "float.onnx"
    # One stray pixel among ~5·10⁵ input values: min/max ranges stretch to cover it, a 99.999th
    # percentile clips it; the held-out images have no such pixel. The batches end with short
    # ones, which onnxruntime's histogram calibrators cannot stack (BatchReader re-cuts them).
    clean = list(calibration_inputs(digits["train"], DIGITS_SPEC))
    stray = clean[0][:1].clone()
    stray[0, 0, 4, 4] = 60.0
    calibration = [*clean * 6, stray]
    held_out = list(calibration_inputs(digits["test"], DIGITS_SPEC))
    files = {}
    for method in AUTO_CALIBRATIONS:
        files[method] = tmp_path / f"{method}.onnx"
        quantize_int8(float_file, files[method], calibration, method=method, float_layers=[])
    auto = quantize_int8(
        float_file,
        tmp_path / "auto.onnx",
        calibration,
        method="auto",
        float_layers=[],
        held_out=held_out,
        held_out_label="test images",
    )
    pick = auto.calibration_choice
    assert pick.images == "test images" and pick.samples == len(digits["test"])
    errors = {method: output_error(float_file, files[method], held_out) for method in files}
    assert pick.errors == pytest.approx(errors, rel=1e-9)
    assert 0 < errors["percentile"] < 0.5 * errors["minmax"]
    assert auto.method == pick.chosen == "percentile"
    assert (tmp_path / "auto.onnx").read_bytes() == files[auto.method].read_bytes()
    assert auto.samples == 6 * len(digits["train"]) + 1
    # Without held-out images the choice is made on the calibration images.
    fallback = quantize_int8(float_file, tmp_path / "a2.onnx", clean[:2], method="auto")
    assert fallback.calibration_choice.images == "calibration images"
    assert fallback.calibration_choice.samples == len(clean[0]) + len(clean[1])


class Gated(nn.Module):
    """x · gate(x) → conv, the gate 0.5 ± 1e-5 everywhere (an untrained squeeze-excite gate looks
    like this): onnxruntime's histogram of it cannot be split into its bins in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Conv2d(3, 3, 1)
        self.conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.gate.weight.mul_(1e-6)
            self.gate.bias.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * self.gate(x))


def test_a_nearly_constant_activation_fails_percentile_in_one_line_and_auto_keeps_minmax(tmp_path):
    model = Gated().eval()
    float_file = tmp_path / "gate.onnx"
    export_onnx(model, torch.zeros(1, 3, 8, 8), float_file)
    calibration = list(
        torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)).split(8)
    )
    with pytest.raises(DataError) as error:
        quantize_int8(float_file, tmp_path / "p.onnx", calibration, method="percentile")
    message = str(error.value)
    assert message == (
        "percentile calibration of gate.onnx failed: an activation is nearly constant over the "
        "calibration images, too narrow a range for onnxruntime's histogram; calibrate with "
        "--quant-calibration minmax (or auto, which then keeps minmax)"
    )
    assert not (tmp_path / "p.onnx").exists()
    auto = quantize_int8(float_file, tmp_path / "auto.onnx", calibration, method="auto")
    pick = auto.calibration_choice
    assert auto.method == "minmax" and list(pick.errors) == ["minmax"]
    assert auto.samples == 16  # what minmax read, not where the failed percentile stopped
    assert pick.failed == {"percentile": NEARLY_CONSTANT}
    assert 0 <= pick.errors["minmax"] < 1e-3
    text = pick_text(auto.method, CalibrationPick(**asdict(pick)))
    assert text == (
        f"minmax ranges: output error {pick.errors['minmax']:.3%} of the float outputs' energy "
        f"on 16 calibration images; percentile failed: {NEARLY_CONSTANT}"
    )


def test_output_error_is_the_relative_squared_error_of_every_output(tmp_path):
    linear = nn.Linear(6, 4)
    shifted = nn.Linear(6, 4)
    shifted.load_state_dict(linear.state_dict())
    with torch.no_grad():
        shifted.bias += 3.0
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for module, path in zip((linear, shifted), paths):
        export_onnx(module, torch.zeros(1, 6), path)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = linear(x).double()
    expected = float((3.0**2 * y.numel()) / y.square().sum())
    assert output_error(*paths, list(x.split(16))) == pytest.approx(expected, rel=1e-5)
    assert output_error(paths[0], paths[0], list(x.split(16))) == 0.0


def test_calibration_reads_one_bounded_piece_per_pass(digits, tmp_path, monkeypatch):
    reader = BatchReader("input", [torch.zeros(40, 1, 8, 8), torch.zeros(7, 1, 8, 8)])
    assert len(reader) == 4  # pieces of 16, 16, 8 and 7 images
    reader.set_range(1, 3)
    assert [len(reader.get_next()["input"]) for _ in range(2)] == [16, 8]
    assert reader.get_next() is None and reader.samples == 24
    # Every calibrator takes the pieces one pass at a time (onnxruntime's strided calibration),
    # so it holds one piece's activations whatever the number of images.
    passes = []
    set_range = BatchReader.set_range

    def counted(self, start_index: int, end_index: int) -> None:
        passes.append(end_index - start_index)
        set_range(self, start_index, end_index)

    monkeypatch.setattr(BatchReader, "set_range", counted)
    calibration = list(calibration_inputs(digits["train"].subset(100), DIGITS_SPEC))
    for method in CALIBRATION_METHODS:
        passes.clear()
        result = quantize_int8(
            digits["root"] / "float.onnx", tmp_path / f"{method}.onnx", calibration, method=method
        )
        assert result.samples == 100 and passes == [1] * 7, method  # 32, 32, 32, 4 → 16s and 4


def test_an_agreement_error_suggests_the_calibrations_not_tried():
    failed = AgreementReport(0.949, 11.0, 30.0, 1017, 0.97)
    message = str(agreement_error(failed, "/out/original.int8.onnx", ["entropy"]))
    assert message.startswith("original.int8.onnx predicts the float model's class on 94.9% of")
    assert "try --quant-calibration minmax or percentile," in message and "\n" not in message
    after_auto = str(agreement_error(failed, "/out/model.int8.onnx", ["minmax", "percentile"]))
    assert "try --quant-calibration entropy," in after_auto


@pytest.mark.parametrize("reduce_range", [True, False, None])
def test_weights_use_seven_bits_where_the_int8_kernels_saturate(
    digits, tmp_path, monkeypatch, reduce_range
):
    """reduce_range keeps every int8 weight within [-64, 64] (7 bits: u8·s8 pairs cannot
    overflow int16), full range otherwise; unset, this CPU decides (`int8_dot_saturates`, which
    onnxruntime's u8×s8 kernels need on x86 without VNNI)."""
    monkeypatch.setattr(quantize_module, "int8_dot_saturates", lambda: True)
    out = tmp_path / "int8.onnx"
    result = quantize_int8(
        digits["root"] / "float.onnx",
        out,
        calibration_inputs(digits["train"].subset(64), DIGITS_SPEC),
        float_layers=[],
        reduce_range=reduce_range,
    )
    expected = True if reduce_range is None else reduce_range
    assert result.reduce_range is expected
    int8 = onnx.TensorProto.INT8
    weights = [
        numpy_helper.to_array(i)
        for i in onnx.load(str(out)).graph.initializer
        if i.data_type == int8 and len(i.dims) > 1
    ]
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert peak == (64 if expected else 127)


def test_int8_dot_saturates_on_x86_without_vnni(monkeypatch, tmp_path) -> None:
    flags = {"avx2": "flags : fpu sse avx avx2 fma", "vnni": "flags : avx2 avx512f avx512_vnni"}
    monkeypatch.setattr(quantize_module.platform, "machine", lambda: "x86_64")
    for name, line in flags.items():
        cpuinfo = tmp_path / name
        cpuinfo.write_text(line + "\n")
        monkeypatch.setattr(quantize_module, "Path", lambda _path, file=cpuinfo: file)
        assert quantize_module.int8_dot_saturates() is (name == "avx2")
    monkeypatch.setattr(quantize_module.platform, "machine", lambda: "aarch64")
    assert quantize_module.int8_dot_saturates() is False


class Factorized(nn.Module):
    """A conv replaced by a 1×1 → depthwise 3×3 → 1×1 block, as the CP methods build it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = FactorizedBlock(
            OrderedDict(
                pointwise_in=nn.Conv2d(8, 16, 1, bias=False),
                depthwise=nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                pointwise_out=nn.Conv2d(16, 8, 1),
            ),
            source="conv",
            method="cp",
            ranks=(16,),
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_factorized_block_quantizes_and_runs(tmp_path):
    torch.manual_seed(0)
    model = Factorized().eval()
    export_onnx(model, torch.zeros(1, 8, 12, 12), tmp_path / "block.onnx")
    inputs = torch.randn(64, 8, 12, 12)
    result = quantize_int8(
        tmp_path / "block.onnx", tmp_path / "block.int8.onnx", inputs.split(16), float_layers=["fc"]
    )
    # The three stages are int8, found by the block's layer name; fc stays float.
    assert result.quantized_nodes == 3 and set(result.float_nodes.values()) == {"fc"}
    graph = onnx.load(str(tmp_path / "block.int8.onnx")).graph
    groups = [
        attr.i
        for node in graph.node
        if node.op_type == "Conv"
        for attr in node.attribute
        if attr.name == "group"
    ]
    assert 16 in groups  # the depthwise stage survived as a grouped conv
    session = create_session(tmp_path / "block.int8.onnx")
    (logits,) = session.run(None, {"input": inputs[:8].numpy()})
    expected = model(inputs[:8]).detach().numpy()
    assert logits.shape == (8, 4)
    assert np.abs(logits - expected).max() <= 0.1 * np.abs(expected).max()

    # Kept float for its input (as `auto` keeps a first conv), the block keeps the two stages
    # that see that input float; its last stage reads the block's own activations and is int8.
    stages = [node.name for node, _ in compute_nodes(onnx.load(str(tmp_path / "block.onnx")))]
    out = tmp_path / "input_stages.int8.onnx"
    result = quantize_int8(
        tmp_path / "block.onnx",
        out,
        inputs.split(16),
        float_layers=["conv", "fc"],
        input_stages_only=["conv"],
    )
    assert set(result.float_nodes) == {stages[0], stages[1], stages[3]}
    assert result.quantized_nodes == 1
    graph = onnx.load(str(out)).graph
    produced_by = {output: node for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    weight_sources = [produced_by.get(node.input[1]) for node in convs]
    assert [source is not None and source.op_type == "DequantizeLinear" for source in
            weight_sources] == [False, False, True]  # fmt: skip
    (logits,) = create_session(out).run(None, {"input": inputs[:8].numpy()})
    assert np.abs(logits - expected).max() <= 0.1 * np.abs(expected).max()
    # A layer of one node stays whole in float.
    single = quantize_int8(
        tmp_path / "block.onnx",
        tmp_path / "fc_float.int8.onnx",
        inputs.split(16),
        float_layers=["fc"],
        input_stages_only=["fc"],
    )
    assert set(single.float_nodes) == {stages[3]}


def test_auto_keeps_a_factorized_first_conv_float_whole_unless_its_output_is_asked_for(tmp_path):
    torch.manual_seed(0)
    export_onnx(Factorized().eval(), torch.zeros(1, 8, 12, 12), tmp_path / "block.onnx")
    stages = [node.name for node, _ in compute_nodes(onnx.load(str(tmp_path / "block.onnx")))]
    spec = ModelSpec(
        name="block", input_shape=(8, 12, 12), num_classes=4, mean=(0.5,) * 8, std=(0.25,) * 8
    )
    images = ArrayDataset(
        np.random.default_rng(0).integers(0, 256, (64, 8, 12, 12), dtype=np.uint8),
        np.zeros(64, dtype=np.int64),
    )
    float_layers = {"conv": FIRST_CONV, "fc": LAST_LINEAR}  # what `auto` chose
    kept = {}
    for stem_output in (False, True):
        settings = QuantizeConfig(dtype="int8", float_layers=["auto"], stem_output=stem_output)
        out = tmp_path / f"stem_output_{stem_output}.int8.onnx"
        kept[stem_output] = set(
            quantize_export(
                tmp_path / "block.onnx", out, settings, float_layers, images, spec
            ).float_nodes
        )
    assert kept[False] == set(stages)  # every stage of the block, and fc
    assert kept[True] == {stages[0], stages[1], stages[3]}  # the block's last stage is int8


def test_equalization_is_exact_in_float_and_rescues_int8_from_unbalanced_channels(tmp_path):
    torch.manual_seed(0)
    model = Factorized().eval()
    stages = model.conv
    # Channels of the intermediate tensors spread over two decades, compensated by the next
    # stage, as unbalanced CP factors leave them: the same function, a bad per-tensor range.
    spread = torch.logspace(-1, 1, 16)
    with torch.no_grad():
        stages.pointwise_in.weight.mul_(spread[:, None, None, None])
        stages.depthwise.weight.div_(spread[:, None, None, None])
        stages.depthwise.weight.mul_(spread.flip(0)[:, None, None, None])
        stages.pointwise_out.weight.div_(spread.flip(0)[None, :, None, None])
    export_onnx(model, torch.zeros(1, 8, 12, 12), tmp_path / "block.onnx")
    calibration = torch.randn(64, 8, 12, 12).split(16)
    inputs = torch.randn(256, 8, 12, 12)
    expected = model(inputs).detach().numpy()

    graph = onnx.load(str(tmp_path / "block.onnx"))
    assert equalize_conv_chains(graph, calibration) == 2  # pointwise_in → depthwise → pointwise_out
    onnx.save(graph, str(tmp_path / "equalized.onnx"))
    (equalized,) = create_session(tmp_path / "equalized.onnx").run(None, {"input": inputs.numpy()})
    np.testing.assert_allclose(equalized, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # The depthwise stage's input channels now share one range.
    probe = onnx.load(str(tmp_path / "equalized.onnx"))
    first = next(node for node in probe.graph.node if node.op_type == "Conv")
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info(first.output[0], onnx.TensorProto.FLOAT, None)
    )
    onnx.save(probe, str(tmp_path / "probe.onnx"))
    session = create_session(tmp_path / "probe.onnx")
    peaks = np.max(
        [np.abs(session.run([first.output[0]], {"input": b.numpy()})[0]).max(axis=(0, 2, 3))
         for b in calibration], axis=0,
    )  # fmt: skip
    assert peaks.min() >= 0.999 * peaks.max()

    errors = {}
    for equalize in (False, True):
        out = tmp_path / f"int8-{equalize}.onnx"
        result = quantize_int8(
            tmp_path / "block.onnx", out, calibration, float_layers=["fc"], equalize=equalize
        )
        assert result.equalized_edges == (2 if equalize else 0)
        (logits,) = create_session(out).run(None, {"input": inputs.numpy()})
        errors[equalize] = np.abs(logits - expected).max() / np.abs(expected).max()
    assert errors[True] <= 0.05 and errors[True] * 5 <= errors[False]


class PooledStem(nn.Module):
    """conv → ReLU → max-pool → conv, as torchvision ResNets begin."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.stem(x)), 3, stride=2, padding=1)
        return self.fc(torch.relu(self.body(x)).mean((2, 3)))


def _max_pool_reads(path: Path, optimized: Path) -> str:
    """The op type producing the MaxPool's input once onnxruntime has optimized `path`."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(optimized)).graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    (pool,) = [node for node in graph.node if node.op_type == "MaxPool"]
    return producers[pool.input[0]]


def test_a_pool_after_a_float_stem_stays_float_and_exact(tmp_path):
    torch.manual_seed(0)
    model = PooledStem().eval()
    export_onnx(model, torch.zeros(1, 3, 16, 16), tmp_path / "stem.onnx")
    inputs = torch.randn(32, 3, 16, 16)
    expected = model(inputs).detach().numpy()

    # In float the rewrite is exact, and only where the ReLU reads a float layer.
    exported = onnx.load(str(tmp_path / "stem.onnx"))
    stem_nodes = {node.name for node, layer in compute_nodes(exported) if layer == "stem"}
    assert pool_before_relu(exported, set()) == 0
    assert pool_before_relu(exported, stem_nodes) == 1
    onnx.checker.check_model(exported, full_check=True)
    nodes = exported.graph.node
    assert [node.op_type for node in nodes if node.op_type in ("Relu", "MaxPool")] == [
        "MaxPool",
        "Relu",
        "Relu",
    ]
    onnx.save(exported, str(tmp_path / "swapped.onnx"))
    (swapped,) = create_session(tmp_path / "swapped.onnx").run(None, {"input": inputs.numpy()})
    np.testing.assert_array_equal(swapped, create_session(tmp_path / "stem.onnx").run(
        None, {"input": inputs.numpy()})[0])  # fmt: skip
    np.testing.assert_allclose(swapped, expected, rtol=1e-5, atol=1e-6)

    # Quantized with the stem float, onnxruntime pools the float tensor, not a uint8 one (its
    # QDQ propagation moves the quantization above a pool that follows the ReLU).
    out = tmp_path / "stem.int8.onnx"
    quantize_int8(
        tmp_path / "stem.onnx", out, torch.randn(64, 3, 16, 16).split(16), float_layers=["stem"]
    )
    assert _max_pool_reads(out, tmp_path / "optimized.onnx") != "QuantizeLinear"
    as_exported = tmp_path / "as_exported.int8.onnx"
    reader = BatchReader("input", torch.randn(64, 3, 16, 16).split(16))
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(tmp_path / "stem.onnx", as_exported, reader,
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=sorted(stem_nodes))  # fmt: skip
    assert _max_pool_reads(as_exported, tmp_path / "optimized2.onnx") == "QuantizeLinear"
    (logits,) = create_session(out).run(None, {"input": inputs.numpy()})
    assert np.abs(logits - expected).max() <= 0.05 * np.abs(expected).max()


def test_a_model_without_conv_chains_is_left_as_it_is(digits):
    graph = onnx.load(str(digits["root"] / "float.onnx"))
    before = graph.SerializeToString()
    batches = calibration_inputs(digits["train"].subset(32), DIGITS_SPEC)
    assert equalize_conv_chains(graph, list(batches)) == 0
    assert graph.SerializeToString() == before


def test_calibration_reads_images_through_the_common_preprocessing(digits, tmp_path):
    data = digits["train"].subset(100)
    batches = list(calibration_inputs(data, DIGITS_SPEC))
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    expected = normalize(data.x, DIGITS_SPEC)
    assert torch.equal(torch.cat(batches), expected)
    quantize_int8(
        digits["root"] / "float.onnx",
        tmp_path / "int8.onnx",
        calibration_inputs(data, DIGITS_SPEC),
        float_layers=[],
    )
    # minmax over the normalised images sets the input's uint8 scale: (max − min) / 255, with 0
    # inside the range.
    model = onnx.load(str(tmp_path / "int8.onnx"))
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert first_q.input[0] == model.graph.input[0].name
    scale = next(i for i in model.graph.initializer if i.name == first_q.input[1])
    low, high = min(float(expected.min()), 0.0), max(float(expected.max()), 0.0)
    assert float(numpy_helper.to_array(scale)) == pytest.approx((high - low) / 255, rel=1e-5)


def test_missing_or_empty_calibration_is_a_one_line_error(digits, tmp_path):
    with pytest.raises(DataError, match="calibration set is empty"):
        quantize_int8(digits["root"] / "float.onnx", tmp_path / "q.onnx", iter([]))
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(ConfigError, match="--train-data"):
        CompressConfig(model="digits-cnn", quantize=QuantizeConfig(dtype="int8"))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 1, 8, 8), np.uint8), y=np.zeros(0, np.int64))
    for extra in ([], ["--train-data", tmp_path / "empty.npz"]):
        result = runner.invoke(
            app,
            [str(a) for a in ["compress", "digits-cnn", "--rank", "4", "--quantize", "int8",
                              "--out", tmp_path / "o", "--no-latency", *extra]],
        )  # fmt: skip
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert ("--train-data" if not extra else "empty") in lines[0]
    assert not (tmp_path / "o" / "report.json").exists()


def test_float_layer_choice_explains_auto_and_checks_names(digits):
    analysis = analyze(trace(digits["model"], torch.zeros(1, 1, 8, 8)))
    assert float_layer_choice(["auto"], analysis) == {"conv1": FIRST_CONV, "fc": LAST_LINEAR}
    assert list(float_layer_choice(["conv*"], analysis)) == ["conv*"]
    with pytest.raises(ConfigError, match="'cnov2' matches no"):
        float_layer_choice(["cnov2"], analysis)
    assert QuantizeConfig(float_layers=["none"]).float_layers == []


def test_cli_writes_checked_int8_files_and_four_way_latency(digits, tmp_path):
    out = tmp_path / "run"
    root = digits["root"]
    result = runner.invoke(
        app,
        [str(a) for a in [
            "compress", "digits-cnn", "--weights", root / "digits.pt", "--method", "tucker2",
            "--macs-reduction", "1.5", "--no-latency-gate", "--train-data", root / "train.npz",
            "--eval-data", root / "test.npz", "--quantize", "int8", "--quant-samples", "128",
            "--batch", "1,4", "--repeats", "5", "--warmup", "1", "--threads", "1", "--out", out,
        ]],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = Report.load(out / "report.json")
    quant = report.quantization
    assert quant is not None and quant.passed and quant.calibration_samples == 128
    assert quant.float_layers == {"conv1": FIRST_CONV, "fc": LAST_LINEAR}
    # The default also measures sensitivity: both files agree well, so nothing more stays float.
    for file in (quant.original, quant.compressed):
        sensitive = file.sensitive
        assert sensitive.outcome == "reached" and not sensitive.kept and not sensitive.measured
        assert sensitive.images == "held-out training images" and sensitive.samples == 128
        assert sensitive.agreement == sensitive.agreement_before >= MIN_AGREEMENT
    assert "INT8 compressed: sensitive layers: no layer needed" in result.output
    # auto ranges (the default): both candidates measured on the held-out images, the closer kept
    assert quant.calibration == "auto"
    for file in (quant.original, quant.compressed):
        pick = file.calibration_pick
        assert set(pick.errors) == set(AUTO_CALIBRATIONS) and pick.samples == 128
        assert pick.images == "held-out training images"
        assert file.calibration == min(pick.errors, key=pick.errors.__getitem__)
        assert 0 < pick.errors[file.calibration] < 0.05
    assert f"INT8 compressed: {quant.compressed.calibration} ranges: output error" in result.output
    for file, name in (
        (quant.original, "original.int8.onnx"),
        (quant.compressed, "model.int8.onnx"),
    ):
        assert file.path == str(out / name) and (out / name).is_file()
        assert read_metadata(out / "model.onnx").items() <= read_metadata(out / name).items()
        assert set(file.float_nodes.values()) == {"conv1", "fc"}
        assert file.samples == len(digits["test"]) and file.top1_agreement >= MIN_AGREEMENT
        assert abs(file.accuracy - file.float_accuracy) <= 0.03
    # conv1 and fc stay float; conv2 (a Tucker-2 block of three convs after clean-up) and conv3
    # are int8.
    assert quant.original.quantized_nodes == 2 and quant.compressed.quantized_nodes >= 3
    assert quant.compressed.float_accuracy == pytest.approx(report.onnx.accuracy)
    assert [(row.batch, row.threads) for row in quant.latency] == [(1, 1), (4, 1)]
    for row, float_row in zip(quant.latency, report.latency.per_batch):
        assert row.speedup == pytest.approx(row.original_int8_ms / row.compressed_int8_ms)
        assert row.compressed_ms == float_row.compressed_ms  # one run timed all four
    assert "INT8 compressed: top-1 agreement" in result.output
    bench = runner.invoke(
        app,
        [str(a) for a in [
            "bench", out / "model.onnx", "--baseline", out / "original.onnx",
            "--int8", out / "model.int8.onnx", "--baseline-int8", out / "original.int8.onnx",
            "--batch", "2", "--warmup", "1", "--repeats", "3", "--threads", "1",
        ]],
    )  # fmt: skip
    assert bench.exit_code == 0, bench.output
    (row,) = json.loads(bench.output.strip().splitlines()[-1])["providers"]["cpu"]["rows"]
    assert row["int8_speedup"] == pytest.approx(row["original_int8_ms"] / row["compressed_int8_ms"])
    assert row["total_speedup"] == pytest.approx(row["original_ms"] / row["compressed_int8_ms"])
    assert "INT8 speedup" in bench.output  # the second table: the INT8 pair
    half = runner.invoke(
        app,
        [
            "bench",
            str(out / "model.onnx"),
            "--baseline",
            str(out / "original.onnx"),
            "--int8",
            str(out / "model.int8.onnx"),
        ],
    )
    assert half.exit_code == 1 and "go together" in half.output
    # Every layer int8 and a tolerance of 100 % agreement: the run fails, the report is written.
    strict = tmp_path / "strict"
    result = runner.invoke(
        app,
        [str(a) for a in [
            "compress", "digits-cnn", "--weights", root / "digits.pt", "--rank", "8",
            "--train-data", root / "train.npz", "--eval-data", root / "test.npz",
            "--quantize", "int8", "--float-layers", "none", "--quant-calibration", "entropy",
            "--min-agreement", "1.0", "--no-latency", "--out", strict,
        ]],
    )  # fmt: skip
    failed = Report.load(strict / "report.json").quantization
    assert not failed.passed and failed.compressed.top1_agreement < 1.0
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1 and "below the tolerance" in lines[0]
    # The deployed file is named first, and the original too where it fails as well.
    assert lines[0].startswith("error: model.int8.onnx predicts the float model's class on ")
    if failed.original.top1_agreement < 1.0:
        agreement = f"{failed.original.top1_agreement:.1%}"
        assert lines[0].endswith(f"; original.int8.onnx fails too ({agreement} agreement)")
    assert "(tolerance ≥ 100.0%, FAILED)" in " ".join(result.output.split())
    # The published run's summary comes before the error, as for a run that passes.
    assert result.output.index(f"wrote {strict}/") < result.output.index("error:")
    assert "INT8" in result.output.split("error:")[0]
    assert failed.calibration == failed.compressed.calibration == "entropy"
    assert failed.compressed.calibration_pick is None and failed.float_layers == {}
    assert failed.compressed.sensitive is None  # 'none': no search either
    assert (strict / "model.int8.onnx").is_file()


def test_int8_latency_table_times_quantized_probes(digits, tmp_path, monkeypatch):
    from rankfold.runtime import latency_model

    quantized = []

    def spy(*args, **kwargs):
        quantized.append(Path(args[0]).name)
        return quantize_int8(*args, **kwargs)

    monkeypatch.setattr(latency_model, "quantize_int8", spy)
    layer = next(
        layer
        for layer in analyze(trace(digits["model"], torch.zeros(1, 1, 8, 8))).layers
        if layer.name == "conv2"
    )
    tables = {
        precision: latency_model.LatencyTable(
            "cpu", tmp_path, threads=1, repeats=3, min_sample_ms=0.2, precision=precision
        )
        for precision in ("float", "int8")
    }
    # One cache per precision: an INT8 plan never reads float timings.
    assert tables["float"].path != tables["int8"].path
    assert tables["float"].layer_ms(layer, 2) > 0 and not quantized
    assert tables["int8"].block_ms(layer, "tucker2", (16, 16), 2) > 0
    assert quantized and set(quantized) == {"probe.onnx"}
    with pytest.raises(ConfigError, match="precision 'int4'"):
        latency_model.LatencyTable("cpu", tmp_path, precision="int4")


class Outlier(nn.Module):
    """A conv, a factorized block (1×1 → depthwise 3×3 → 1×1, as CP builds it), a conv and a
    linear layer; `outlier` makes the block int8-hostile: conv1's channel 0 is dead (its bias far
    below any response) and the block's first stage reads it with weights 10⁴ × the others. In
    float that column multiplies zeros; in int8 it sets each output channel's weight scale, and
    the stage's real weights round to zero."""

    def __init__(self, outlier: bool, block: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = (
            nn.Conv2d(16, 16, 3, padding=1)
            if not block
            else FactorizedBlock(
                OrderedDict(
                    pointwise_in=nn.Conv2d(16, 16, 1, bias=False),
                    depthwise=nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                    pointwise_out=nn.Conv2d(16, 16, 1),
                ),
                source="conv2",
                method="cp",
                ranks=(16,),
            )
        )
        self.conv3 = nn.Conv2d(16, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        with torch.no_grad():
            for layer in (
                self.conv1,
                self.conv2.pointwise_out if block else self.conv2,
                self.conv3,
            ):
                layer.bias.zero_()  # no constant drowns the input: predictions vary
            if outlier:
                self.conv1.bias[0] = -100  # below any input's response: ReLU gives 0
                first = self.conv2.pointwise_in.weight if block else self.conv2.weight
                first[:, 0] = 1e4 * first.abs().max()

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(self.conv3(x).flatten(1))


def _sensitive_run(tmp_path, outlier: bool, cap: float = 0.75, block: bool = True):
    model = Outlier(outlier, block).eval()
    path = tmp_path / f"outlier-{outlier}.onnx"
    export_onnx(model, torch.zeros(1, 3, 8, 8), path)
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(64, 3, 8, 8, generator=generator).split(32)
    held_out = torch.randn(256, 3, 8, 8, generator=generator).split(64)
    search = SensitiveSearch(min_agreement=0.95, max_float_share=cap, images=held_out)
    out = tmp_path / f"outlier-{outlier}.int8.onnx"
    return quantize_int8(path, out, calibration, float_layers=[], sensitive=search), path


def test_sensitive_search_keeps_exactly_the_badly_quantizing_layer_float(tmp_path):
    result, path = _sensitive_run(tmp_path, outlier=True)
    choice = result.sensitive
    # Every layer int8, the block's real weights rounded away: a quarter of the predictions flip.
    assert choice.agreement_before < 0.8 and choice.samples == 256
    # conv2 loses the most SQNR by far and is the one layer kept; agreement then passes.
    first, *others = choice.layers
    assert first.layer == "conv2" and first.loss_db > 20
    assert all(first.loss_db > row.loss_db + 15 for row in others)
    assert [row.layer for row in choice.kept] == ["conv2"] and choice.outcome == "reached"
    assert choice.agreement >= 0.95 and first.agreement == choice.agreement
    assert set(result.float_nodes.values()) == {"conv2"} and result.quantized_nodes == 3
    # Its share of the MACs: the block's 16·16 + 16·9 + 16·16 per position of 64, of conv1's
    # 3·16·9, conv3's 16·4·9 and fc's 256·10.
    block = 16 * 16 + 16 * 9 + 16 * 16
    assert first.mac_share == pytest.approx(block * 64 / ((432 + block + 576) * 64 + 2560))
    assert choice.float_share == pytest.approx(first.mac_share)
    # The written file is the final one: it agrees as the search measured.
    check = check_agreement(path, result.path, ((x, None) for x in _held_out_again()))
    assert check.top1_agreement == pytest.approx(choice.agreement)
    reasons = sensitive_reasons(choice)
    assert list(reasons) == ["conv2"]
    assert f"loses {first.loss_db:.1f} dB SQNR" in reasons["conv2"]
    assert f"{choice.agreement_before:.1%} → {choice.agreement:.1%}" in reasons["conv2"]


def _held_out_again():
    generator = torch.Generator().manual_seed(1)
    torch.randn(64, 3, 8, 8, generator=generator)
    return torch.randn(256, 3, 8, 8, generator=generator).split(64)


def test_sensitive_search_keeps_nothing_extra_for_a_model_that_quantizes_well(tmp_path):
    result, _ = _sensitive_run(tmp_path, outlier=False)
    choice = result.sensitive
    assert choice.agreement_before >= 0.95 and choice.outcome == "reached"
    assert not choice.layers and not choice.kept and not result.float_nodes
    assert choice.float_share == 0 and result.quantized_nodes == 6  # the block has three


def test_sensitive_search_skips_layers_over_the_cap_and_tries_smaller_ones(tmp_path):
    result, _ = _sensitive_run(tmp_path, outlier=True, cap=0.3)  # conv2 holds 40 %
    choice = result.sensitive
    first, *others = choice.layers
    assert first.layer == "conv2" and not first.kept_float  # over the cap: passed over
    # The less sensitive layers that fit are tried in turn; none is conv2, so the target is
    # missed, within the cap.
    assert choice.kept and all(row.mac_share <= 0.3 for row in choice.kept)
    assert choice.float_share <= 0.3 and "conv2" not in result.float_nodes.values()
    assert choice.outcome == "cap" and choice.agreement < 0.95


def test_sensitive_search_skips_a_single_conv_onnxruntime_would_requantize(tmp_path):
    # The outlier in a plain conv between int8 layers: left float in the file, onnxruntime's
    # WeightBiasQuantization gives it per-tensor int8 weights when it loads the file, so keeping
    # it float cannot help, and the search says so instead of spending the cap on it.
    result, _ = _sensitive_run(tmp_path, outlier=True, cap=1.0, block=False)
    choice = result.sensitive
    first = choice.layers[0]
    assert first.layer == "conv2" and first.loss_db > 20
    assert first.requantized_by_runtime and not first.kept_float
    assert "conv2" not in result.float_nodes.values()
    assert choice.agreement < 0.95 and choice.outcome == "exhausted"


def test_summary_warns_when_int8_is_not_faster_than_float():
    from types import SimpleNamespace

    from rankfold.converter.results import Quantization
    from rankfold.converter.summary import quantization_lines

    file = {
        "path": "model.int8.onnx",
        "opset": 17,
        "calibration": "minmax",
        "quantized_nodes": 3,
        "float_nodes": {},
        "top1_agreement": 1.0,
        "max_logit_diff": 0.1,
        "logit_scale": 5.0,
        "samples": 64,
        "passed": True,
    }

    def row(batch: int, compressed_ms: float, compressed_int8_ms: float) -> dict:
        return {
            "batch": batch,
            "threads": 1,
            "original_ms": 10.0,
            "original_int8_ms": 10.0,
            "compressed_ms": compressed_ms,
            "compressed_int8_ms": compressed_int8_ms,
            "speedup": 10.0 / compressed_int8_ms,
            "speedup_low": None,
            "speedup_high": None,
            "verdict": "faster",
            "total_speedup": 10.0 / compressed_int8_ms,
        }

    def warnings(rows: list[dict]) -> list[str]:
        quant = Quantization.model_validate(
            {
                "dtype": "int8",
                "calibration": "minmax",
                "calibration_samples": 64,
                "float_layers": {},
                "min_agreement": 0.97,
                "agreement_data": "evaluation",
                "original": file,
                "compressed": file,
                "latency": rows,
                "passed": True,
            }
        )
        lines = quantization_lines(SimpleNamespace(quantization=quant))
        return [line for line in lines if line.startswith("WARNING")]

    assert warnings([row(1, 4.0, 2.5), row(8, 30.0, 20.0)]) == []
    (warning,) = warnings([row(1, 3.4, 3.8), row(8, 30.0, 20.0)])
    assert "not faster than model.onnx on this machine at batch 1 " in warning
    assert "deploy the float file here" in warning
