"""Export a (factorized) PyTorch model to one self-contained ONNX file, and check that file.

Exporter choice: the torch.export-based exporter (`dynamo=True`), not the legacy TorchScript one.
Measured on torch 2.15 / onnxscript 0.7 / onnxruntime 1.32 (1 CPU thread): the TorchScript exporter
is faster (ResNet-56 in 0.2 s against 3 s), but it writes `padding='same'` convolutions as
`auto_pad=SAME_UPPER`, which onnxruntime refuses to run once the conv is dilated, and it is
deprecated ("will be removed"). The torch.export exporter got every model we tried right
(CIFAR ResNet-20/56, torchvision resnet18 at 224², fx graphs with conv → 1×1/depthwise/k×k blocks,
'same' padding with even kernels and dilation) with parity ≤ 2e-5, in 1-4 s. Its lowest opset is
18: asking for 17 makes it down-convert, which fails on Pad and ReduceMean and silently leaves 18.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import re
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx.checker
import onnx.shape_inference
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from rankfold.passes.core import ExportError, OutputError, atomic_path
from rankfold.runtime.outputs import named_outputs

INPUT_NAME = "input"
MIN_OPSET = 18

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ATEN_OP = re.compile(r"op='([\w.]+)'|torch\.ops\.([\w.]+)")


def export_onnx(
    module: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = MIN_OPSET
) -> Path:
    """Write `module` (run in eval mode) to `path` as ONNX: input "input", one output per
    output tensor ("logits" for a lone tensor, dict keys for a dict: `runtime.outputs`), dynamic
    batch axis 0, weights inside the file. The file appears only if export succeeds."""
    if opset < MIN_OPSET:
        raise ExportError(
            f"opset {opset} is below {MIN_OPSET}, the lowest the torch.export-based ONNX exporter "
            f"writes; use opset {MIN_OPSET} or higher"
        )
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ExportError(
            "ONNX export needs an example input tensor with a batch axis (e.g. shape 1×C×H×W); "
            "pass a tensor of the model's input shape"
        )
    target = Path(path)
    with eval_mode(module):
        names = _output_names(module, example_input)
        program, traced_input = _export_dynamic_batch(module, example_input, opset, names)
    _check_exported_graph(program.model_proto, traced_input, names)
    try:
        with atomic_path(target) as tmp:
            # external_data=False keeps the weights inside the one file (CNNs are far below
            # protobuf's 2 GB limit).
            program.save(tmp, external_data=False)
    except OSError as exc:
        raise OutputError(
            f"cannot write {target} ({exc.strerror or exc}); free disk space or choose a "
            "writable output directory"
        ) from None
    return target


def stamp_metadata(path: str | Path, properties: dict[str, str]) -> None:
    """Set `properties` in the ONNX file's metadata_props (replacing those keys), rewriting the
    file atomically: how a deployer learns the input contract from the file alone."""
    model = onnx.load(str(path))
    kept = [prop for prop in model.metadata_props if prop.key not in properties]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.helper.set_model_props(model, {**{prop.key: prop.value for prop in kept}, **properties})
    try:
        with atomic_path(Path(path)) as tmp:
            onnx.save(model, str(tmp))
    except OSError as exc:
        raise OutputError(
            f"cannot write {path} ({exc.strerror or exc}); free disk space or choose a "
            "writable output directory"
        ) from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ONNX file's metadata_props (without loading its weights)."""
    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def check_onnx(path: str | Path) -> int:
    """Run onnx's full checker (with shape inference) on `path`; return its ai.onnx opset."""
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"ONNX file {file} not found; export the model first")
    try:
        onnx.checker.check_model(str(file), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(
            f"ONNX checker rejected {file}: {_first_line(exc)}; re-export the model "
            "(the file may be truncated or written by another tool)"
        ) from None
    # Loading without weights is enough to read the opset and keeps big files cheap.
    model = onnx.load(str(file), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError(f"ONNX file {file} declares no ai.onnx opset; re-export the model")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag (not just the root's)."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def _output_names(module: nn.Module, example_input: torch.Tensor) -> list[str] | None:
    """The ONNX output names of `module`'s outputs, read off one forward pass; None if that
    pass fails, so the exporter runs it and its error names the failing module."""
    try:
        with torch.no_grad():
            output = module(example_input)
    except Exception:  # any failure in user code: described by the exporter below
        return None
    return [name for name, _ in named_outputs(output)]


def _export_dynamic_batch(
    module: nn.Module, example_input: torch.Tensor, opset: int, output_names: list[str] | None
) -> tuple[torch.onnx.ONNXProgram, torch.Tensor]:
    """The exported program and the input it was traced at.

    torch.export specializes every dimension of size 1 (its 0/1 specialization), so at a batch
    of 1 the declared batch axis either fails ("ConstraintViolationError (batch)": torchvision's
    Swin and ConvNeXt) or comes back fixed to 1 (ViT): a batch-1 example is traced at batch 2.
    A model that runs at batch 1 only is exported at its own example instead, so the error says
    what pins its batch size.
    """
    if example_input.shape[0] != 1:
        return _run_exporter(module, example_input, opset, output_names), example_input
    doubled = example_input.expand(2, *example_input.shape[1:]).clone()
    try:
        return _run_exporter(module, doubled, opset, output_names), doubled
    except ExportError as exc:
        if exc.data_dependent:  # fails at any batch size: do not pay for a second try
            raise
        return _run_exporter(module, example_input, opset, output_names), example_input


def _run_exporter(
    module: nn.Module, example_input: torch.Tensor, opset: int, output_names: list[str] | None
) -> torch.onnx.ONNXProgram:
    # The exporter prints progress, graph dumps and warnings even with verbose=False when a
    # strategy fails; the one-line ExportError below is what the user needs, so silence the rest.
    sink = io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                module,
                (example_input,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                optimize=True,
                verbose=False,
            )
    except torch.onnx.errors.OnnxExporterError as exc:
        raise _describe_failure(exc, module) from None


def _check_exported_graph(
    model: onnx.ModelProto, example_input: torch.Tensor, names: list[str] | None
) -> None:
    """Refuse graphs rankfold cannot use: outputs other than the model's, or a batch size
    baked in."""
    outputs = [out.name for out in model.graph.output]
    if outputs != names:
        raise ExportError(
            f"ONNX export failed at the model output: the graph returns {len(outputs)} tensor(s) "
            f"({', '.join(outputs)}) where forward returns {len(names)} ({', '.join(names)}); "
            "return each output tensor once (not the same tensor under two names)"
        )
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        # torch.export falls back to a fixed shape when the code pins the batch size, without
        # raising; a fixed-batch file would fail later at every other batch size.
        raise ExportError(
            f"ONNX export failed at the batch axis: the model fixes the batch size to "
            f"{example_input.shape[0]} (e.g. x.view({example_input.shape[0]}, -1)); "
            "use x.flatten(1) or x.reshape(x.shape[0], -1) so any batch size works"
        )


def _describe_failure(exc: BaseException, module: nn.Module) -> ExportError:
    """One line: where the export failed (module or aten op), the root cause and what to do."""
    chain = _exception_chain(exc)
    root = chain[-1]
    failing = _failing_module(chain, module)
    line = None
    if failing is not None:
        name, kind, line = failing
        site = f"module '{name}' ({kind})" if name else f"the top-level module ({kind})"
    else:
        site = _failing_op(chain) or "the model's forward"
    reason = f"{type(root).__name__}: {_first_line(root)}"
    if len(reason) > 200:
        reason = reason[:197] + "..."
    data_dependent = any(isinstance(e, GuardOnDataDependentSymNode) for e in chain)
    if type(exc).__name__ == "ConversionError":
        fix = (
            "that op has no ONNX translation; replace it with standard conv/linear/elementwise "
            "ops or try a higher opset"
        )
    elif data_dependent:
        reason = f"a Python branch tests tensor values ({line or reason})"
        fix = (
            "no exported graph can hold that branch; compute both sides and pick with "
            "torch.where (or use torch.cond)"
        )
    else:
        fix = (
            "make forward traceable by torch.export (no Python branches on tensor values, "
            "no exceptions for valid inputs); see https://pytorch.org/docs/stable/export.html"
        )
    return ExportError(
        f"ONNX export failed at {site}: {reason}; {fix}",
        module=None if failing is None else failing[0],
        reason=reason,
        data_dependent=data_dependent,
    )


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _failing_module(chain: list[BaseException], module: nn.Module) -> tuple[str, str, str] | None:
    """(name, type, source line) of the deepest submodule whose method is on a failing
    traceback, named as in the model ("" for the top level); the line is the one it was
    running, as `file:line: code`."""
    names = {id(sub): name for name, sub in module.named_modules()}
    for exc in reversed(chain):
        found: tuple[str, str, str] | None = None
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            owner = frame.f_locals.get("self")
            if id(owner) in names:
                file = frame.f_code.co_filename
                code = linecache.getline(file, lineno).strip()
                line = f"{Path(file).name}:{lineno}: {code}"
                found = (names[id(owner)], type(owner).__name__, line)
        if found is not None:
            return found
    return None


def _failing_op(chain: list[BaseException]) -> str | None:
    for exc in reversed(chain):
        match = _ATEN_OP.search(str(exc))
        if match:
            return f"op {match.group(1) or match.group(2)}"
    return None


def _first_line(exc: BaseException) -> str:
    for line in _ANSI.sub("", str(exc)).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
