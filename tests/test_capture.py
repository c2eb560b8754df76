"""The capture path: models torch.fx cannot trace compress through forward hooks and torch.export;
a branch on tensor values fails before any planning."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from rankfold.converter import restore
from rankfold.converter.cli import app
from rankfold.passes import analyze, trace
from rankfold.passes.analysis import fixed_kernel_key
from rankfold.passes.attention import split_attention
from rankfold.passes.capture import FX_ONLY_PASSES, analyze_captured, trace_or_capture
from rankfold.passes.cleanup import cleanup
from rankfold.passes.core import TraceError
from rankfold.runtime import export_onnx

runner = CliRunner()

MODELS = '''
import torch
from torch import nn

RANKFOLD_SPEC = {"input_shape": [3, 16, 16], "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3}


class Halve(nn.Module):
    """Subsamples large maps: a Python branch on a shape (torch.export resolves it, fx cannot)."""

    def forward(self, x):
        return x[..., ::2, ::2] if x.shape[-1] > 8 else x


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Net(nn.Module):
    def __init__(self, middle, bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32) if bn else nn.Identity()
        self.middle = middle
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.conv2(self.middle(torch.relu(self.bn(self.conv1(x))))).mean((2, 3)))


def shaped():
    torch.manual_seed(0)
    return Net(Halve())


def gated():
    torch.manual_seed(0)
    return Net(Gate())


def shaped_without_bn():
    torch.manual_seed(0)
    return Net(Halve(), bn=False)
'''

# Per-sample MACs of `shaped` on 3×16×16: conv1 at 16×16, conv2 at 8×8 (after Halve), fc.
CONV1, CONV2, FC = 16 * 16 * 32 * 3 * 9, 8 * 8 * 32 * 32 * 9, 32 * 4


def _compress(tmp_path, factory: str, *extra: str):
    (tmp_path / "m.py").write_text(MODELS)
    args = ["compress", f"{tmp_path / 'm.py'}:{factory}", "--rank", "4", "--no-latency"]
    return runner.invoke(app, [*args, *extra, "--out", str(tmp_path / "out")])


def test_shape_dependent_model_compresses_through_the_capture_path(tmp_path):
    result = _compress(tmp_path, "shaped", "--method", "tucker2", "--skip", "fc")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    capture = report["capture"]
    assert capture["path"] == "forward hooks"
    assert capture["fx_error"].startswith("torch.fx cannot trace module 'middle' (Halve)")
    assert capture["skipped_passes"] == list(FX_ONLY_PASSES)
    assert report["cleanup"] is None  # nothing was folded: no fx graph to clean
    assert "capture path: torch.fx cannot trace module 'middle'" in result.output
    assert "fx-only passes skipped: BatchNorm folding" in result.output
    assert capture["fx_module"] == "middle" and "(--leaf middle keeps them" in result.output

    rows = {row["name"]: row for row in report["layers"]}
    assert {name: row["original_macs"] for name, row in rows.items()} == {
        "conv1": CONV1,
        "conv2": CONV2,
        "fc": FC,
    }
    assert rows["conv1"]["status"] == rows["conv2"]["status"] == "decomposed"
    # Tucker-2 at ranks (4, 3) and (4, 4): 1×1 in, k×k core, 1×1 out at each layer's positions.
    conv1 = 16 * 16 * (3 * 3 + 3 * 4 * 9 + 4 * 32)
    conv2 = 8 * 8 * (32 * 4 + 4 * 4 * 9 + 4 * 32)
    assert report["compressed"]["macs"] == conv1 + conv2 + FC
    assert report["macs_reduction"] == pytest.approx((CONV1 + CONV2 + FC) / (conv1 + conv2 + FC))
    assert report["macs_reduction"] > 8

    assert report["onnx"]["parity_passed"] and report["onnx"]["max_abs_diff"] < 1e-5
    # The restored model (the user's module with blocks swapped in) runs the same as model.onnx,
    # at another batch size and on the shape branch's other side too.
    model = restore(tmp_path / "out")
    assert not isinstance(model, torch.fx.GraphModule)
    assert [type(model.get_submodule(n)).__name__ for n in ("conv1", "conv2", "fc")] == [
        "FactorizedBlock",
        "FactorizedBlock",
        "Linear",
    ]
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, model(x).numpy(), atol=1e-5)


def test_a_model_without_bn_on_the_capture_path_corrects_biases_on_every_image(tmp_path):
    """No graph to walk node by node: bias correction runs the model once per layer, a batch at
    a time, so --refit-memory-mb caps nothing."""
    generator = np.random.default_rng(0)
    x = generator.integers(0, 256, (300, 3, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=generator.integers(0, 4, 300))
    result = _compress(
        tmp_path,
        "shaped_without_bn",
        "--method",
        "tucker2",
        "--skip",
        "fc",
        "--train-data",
        str(tmp_path / "train.npz"),
        "--refit-memory-mb",
        "1",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["capture"]["path"] == "forward hooks"
    recovery = report["recovery"]
    assert recovery["recalibration"] == "bias" and recovery["refit"] is None
    assert (recovery["recalibration_images"], recovery["recalibration_images_left_out"]) == (300, 0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "neither torch.fx nor torch.export can trace module 'middle': a Python branch tests "),
        (("--leaf", "middle"), "ONNX export failed at module 'middle': a Python branch tests "),
    ],
    ids=["capture", "leaf"],
)
def test_a_branch_on_tensor_values_fails_before_planning(tmp_path, monkeypatch, extra, message):
    planned = []
    for name in ("select_ranks", "decompose"):
        monkeypatch.setattr(
            f"rankfold.converter.pipeline.{name}", lambda *a, name=name, **k: planned.append(name)
        )
    result = _compress(tmp_path, "gated", *extra)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and planned == []
    assert len(errors) == 1 and message in errors[0], result.output
    assert "m.py:17: return x if x.sum() > 0 else -x" in errors[0]
    assert "torch.where" in errors[0] and "Traceback" not in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


class _Blur(nn.Module):
    """A depthwise box filter: a functional conv on a buffer, nothing to train."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("kernel", torch.ones(channels, 1, 3, 3) / 9)

    def forward(self, x):
        return F.conv2d(x, self.kernel, padding=1, groups=self.channels)


class _Mixed(nn.Module):
    """Module convs and linears, functional convs (on a parameter and on a buffer), a linear
    called twice and attention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.blur = _Blur(8)
        self.kernel = nn.Parameter(torch.randn(8, 8, 3, 3))
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.conv2d(self.blur(self.conv(x)), self.kernel, padding=1)
        tokens = h.flatten(2).transpose(1, 2)
        tokens, _ = self.attention(tokens, tokens, tokens)
        tokens = self.proj(self.proj(tokens))
        return self.head(tokens @ torch.eye(8)).mean(1)


def test_hooks_find_what_the_fx_graph_finds():
    model, x = _Mixed().eval(), torch.zeros(1, 3, 6, 6)
    # trace splits the attention itself; the capture path's analysis takes the split model.
    traced, captured = analyze(trace(model, x)), analyze_captured(split_attention(model), x)
    assert captured.layers == traced.layers
    assert [layer.calls for layer in captured.layers] == [1, 1, 1, 1, 1, 2, 1]
    # fx counts the split attention's products as one call, the hooks as the two matmuls inside.
    assert sum(captured.functional.values()) == sum(traced.functional.values())
    assert captured.total_macs == traced.total_macs and captured.total_params == traced.total_params
    assert captured.functional["conv2d"] == 6 * 6 * 8 * 8 * 9
    # A conv on a buffer is named by the module holding it, on both paths.
    fixed = fixed_kernel_key("blur.kernel")
    assert fixed == "blur (fixed kernel: a buffer, not a parameter)"
    assert captured.functional[fixed] == traced.functional[fixed] == 6 * 6 * 8 * 9


def test_a_leaf_holding_the_shape_branch_keeps_the_fx_passes(tmp_path):
    """--leaf on the module fx stops in: traced by fx (BatchNorm folds), exported by
    torch.export, which resolves the leaf's shape branch."""
    namespace: dict = {}
    exec(MODELS, namespace)  # the same model the CLI tests load from m.py
    model, x = namespace["shaped"]().eval(), torch.zeros(1, 3, 16, 16)
    assert not trace_or_capture(model, x).traced
    captured = trace_or_capture(model, x, ["middle"])
    assert captured.traced and [layer.name for layer in captured.analysis.layers] == [
        "conv1",
        "conv2",
        "fc",
    ]
    assert captured.analysis.total_macs == CONV1 + CONV2 + FC
    cleaned, counts = cleanup(captured.module)
    assert counts["batchnorms_folded"] == 1
    export_onnx(cleaned, x, tmp_path / "m.onnx")
    batch = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    (onnx_out,) = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": batch.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, model(batch).numpy(), atol=1e-5)


@pytest.mark.parametrize("path", ["torch.fx", "forward hooks"])
def test_a_wrong_input_shape_is_one_line_on_either_path(path):
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8 * 6 * 6, 4)

        def forward(self, x):
            if path == "forward hooks" and x.shape[-1] > 100:  # fx cannot trace this
                x = x[..., ::2, ::2]
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(TraceError) as caught:
        trace_or_capture(Head(), torch.zeros(1, 3, 16, 16))
    message = str(caught.value)
    assert "\n" not in message
    assert "fails on an input of shape (1, 3, 16, 16)" in message and "--input-shape" in message


def test_a_failing_assert_in_a_traced_forward_prints_no_traceback(capfd):
    """torch.fx prints the generated code's traceback when it raises (a ViT's image-size
    assert); the one-line error is all the user sees."""

    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            torch._assert(x.shape[-1] == 32, "Wrong image width!")
            return self.conv(x)

    with pytest.raises(TraceError, match="Wrong image width!"):
        trace_or_capture(Checked(), torch.zeros(1, 3, 16, 16))
    assert "Traceback" not in capfd.readouterr().err


def test_a_leaf_container_s_layers_stay_in_the_model_s_macs():
    """--leaf keeps a module whole; its convs are not decomposed but still cost MACs."""
    from rankfold.models import load_model
    from rankfold.passes import analyze, trace
    from rankfold.passes.analysis import LEAF_NOTE

    model, spec = load_model("resnet20")
    example = torch.zeros(1, *spec.input_shape)
    whole = analyze(trace(model, example))
    leaf = analyze(trace(model, example, ["layer1.0"]))
    assert leaf.total_macs == whole.total_macs == 40_813_184
    kept = {name: macs for name, macs in leaf.functional.items() if name.endswith(LEAF_NOTE)}
    assert kept == {f"layer1.0 {LEAF_NOTE}": 2 * 2_359_296}
    assert "layer1.0.conv1" not in [layer.name for layer in leaf.layers]
