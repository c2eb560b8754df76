"""rankfold.runtime: ONNX export and checking, sessions, parity, accuracy and latency."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.fx
from torch import nn

from rankfold.passes.core import (
    ConfigError,
    DataError,
    ExportError,
    ProviderError,
    ValidationError,
)
from rankfold.runtime import (
    LatencyResult,
    ParityReport,
    check_onnx,
    check_parity,
    compare_latency,
    create_session,
    export_onnx,
    get_backend,
    latency,
    measure_latency,
    onnx_accuracy,
    parity_error,
    torch_accuracy,
)

SHAPE = (3, 8, 8)
NUM_CLASSES = 4


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class SamePadding(nn.Module):
    """'same' with an even kernel (PyTorch pads asymmetrically), dilation, per-dim tuples, and
    circular padding (a dynamic batch axis once made torch.export refuse it)."""

    def __init__(self) -> None:
        super().__init__()
        self.even = nn.Conv2d(3, 8, 4, padding="same")
        self.dilated = nn.Conv2d(8, 8, 3, padding="same", dilation=2)
        self.tuple = nn.Conv2d(8, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.circular = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.circular(self.tuple(self.dilated(self.even(x)))).mean((2, 3)))


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in forward")


class FixedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(2, 3 * 8 * 8)


def tiny_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN()
    # Non-trivial running statistics, so a BN exported in training mode would show up.
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def factorized_graph() -> torch.fx.GraphModule:
    """A traced TinyCNN whose conv2 became 1×1 → depthwise 3×3 stride 2 → 1×1, as a pass does."""
    graph = torch.fx.symbolic_trace(tiny_cnn())
    graph.conv2 = nn.Sequential(
        nn.Conv2d(8, 4, 1, bias=False),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False),
        nn.Conv2d(4, 16, 1),
    )
    graph.recompile()
    return graph.eval()


def same_padding() -> SamePadding:
    torch.manual_seed(1)
    return SamePadding().eval()


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def torch_run(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyCNN, Path]:
    model = tiny_cnn()
    path = export_onnx(model, torch.randn(2, *SHAPE), tmp_path_factory.mktemp("tiny") / "t.onnx")
    return model, path


def assert_onnx_matches(model: nn.Module, path: Path) -> None:
    assert check_onnx(path) >= 17
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param != ""
    assert len(proto.graph.initializer) > 0  # weights live in the file itself
    for batch in (1, 5):
        x = torch.randn(batch, *SHAPE)
        actual = ort_run(path, x)
        assert actual.shape == (batch, NUM_CLASSES)
        np.testing.assert_allclose(actual, torch_run(model, x), rtol=0, atol=1e-5)


def test_export_tiny_cnn_matches_torch_at_batch_1_and_5(tiny: tuple[TinyCNN, Path]) -> None:
    model, path = tiny
    assert_onnx_matches(model, path)


@pytest.mark.parametrize("build", [factorized_graph, same_padding], ids=["fx-sequential", "same"])
def test_export_factorized_and_padded_convs_match_torch(build, tmp_path: Path) -> None:
    model = build()
    path = export_onnx(model, torch.randn(1, *SHAPE), tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx"
    assert_onnx_matches(model, path)


def test_export_runs_in_eval_mode_and_restores_each_module_mode(tmp_path: Path) -> None:
    model = tiny_cnn()
    model.train()
    model.bn1.eval()
    path = export_onnx(model, torch.randn(2, *SHAPE), tmp_path / "m.onnx")
    assert model.training and model.bn2.training and model.conv1.training
    assert not model.bn1.training
    x = torch.randn(3, *SHAPE)
    # Matches the eval-mode model: BN used its running statistics, not the batch's.
    np.testing.assert_allclose(ort_run(path, x), torch_run(tiny_cnn().eval(), x), atol=1e-5)


def test_failed_export_keeps_existing_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Boom())
    with pytest.raises(ExportError) as caught:
        export_onnx(model, torch.randn(1, *SHAPE), target)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("ONNX export failed at module '1' (Boom): ")
    assert "boom in forward" in message
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_export_rejects_a_model_that_fixes_the_batch_size(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="fixes the batch size to 2") as caught:
        export_onnx(FixedBatch(), torch.randn(2, *SHAPE), tmp_path / "m.onnx")
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_opset_below_18_without_exporting(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opset 17 is below 18"):
        export_onnx(tiny_cnn(), torch.randn(1, *SHAPE), tmp_path / "m.onnx", opset=17)


def test_check_onnx_and_create_session_reject_missing_and_corrupt_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not an onnx model" * 8)
    for path in (missing, corrupt):
        for call in (check_onnx, create_session):
            with pytest.raises(ExportError) as caught:
                call(path)
            assert str(path) in str(caught.value)
            assert "\n" not in str(caught.value)


def test_parity_passes_for_the_exported_model_and_fails_after_perturbing(
    tiny: tuple[TinyCNN, Path],
) -> None:
    model, path = tiny
    x = torch.randn(10, *SHAPE)
    report = check_parity(model, path, x, atol=1e-4, batch_size=4)
    assert report.passed
    assert report.n_samples == 10
    assert 0.0 <= report.max_abs_diff <= 1e-5

    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.conv1.weight.add_(0.05 * torch.randn_like(perturbed.conv1.weight))
    report = check_parity(perturbed, path, x, atol=1e-4, batch_size=4)
    expected = torch_run(perturbed, x)
    max_abs = float(np.abs(ort_run(path, x) - expected).max())
    assert not report.passed
    assert report.max_abs_diff > report.atol == 1e-4
    assert report.max_abs_diff == pytest.approx(max_abs, abs=1e-5)
    assert report.max_rel_diff == pytest.approx(
        report.max_abs_diff / float(np.abs(expected).max()), rel=1e-6
    )
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()

    message = str(parity_error(report))
    assert "\n" not in message
    assert (
        f"max abs diff {report.max_abs_diff:.1e} > tolerance 1e-04 + 0e+00 × output scale"
        " on 10 inputs" in message
    )
    assert f"max rel diff {report.max_rel_diff:.1e}" in message


def test_parity_with_nan_weights_fails_with_json_safe_report(tiny: tuple[TinyCNN, Path]) -> None:
    model, path = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")
    report = check_parity(broken, path, torch.randn(3, *SHAPE))
    assert not report.passed
    assert math.isinf(report.max_abs_diff)
    assert report.to_dict()["max_abs_diff"] is None
    assert "NaN/inf" in str(parity_error(report))


def test_parity_rejects_a_model_with_other_outputs(tiny: tuple[TinyCNN, Path]) -> None:
    _, path = tiny
    other = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, NUM_CLASSES + 1))
    with pytest.raises(
        ValidationError, match=r"output 'logits' has shape \(2, 4\), PyTorch \(2, 5\)"
    ):
        check_parity(other, path, torch.randn(2, *SHAPE))


def test_parity_error_refuses_a_passed_report() -> None:
    with pytest.raises(ValueError, match="passed"):
        parity_error(ParityReport(1e-6, 1e-7, 1e-4, 8, True))


def test_backends_by_name_and_their_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_backend("cpu").providers == ("CPUExecutionProvider",)
    assert get_backend(" CPU ") is get_backend("cpu")
    get_backend("cpu").check()
    with pytest.raises(ProviderError, match="unknown execution provider 'tpu'.*cpu, cuda"):
        get_backend("tpu")

    cuda = get_backend("cuda")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderError) as caught:
        cuda.check()
    message = str(caught.value)
    assert "\n" not in message
    assert "onnxruntime-gpu" in message and "--provider cpu" in message
    assert "available: CPUExecutionProvider" in message

    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    cuda.check()
    assert cuda.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_cuda_session_that_falls_back_to_cpu_is_refused(
    tiny: tuple[TinyCNN, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider; the fallback cannot be provoked")
    _, path = tiny
    # Pretend the provider is listed (as onnxruntime-gpu does without usable CUDA libraries).
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime warns about the unknown provider itself
        with pytest.raises(ProviderError, match="could not start its CUDA execution provider"):
            create_session(path, "cuda")


def test_create_session_sets_threads(tiny: tuple[TinyCNN, Path]) -> None:
    _, path = tiny
    session = create_session(path, "cpu", threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        create_session(path, "cpu", threads=0)


def test_onnx_accuracy_equals_torch_accuracy(tiny: tuple[TinyCNN, Path]) -> None:
    model, path = tiny
    x = torch.randn(29, *SHAPE)
    predictions = torch.from_numpy(torch_run(model, x).argmax(axis=1))
    # The first 11 labels agree with the model, the rest are off by one: accuracy is 11/29.
    labels = torch.where(torch.arange(29) < 11, predictions, (predictions + 1) % NUM_CLASSES).long()
    batches = [(x[i : i + 8], labels[i : i + 8]) for i in range(0, 29, 8)]
    assert torch_accuracy(model, batches) == pytest.approx(11 / 29, abs=1e-12)
    assert onnx_accuracy(path, batches) == pytest.approx(11 / 29, abs=1e-12)
    with pytest.raises(DataError, match="empty"):
        onnx_accuracy(path, [])


def test_measure_and_compare_latency(tiny: tuple[TinyCNN, Path], tmp_path: Path) -> None:
    _, path = tiny
    ticks: list[int] = []
    medians = measure_latency(
        path, SHAPE, [1, 4], warmup=1, repeats=3, threads=1, progress=ticks.append
    )
    assert sorted(medians) == [1, 4]
    assert all(ms > 0 for ms in medians.values())
    assert ticks == [1] * 6

    compressed = export_onnx(factorized_graph(), torch.randn(1, *SHAPE), tmp_path / "c.onnx")
    ticks.clear()
    results = compare_latency(
        path, compressed, SHAPE, [1, 4], warmup=1, repeats=3, threads=1, progress=ticks.append
    )
    assert [r.batch for r in results] == [1, 4]
    assert ticks == [1] * 12
    for result in results:
        assert isinstance(result, LatencyResult)
        assert result.original_ms > 0 and result.compressed_ms > 0
        assert result.speedup == pytest.approx(result.original_ms / result.compressed_ms, rel=1e-12)
        assert result.to_dict()["batch"] == result.batch


def test_compare_latency_alternates_in_blocks(monkeypatch, tmp_path: Path) -> None:
    # Sessions that log their runs: a model is timed in blocks, each after untimed runs, so it
    # never runs right after the other model (whose pool may still spin, weights still cached).
    # Timed runs (between two clock reads) log in upper case, untimed ones in lower case.
    log: list[str] = []

    class Clock:
        now, timing = 0, False

        def perf_counter_ns(self) -> int:
            self.timing = not self.timing
            return self.now

    clock = Clock()

    class LoggedSession:
        def __init__(self, name: str, ms: float) -> None:
            self.name, self.ms = name, ms

        def run(self, outputs, feed) -> None:
            log.append(self.name.upper() if clock.timing else self.name)
            clock.now += int(self.ms * 1e6)

    sessions = {"a.onnx": LoggedSession("a", 2.0), "b.onnx": LoggedSession("b", 0.5)}
    monkeypatch.setattr(latency, "create_session", lambda path, *a: sessions[Path(path).name])
    monkeypatch.setattr(latency, "single_input_name", lambda session, path: "input")
    monkeypatch.setattr(latency, "time", clock)
    (result,) = compare_latency(
        tmp_path / "a.onnx", tmp_path / "b.onnx", SHAPE, [1], warmup=1, repeats=12
    )
    assert result.speedup == pytest.approx(4.0)
    assert (result.speedup_low, result.speedup_high, result.verdict) == (4.0, 4.0, "faster")
    warm, block = latency.SWITCH_WARMUP, latency.SWITCH_BLOCK
    timed_part = "".join(log)[2:]  # after one warm-up run of each
    assert (
        timed_part
        == ("a" * warm + "A" * block + "b" * warm + "B" * block) * 2
        + "a" * warm
        + "A" * 2
        + "b" * warm
        + "B" * 2
    )
    assert timed_part.count("A") == timed_part.count("B") == 12


def test_speedup_interval_from_blocks_and_no_measurable_difference() -> None:
    # Six per-block ratios: the order-statistic interval of their median is the whole range.
    assert latency.median_interval([1.9, 2.1, 2.0, 1.95, 2.05, 2.2]) == (1.9, 2.2)
    assert latency.median_interval([2.0]) is None  # one block cannot bound anything
    # Twelve blocks: the 3rd and 10th order statistics (P(Bin(12, ½) ≤ 2) = 1.9 % ≤ 2.5 %).
    assert latency.median_interval(list(range(12))) == (2, 9)
    # Noise around 1 is no difference, in either direction.
    assert latency.verdict(0.97, 1.04) == latency.NO_DIFFERENCE
    assert latency.verdict(1.02, 1.10) == "faster" and latency.verdict(0.8, 0.95) == "slower"
    assert latency.verdict(None, None) == latency.NO_DIFFERENCE
    assert latency.format_speedup(1.01, 0.97, 1.04) == "no measurable difference (0.97–1.04)"
    assert latency.format_speedup(1.92, 1.85, 2.01) == "1.92× (1.85–2.01)"
    row = LatencyResult(1, 2.0, 1.9, 2.0 / 1.9, 0.98, 1.1, threads=1)
    assert row.to_dict()["verdict"] == latency.NO_DIFFERENCE


def test_a_model_against_itself_times_alike(tiny: tuple[TinyCNN, Path]) -> None:
    _, path = tiny
    (result,) = compare_latency(path, path, SHAPE, [1], warmup=2, repeats=30, threads=1)
    # Not the verdict: a 95 % interval excludes 1 for identical models in about one run in
    # twenty (six blocks: all six ratios on one side of 1 with probability 2/64).
    assert result.speedup_low is not None and result.speedup_low <= result.speedup_high
    assert 0.85 <= result.speedup <= 1 / 0.85 and result.threads == 1


def test_time_runs_warms_up_then_averages_inner_runs_per_sample(monkeypatch) -> None:
    ticks = iter(range(0, 10**9, 10**6))  # each clock read 1 ms after the last
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter_ns=lambda: next(ticks)))
    calls: list[int] = []
    progress: list[int] = []
    samples = latency.time_runs(lambda: calls.append(1), 3, 4, inner=5, progress=progress.append)
    assert len(calls) == 3 + 4 * 5 and progress == [1] * 4
    assert samples == [pytest.approx(1.0 / 5)] * 4  # 1 ms between reads over 5 runs
    assert latency.time_runs(lambda: calls.append(1), 2, 0) == [] and len(calls) == 25


def test_latency_rejects_bad_arguments(tiny: tuple[TinyCNN, Path]) -> None:
    _, path = tiny
    with pytest.raises(ConfigError, match="repeats >= 1"):
        measure_latency(path, SHAPE, [1], repeats=0)
    with pytest.raises(ConfigError, match="batch sizes"):
        compare_latency(path, path, SHAPE, [])
    with pytest.raises(ConfigError, match="C,H,W"):
        measure_latency(path, (8, 8), [1])  # type: ignore[arg-type]
