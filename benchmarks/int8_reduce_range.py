"""INT8 weights in 8 and in 7 bits (`reduce_range`) on this CPU, through the public runtime API.

    python benchmarks/int8_reduce_range.py

Trains the digits CNN (scikit-learn's 8×8 digits, 3 epochs), exports it, quantizes it twice with
`quantize_int8` (nothing kept float, 256 calibration images), once with full-range weights and
once with 7-bit ones, and prints each file's top-1 agreement and max logit difference against the
float file on the 360 test images, with whether `int8_dot_saturates()` holds for this CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

if __name__ == "__main__":
    # before the heavy imports below: --help answers at once
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()

import torch  # noqa: E402

from rankfold.converter.quantization import calibration_inputs  # noqa: E402
from rankfold.models import DIGITS_SPEC, batches, digits_splits, train_digits_cnn  # noqa: E402
from rankfold.runtime import export_onnx  # noqa: E402
from rankfold.runtime.quantize import int8_dot_saturates, quantize_int8  # noqa: E402
from rankfold.runtime.validate import check_agreement  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    train, test = digits_splits()
    model = train_digits_cnn(epochs=3)
    print(f"this CPU's int8 kernels saturate (x86 without VNNI): {int8_dot_saturates()}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        export_onnx(model, torch.zeros(1, *DIGITS_SPEC.input_shape), root / "float.onnx")
        for reduce_range in (False, True):
            out = root / f"int8-{reduce_range}.onnx"
            calibration = calibration_inputs(train.subset(256), DIGITS_SPEC)
            quantize_int8(
                root / "float.onnx", out, calibration, float_layers=[], reduce_range=reduce_range
            )
            report = check_agreement(root / "float.onnx", out, batches(test, DIGITS_SPEC))
            print(
                f"weights in {7 if reduce_range else 8} bits: top-1 agreement "
                f"{report.top1_agreement:.2%}, max logit diff {report.max_logit_diff:.3f} "
                f"(logits up to {report.logit_scale:.2f}), accuracy {report.accuracy:.2%} "
                f"(float {report.float_accuracy:.2%})"
            )


if __name__ == "__main__":
    main()
