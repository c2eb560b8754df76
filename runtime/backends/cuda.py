"""onnxruntime's CUDA execution provider (the onnxruntime-gpu package)."""

from __future__ import annotations

from rankfold.runtime.backends.base import Backend


class CudaBackend(Backend):
    name = "cuda"
    label = "CUDA"
    # CPU stays listed after CUDA so ops without a CUDA kernel still run.
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    device = "cuda"
    blocked_layout = False
    install_hint = (
        "install the gpu extra (pip install 'rankfold[gpu]', i.e. onnxruntime-gpu) on a machine "
        "with an NVIDIA GPU, or use --provider cpu"
    )
    # onnxruntime-gpu lists CUDA as available but falls back to CPU, with only a log line, when
    # the CUDA/cuDNN libraries it was built against cannot be loaded.
    start_hint = (
        "the CUDA or cuDNN libraries are missing or of the wrong version for this "
        "onnxruntime-gpu: install the versions it requires, or use --provider cpu"
    )

    def channel_block(self) -> int:
        # Tensor cores (TF32 for float32 under onnxruntime's CUDA defaults, or FP16) run convs as
        # GEMM tiles whose channel counts cuDNN wants in multiples of 8 (4 suffice for TF32);
        # other counts are padded up or take slower kernels, so ranks in between buy no speed.
        return 8

    def machine_id(self) -> dict[str, str | int]:
        """The CPU facts plus the GPU's name (torch is imported only here, when needed)."""
        import torch

        ident = super().machine_id()
        ident["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
        return ident
