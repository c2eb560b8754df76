"""Layer input statistics, and the output metric that makes a decomposition data-aware.

Every factorization fits the weights, minimising ‖W − Ŵ‖. What matters is the layer's output on
real inputs, E‖(W − Ŵ)x‖². With the input second moment Σ = E[x xᵀ] = L Lᵀ,

    E‖(W − Ŵ)x‖² = tr((W − Ŵ) Σ (W − Ŵ)ᵀ) = ‖(W − Ŵ)L‖²_F,

so fitting Ŵ' to W' = W·L in the plain metric and mapping back Ŵ = Ŵ'·L⁻¹ fits W in the output
metric. For a Linear, the truncated SVD of W·L mapped back is the exact minimiser (whitened SVD,
as in SVD-LLM). For a conv, Σ is the moment of the input channels over all positions and the
transform acts on the kernel's input-channel mode, W ×₂ Lᵀ; every kernel offset is weighed by
the same Σ (the correlation between offsets of one patch is left out). The fit of the
transformed kernel is whatever the method does; only its input-channel factor — the block's first
stage, the one layer that reads the S input channels — is mapped back by L⁻ᵀ.

The fitting moment is regularised, Σ + λ·tr(Σ)/S·I (λ = `damping`), so directions the
calibration images never excite still count a little; errors are reported on Σ itself.

Hand-written: no library collects per-layer second moments in a bounded memory or fits a tensor
in a whitened mode metric; the algebra above is all there is to it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from scipy.linalg.blas import dsyrk
from torch import fx, nn

from rankfold.passes.blocks import kernel_of, set_kernel
from rankfold.passes.core import ConfigError, DecompositionError
from rankfold.passes.layout import in_conv_layout

STATISTICS_FORMAT = 1
DEFAULT_DAMPING = 0.01
DEFAULT_MEMORY_BYTES = 512 << 20
CHUNK_CAP_BYTES = 64 << 20  # larger chunks no longer speed up the rank-k updates


@dataclass(frozen=True)
class InputMoment:
    """E[x xᵀ] of one layer's input vectors (conv: channel vectors at every position)."""

    moment: np.ndarray  # S×S, float64
    count: int  # vectors averaged


@dataclass(frozen=True)
class Whitening:
    """The output metric of one layer: Σ (for errors) and L with L Lᵀ = Σ + λ·tr(Σ)/S·I."""

    moment: np.ndarray
    factor: np.ndarray  # lower triangular
    fingerprint: str  # what the cache keys data-aware fits by

    @classmethod
    def from_moment(cls, moment: np.ndarray, damping: float) -> Whitening:
        s = moment.shape[0]
        scale = float(np.trace(moment)) / s
        regularised = moment + damping * (scale if scale > 0 else 1.0) * np.eye(s)
        try:
            factor = np.linalg.cholesky(regularised)
        except np.linalg.LinAlgError:
            raise DecompositionError(
                "the layer's input moment is not positive definite even after damping "
                f"{damping:g}; raise --damping or drop --data-aware"
            ) from None
        h = hashlib.sha256(np.ascontiguousarray(moment).tobytes())
        h.update(f"|{damping!r}|{STATISTICS_FORMAT}".encode())
        return cls(moment, factor, h.hexdigest())

    @property
    def is_scalar(self) -> bool:
        """L = c·I: the output metric is the weight metric, and the weight-only fit is used as
        it is (fits are scale-equivariant, but not bit for bit in floating point)."""
        diagonal = np.diag(self.factor)
        return bool(
            np.all(diagonal == diagonal[0]) and np.count_nonzero(self.factor) == diagonal.size
        )

    def transform(self, kernel: np.ndarray) -> np.ndarray:
        """W ×₂ Lᵀ: the input-channel mode (axis 1) times L."""
        return np.moveaxis(np.tensordot(kernel, self.factor, axes=([1], [0])), -1, 1)

    def restore(self, weight: np.ndarray) -> np.ndarray:
        """A first stage fitted on W·L mapped back: its input-channel mode (axis 1) times L⁻¹."""
        moved = np.moveaxis(weight, 1, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        # X = B·L⁻¹ ⇔ Lᵀ·Xᵀ = Bᵀ: one triangular solve, no inverse.
        solved = scipy.linalg.solve_triangular(self.factor, flat.T, lower=True, trans="T").T
        return np.moveaxis(solved.reshape(moved.shape), -1, 1)

    def output_error(self, kernel: np.ndarray, approx: np.ndarray) -> float:
        """√(E‖(W − Ŵ)x‖² / E‖Wx‖²) on the calibration moment (conv: summed over offsets)."""

        def energy(w: np.ndarray) -> float:
            rows = np.moveaxis(w, 1, -1).reshape(-1, w.shape[1])
            return float(np.sum((rows @ self.moment) * rows))

        return float(np.sqrt(max(energy(kernel - approx), 0.0) / max(energy(kernel), 1e-300)))


@dataclass
class LayerStatistics:
    """Per-layer input moments from `images` calibration images."""

    moments: dict[str, InputMoment]
    images: int
    damping: float = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        if not self.damping >= 0:
            raise ConfigError(f"damping must be ≥ 0, got {self.damping}; use e.g. 0.01")
        self._whitening: dict[str, Whitening] = {}

    def whitening(self, name: str) -> Whitening | None:
        """The layer's metric (None: no statistics for it, the fit stays weight-only)."""
        if name not in self.moments:
            return None
        if name not in self._whitening:
            moment = self.moments[name].moment
            self._whitening[name] = Whitening.from_moment(moment, self.damping)
        return self._whitening[name]

    def to_payload(self) -> dict:
        return {
            "format": STATISTICS_FORMAT,
            "images": self.images,
            "moments": {k: torch.from_numpy(v.moment) for k, v in self.moments.items()},
            "counts": {k: v.count for k, v in self.moments.items()},
        }

    @classmethod
    def from_payload(cls, payload: dict, damping: float) -> LayerStatistics:
        if payload.get("format") != STATISTICS_FORMAT:
            raise ValueError("statistics of another format")
        moments = {
            name: InputMoment(tensor.numpy(), int(payload["counts"][name]))
            for name, tensor in payload["moments"].items()
        }
        return cls(moments, int(payload["images"]), damping)


class _Accumulator:
    """Σ x xᵀ over a layer's input vectors, in float64, a bounded chunk of columns at a time."""

    def __init__(self, features: int, buffer: np.ndarray, conv: bool) -> None:
        self.conv = conv
        self.sum = np.zeros((features, features), order="F")  # dsyrk updates it in place
        self.count = 0
        self.buffer = buffer  # float64 scratch shared by all layers (hooks run one at a time)
        self.columns = max(1, buffer.size // features)

    def add(self, x: torch.Tensor) -> None:
        features = self.sum.shape[0]
        x = x.detach()
        if self.conv:  # N×C×H×W: vectors are the channels at each position
            array = x.cpu().reshape(x.shape[0], features, -1).numpy()
        else:  # …×F: vectors are the rows
            array = x.cpu().reshape(-1, features, 1).numpy()
        n, _, positions = array.shape
        per_sample = min(positions, self.columns)
        samples = max(1, self.columns // positions)
        for a in range(0, n, samples):
            for p in range(0, positions, per_sample):
                # Contiguous float64 copy (samples × S × positions); each sample's S×positions
                # block, read as positions×S in Fortran order, is one rank-k update.
                part = array[a : a + samples, :, p : p + per_sample]
                chunk = self.buffer[: part.size].reshape(part.shape)
                np.copyto(chunk, part)
                if positions == 1:  # rows of a Linear's input: the chunk, transposed, is S×rows
                    dsyrk(1.0, chunk[:, :, 0].T, beta=1.0, c=self.sum, lower=0, overwrite_c=1)
                    continue
                for vectors in chunk:
                    dsyrk(1.0, vectors.T, beta=1.0, c=self.sum, trans=1, lower=0, overwrite_c=1)
        self.count += n * positions

    def result(self) -> InputMoment:
        """The moment, made in place (dsyrk filled the upper triangle): no S×S copies."""
        for row in range(1, self.sum.shape[0]):
            self.sum[row, :row] = self.sum[:row, row]
        count = max(self.count, 1)
        self.sum /= count
        return InputMoment(self.sum, self.count)


def statistics_layers(gm: fx.GraphModule, names: Iterable[str]) -> dict[str, tuple[int, bool]]:
    """The layers among `names` whose inputs can be measured: (input features, is a conv)."""
    found = {}
    for name in names:
        module = gm.get_submodule(name)
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.ConvTranspose2d) and module.groups == 1:
            found[name] = (module.in_channels, True)
        elif isinstance(module, nn.Linear):
            found[name] = (module.in_features, False)
    return found


def collect_statistics(
    gm: fx.GraphModule,
    names: Iterable[str],
    inputs: Iterable[torch.Tensor],
    images: int,
    damping: float = DEFAULT_DAMPING,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    progress: Callable[[], None] | None = None,
) -> LayerStatistics:
    """One pass of `inputs` (normalised batches) through `gm`, hooking each named layer.

    Memory the pass holds besides the model's own activations: every layer's S×S float64
    accumulator plus one float64 chunk of input columns (what is left of `memory_bytes`, at
    most `CHUNK_CAP_BYTES`); refused before any forward pass when the accumulators alone do not
    fit. `progress` is called once per batch.
    """
    layers = statistics_layers(gm, names)
    held = sum(8 * s * s for s, _ in layers.values())
    widest = max((s for s, _ in layers.values()), default=1)
    # A sixteenth of what is left is kept for small temporaries.
    chunk = min((memory_bytes - held) * 15 // 16, CHUNK_CAP_BYTES)
    if chunk < 8 * widest:
        raise ConfigError(
            f"layer statistics need {held / 2**20:.1f} MiB for {len(layers)} layers' moments, "
            f"over the budget of {memory_bytes / 2**20:.1f} MiB; raise --stats-memory-mb or "
            "drop --data-aware"
        )
    buffer = np.empty(chunk // 8)
    accumulators = {name: _Accumulator(s, buffer, conv) for name, (s, conv) in layers.items()}
    handles = [
        gm.get_submodule(name).register_forward_pre_hook(
            lambda _module, args, acc=acc: acc.add(args[0])
        )
        for name, acc in accumulators.items()
    ]
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad(), in_conv_layout((gm,)):
            for batch in inputs:
                gm(batch)
                if progress is not None:
                    progress()
    finally:
        for handle in handles:
            handle.remove()
        gm.train(was_training)
    return LayerStatistics(
        {name: acc.result() for name, acc in accumulators.items()}, images, damping
    )


def statistics_key(gm: nn.Module, names: Iterable[str], data_fingerprint: str) -> str:
    """What the statistics depend on: the model's tensors, the layers and the images."""
    h = hashlib.sha256()
    for key, tensor in sorted(gm.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        h.update(f"{key}{tuple(array.shape)}{array.dtype}".encode())
        h.update(array.numpy().tobytes())
    h.update(f"|{sorted(names)}|{data_fingerprint}|{STATISTICS_FORMAT}".encode())
    return h.hexdigest()


def whitened_fill(method, block: nn.Module, original: nn.Module, whitening: Whitening, seed: int):
    """`method.fill` in the output metric: fit W ×₂ Lᵀ, then map the first stage back by L⁻ᵀ.

    The method's own factorization runs unchanged on the transformed kernel, so every method
    whose block reads the input channels in its first stage gets a data-aware fit.
    """
    if whitening.is_scalar:
        return method.fill(block, original, seed)
    first = block[0]
    groups = getattr(first, "groups", 1)
    if not isinstance(first, nn.Conv1d | nn.Conv2d | nn.ConvTranspose2d | nn.Linear) or groups != 1:
        raise DecompositionError(
            f"method '{method.name}' builds a block whose first stage is not a dense conv or "
            "linear layer reading the input channels, so it has no data-aware fit; drop "
            "--data-aware"
        )
    # In float64, so the method reads W·L unrounded (it fits float64 kernels anyway). Kernels
    # in the conv layout, whose axis 1 is the input channels for transposed convs too.
    transformed = copy.deepcopy(original).double()
    set_kernel(transformed, whitening.transform(kernel_of(original)))
    filled = method.fill(block, transformed, seed)
    set_kernel(first, whitening.restore(kernel_of(first)))
    return filled
