"""Compare an exported ONNX model with its PyTorch source: output parity and top-1 accuracy."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from rankfold.passes.core import ConfigError, DataError, ValidationError
from rankfold.runtime.export import eval_mode
from rankfold.runtime.outputs import named_outputs
from rankfold.runtime.session import create_session, single_input_name

# Guards the relative difference against all-zero reference outputs.
_TINY = float(np.finfo(np.float32).tiny)


@dataclass
class OutputParity:
    """One output tensor's largest difference between onnxruntime and PyTorch."""

    name: str
    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff / scale
    scale: float  # the largest |PyTorch output| of this tensor
    passed: bool  # max_abs_diff <= atol + rtol × scale

    def to_dict(self) -> dict[str, float | str | bool | None]:
        return _finite_dict(self)


@dataclass
class ParityReport:
    """Largest output differences between onnxruntime and PyTorch over `n_samples` inputs; the
    top-level figures are the worst output's, `outputs` has each one (in the model's order)."""

    max_abs_diff: float
    max_rel_diff: float
    atol: float
    n_samples: int
    passed: bool  # every output passed
    rtol: float = 0.0
    outputs: list[OutputParity] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """Plain dict; non-finite diffs (NaN/inf outputs) become None, as strict JSON has no inf."""
        summary = {key: value for key, value in _finite_dict(self).items() if key != "outputs"}
        return {**summary, "outputs": [output.to_dict() for output in self.outputs]}


def _finite_dict(report: object) -> dict:
    return {
        key: (None if isinstance(value, float) and not math.isfinite(value) else value)
        for key, value in asdict(report).items()
    }


def check_parity(
    module: nn.Module,
    onnx_path: str | Path,
    inputs: torch.Tensor,
    provider: str = "cpu",
    atol: float = 1e-4,
    batch_size: int = 64,
    rtol: float = 0.0,
) -> ParityReport:
    """Run `inputs` through both models and report the differences, per output tensor.

    Never raises on a mismatch: the caller decides, e.g. with `parity_error`.
    Each output's max_rel_diff = max|a - b| / max|a| with a the PyTorch output, and it passes
    when max|a - b| <= atol + rtol·max|a|: float32 rounding grows with the outputs' scale, so a
    model whose logits reach 1e4 cannot match to an absolute 1e-4, and a segmentation model's
    auxiliary head is judged on its own scale, not its main head's.
    """
    if inputs.dim() < 1 or len(inputs) == 0:
        raise DataError("no inputs to compare ONNX and PyTorch on; pass at least one sample")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}; pass a positive batch size")
    session = create_session(onnx_path, provider)
    name = single_input_name(session, onnx_path)
    onnx_names = [output.name for output in session.get_outputs()]
    device = _device_of(module)
    max_abs = dict.fromkeys(onnx_names, 0.0)
    max_ref = dict.fromkeys(onnx_names, 0.0)
    finite = dict.fromkeys(onnx_names, True)
    with eval_mode(module), torch.no_grad():
        for chunk in inputs.float().split(batch_size):
            expected = named_outputs(module(chunk.to(device)))
            if [key for key, _ in expected] != onnx_names:
                raise ValidationError(
                    f"ONNX outputs ({', '.join(onnx_names)}) differ from PyTorch's "
                    f"({', '.join(key for key, _ in expected)}); {onnx_path} was not exported "
                    "from this model, re-export it"
                )
            actual = session.run(None, {name: chunk.cpu().numpy()})
            for (key, reference), got in zip(expected, actual):
                reference = reference.detach().float().cpu().numpy()
                if got.shape != reference.shape:
                    raise ValidationError(
                        f"ONNX output '{key}' has shape {tuple(got.shape)}, PyTorch "
                        f"{tuple(reference.shape)}; {onnx_path} was not exported from this "
                        "model, re-export it"
                    )
                if not (np.isfinite(reference).all() and np.isfinite(got).all()):
                    finite[key] = False
                    continue
                max_abs[key] = max(max_abs[key], float(np.max(np.abs(got - reference))))
                max_ref[key] = max(max_ref[key], float(np.max(np.abs(reference))))
    outputs = []
    for key in onnx_names:
        diff = max_abs[key] if finite[key] else math.inf
        outputs.append(
            OutputParity(
                name=key,
                max_abs_diff=diff,
                max_rel_diff=diff / max(max_ref[key], _TINY),
                scale=max_ref[key],
                passed=finite[key] and diff <= atol + rtol * max_ref[key],
            )
        )
    return ParityReport(
        max_abs_diff=max(output.max_abs_diff for output in outputs),
        max_rel_diff=max(output.max_rel_diff for output in outputs),
        atol=atol,
        n_samples=len(inputs),
        passed=all(output.passed for output in outputs),
        rtol=rtol,
        outputs=outputs,
    )


def parity_error(report: ParityReport) -> ValidationError:
    """The one-line error for a failed parity check, naming the failing outputs when the model
    has several."""
    if report.passed:
        raise ValueError("parity_error needs a failed ParityReport; this one passed")
    failed = [output for output in report.outputs if not output.passed]
    which = ""
    if len(report.outputs) > 1:
        which = f" (output{'s' if len(failed) > 1 else ''} {', '.join(o.name for o in failed)})"
    if not math.isfinite(report.max_abs_diff):
        return ValidationError(
            f"ONNX or PyTorch output{which} has NaN/inf on {report.n_samples} inputs; check the "
            "weights and inputs are finite and re-export the model"
        )
    worst = max(
        failed, key=lambda output: output.max_abs_diff / (report.atol + report.rtol * output.scale)
    )
    return ValidationError(
        f"ONNX output{which} differs from PyTorch: max abs diff {worst.max_abs_diff:.1e} > "
        f"tolerance {_short(report.atol)} + {_short(report.rtol)} × output scale on "
        f"{report.n_samples} inputs (max rel diff {worst.max_rel_diff:.1e}); "
        "a rel diff near 1e-6 is float32 rounding (raise --rtol), a larger one means an op was "
        "exported wrongly (re-export with another opset or report the model)"
    )


class OnnxModule(nn.Module):
    """An ONNX file behind nn.Module's call, returning what `reference_output` (one PyTorch
    forward's output) is shaped as: a tensor, or the same tuple, list or dict, on the CPU. So
    a task metric written for the PyTorch model scores the deployed file unchanged."""

    def __init__(self, path: str | Path, reference_output: object, provider: str = "cpu") -> None:
        super().__init__()
        self.session = create_session(path, provider)
        self.input_name = single_input_name(self.session, path)
        names = [name for name, _ in named_outputs(reference_output)]
        onnx_names = [output.name for output in self.session.get_outputs()]
        if names != onnx_names:
            raise ValidationError(
                f"{path} returns ({', '.join(onnx_names)}), the model ({', '.join(names)}); "
                "it was not exported from this model, re-export it"
            )
        self.structure = pytree.tree_structure(reference_output)

    def forward(self, x: torch.Tensor) -> object:
        outputs = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})
        return pytree.tree_unflatten([torch.from_numpy(o) for o in outputs], self.structure)


def onnx_accuracy(
    onnx_path: str | Path,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    provider: str = "cpu",
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of the ONNX model on labelled batches."""
    session = create_session(onnx_path, provider)
    name = single_input_name(session, onnx_path)
    outputs = session.get_outputs()
    if len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise ValidationError(
            f"top-1 needs one N×classes logits output, but {onnx_path} returns "
            f"{', '.join(f'{o.name} {o.shape}' for o in outputs)}; score it with a task metric "
            "of your own (the Python API's metric=)"
        )
    correct = 0
    total = 0
    for x, y in batches:
        logits = session.run(None, {name: x.float().cpu().numpy()})[0]
        correct += int((logits.argmax(axis=1) == y.cpu().numpy()).sum())
        total += len(y)
    return _fraction(correct, total)


def torch_accuracy(
    module: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of `module` in eval mode on labelled batches."""
    device = _device_of(module)
    correct = 0
    total = 0
    with eval_mode(module), torch.no_grad():
        for x, y in batches:
            predictions = _logits(module(x.float().to(device))).argmax(axis=1)
            correct += int((predictions == y.cpu().numpy()).sum())
            total += len(y)
    return _fraction(correct, total)


def _logits(output: object) -> np.ndarray:
    if not isinstance(output, torch.Tensor):
        raise ValidationError(
            f"top-1 accuracy needs one logits tensor, but the model's forward returns "
            f"{type(output).__name__}; score it with a task metric of your own (the Python "
            "API's metric=)"
        )
    return output.detach().float().cpu().numpy()


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _short(value: float) -> str:
    """1e-04 rather than 1.0e-04, but 2.5e-04 kept whole."""
    return f"{value:.1e}".replace(".0e", "e")


def _fraction(correct: int, total: int) -> float:
    if total == 0:
        raise DataError("no labelled samples to score; the data set is empty")
    return correct / total


@dataclass
class AgreementReport:
    """A quantized model against the float model it came from, on the same inputs."""

    top1_agreement: float  # share of inputs where both models predict the same class
    max_logit_diff: float  # largest |quantized − float| logit
    logit_scale: float  # largest |float| logit, for reading max_logit_diff
    samples: int
    min_agreement: float  # the stated tolerance: the check passes at or above it
    accuracy: float | None = None  # the quantized model's top-1, when the inputs had labels
    float_accuracy: float | None = None

    @property
    def passed(self) -> bool:
        return self.top1_agreement >= self.min_agreement


def check_agreement(
    float_path: str | Path,
    quantized_path: str | Path,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    provider: str = "cpu",
    min_agreement: float = 0.97,
) -> AgreementReport:
    """Run both ONNX files on the same (inputs, labels-or-None) batches; never raises on a
    disagreement (the caller decides, e.g. with `agreement_error`)."""
    sessions = [create_session(path, provider) for path in (float_path, quantized_path)]
    names = [
        single_input_name(session, path)
        for session, path in zip(sessions, (float_path, quantized_path))
    ]
    same = total = 0
    correct = [0, 0]
    labelled = True
    max_diff = scale = 0.0
    for x, y in batches:
        feed = x.float().cpu().numpy()
        reference, quantized = (
            session.run(None, {name: feed})[0] for session, name in zip(sessions, names)
        )
        predictions = reference.argmax(axis=1), quantized.argmax(axis=1)
        same += int((predictions[0] == predictions[1]).sum())
        total += len(feed)
        max_diff = max(max_diff, float(np.max(np.abs(quantized - reference))))
        scale = max(scale, float(np.max(np.abs(reference))))
        if y is None:
            labelled = False
        else:
            for index, predicted in enumerate(predictions):
                correct[index] += int((predicted == y.cpu().numpy()).sum())
    agreement = _fraction(same, total)
    return AgreementReport(
        top1_agreement=agreement,
        max_logit_diff=max_diff,
        logit_scale=scale,
        samples=total,
        min_agreement=min_agreement,
        accuracy=correct[1] / total if labelled else None,
        float_accuracy=correct[0] / total if labelled else None,
    )


def agreement_error(
    report: AgreementReport, path: str | Path, tried: Collection[str] = ("minmax",)
) -> ValidationError:
    """The one-line error for a quantized model that disagrees with its float model, whose
    calibration tried the methods `tried` (the hint names the others)."""
    if report.passed:
        raise ValueError("agreement_error needs a failed AgreementReport; this one passed")
    from rankfold.runtime.quantize import (
        CALIBRATION_METHODS,
    )  # quantize imports onnxruntime's tools

    others = " or ".join(method for method in CALIBRATION_METHODS if method not in tried)
    return ValidationError(
        f"{Path(path).name} predicts the float model's class on {report.top1_agreement:.1%} of "
        f"{report.samples} inputs, below the tolerance {report.min_agreement:.1%} (max logit "
        f"diff {report.max_logit_diff:.2g} on logits up to {report.logit_scale:.2g}); keep more "
        "layers in float (--float-layers NAME, or a larger --max-float-share for 'sensitive'), "
        f"calibrate on more images (--quant-samples), try --quant-calibration {others}, or "
        "lower --min-agreement"
    )
