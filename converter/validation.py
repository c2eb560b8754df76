"""`rankfold validate` and `rankfold bench` helpers for ONNX files made earlier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import torch

from rankfold.models import ModelSpec, batches, first_images, load_dataset, load_model
from rankfold.models import normalize as normalize_images
from rankfold.models.data import DEFAULT_CROP_RATIO
from rankfold.passes.core import ConfigError, ExportError
from rankfold.runtime import (
    ParityReport,
    check_onnx,
    check_parity,
    onnx_accuracy,
    read_metadata,
)


def _graph(path: str | Path) -> onnx.GraphProto:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} not found; pass an .onnx file")
    try:
        return onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf raises several types on a bad file
        raise ExportError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None


def onnx_output_shapes(path: str | Path) -> list[tuple[int | None, ...]]:
    """Each output's shape past the batch axis (None where a dimension is not fixed)."""
    return [
        tuple(
            d.dim_value if d.HasField("dim_value") else None
            for d in output.type.tensor_type.shape.dim[1:]
        )
        for output in _graph(path).output
    ]


def onnx_input_shape(path: str | Path) -> tuple[int, int, int]:
    """The (C, H, W) of the model's single input; the batch axis may be dynamic."""
    path = Path(path)
    dims = _graph(path).input[0].type.tensor_type.shape.dim[1:]
    if len(dims) != 3 or any(not d.HasField("dim_value") for d in dims):
        raise ExportError(f"{path} must take one N×C×H×W input with fixed C, H, W")
    return tuple(int(d.dim_value) for d in dims)


def stamped_spec(contract: dict[str, str]) -> ModelSpec | None:
    """The model's input contract from the metadata `compress` stamps into its ONNX files
    (`deployment_metadata`), or None where it is not recorded."""
    if "rankfold.num_classes" not in contract:  # not a classifier's, or not stamped
        return None
    return ModelSpec(
        name=contract.get("rankfold.model", "model"),
        input_shape=tuple(json.loads(contract["rankfold.input_shape"])),
        num_classes=int(contract["rankfold.num_classes"]),
        mean=tuple(json.loads(contract["rankfold.mean"])),
        std=tuple(json.loads(contract["rankfold.std"])),
    )


def validate_export(
    onnx_path: Path,
    eval_data: Path | None,
    model_name: str | None,
    eval_limit: int | None,
    provider: str,
    atol: float,
    rtol: float = 1e-5,
) -> tuple[dict[str, Any], ParityReport | None]:
    """ONNX full check; parity against the PyTorch model saved beside it; accuracy on data.
    Returns the results to print and the parity report (None where nothing was compared)."""
    from rankfold.converter.pipeline import note_class_folders, read_model_file, restore

    result: dict[str, Any] = {"path": str(onnx_path), "opset": check_onnx(onnx_path)}
    model_file = Path(onnx_path).parent / "model.pt"
    payload = read_model_file(model_file) if model_file.is_file() else None
    # model.pt holds the compressed weights, which model.onnx was exported from; any other file
    # beside it (original.onnx) has no PyTorch counterpart here to compare with.
    compare = payload is not None and Path(onnx_path).name == "model.onnx"
    name = model_name or (payload["model"] if payload else None)
    # model.pt records the normalisation the model was compressed with (--mean/--std included).
    mean, std = (payload.get("mean"), payload.get("std")) if compare else (None, None)
    spec = load_model(name, None, onnx_input_shape(onnx_path), mean, std)[1] if name else None
    contract = read_metadata(onnx_path)  # what `compress` stamped: the run's preprocessing
    data = None
    if eval_data is not None:
        spec = spec or stamped_spec(contract)
        if spec is None:
            raise ConfigError(
                "accuracy needs the model's preprocessing, which this ONNX file does not record: "
                "pass --model NAME, or keep model.pt beside the ONNX file"
            )
        ratio = float(contract.get("rankfold.crop_ratio", DEFAULT_CROP_RATIO))
        data = load_dataset(eval_data, spec, limit=eval_limit, crop_ratio=ratio)
        note_class_folders(data, spec, "top-1")
        result["samples"] = len(data)
        result["accuracy"] = onnx_accuracy(onnx_path, batches(data, spec), provider=provider)
    if payload is not None and not compare:
        result["parity"] = (
            f"skipped: {model_file} holds the weights model.onnx was exported from, not "
            f"{Path(onnx_path).name}'s"
        )
    parity = None
    if compare:
        compressed = restore(model_file)
        if data is not None:
            inputs = normalize_images(first_images(data, 64), spec)
        else:
            shape = tuple(payload["input_shape"])
            inputs = torch.randn((16, *shape), generator=torch.Generator().manual_seed(0))
        parity = check_parity(
            compressed, onnx_path, inputs, provider=provider, atol=atol, rtol=rtol
        )
        result.update(
            max_abs_diff=parity.max_abs_diff, atol=atol, rtol=rtol, parity_passed=parity.passed
        )
        if len(parity.outputs) > 1:  # each output judged on its own scale
            result["outputs"] = ", ".join(
                f"{o.name} {o.max_abs_diff:.1e} of {o.scale:.2g} "
                f"({'passed' if o.passed else 'FAILED'})"
                for o in parity.outputs
            )
    return result, parity
