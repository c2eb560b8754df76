"""Per-layer latency model: time a layer and its factorized blocks in onnxruntime, cache the times.

Each candidate (the original layer, or a method's block at given ranks) is built from the layer's
geometry with random weights (dense kernels run at the same speed whatever the values), written
as a tiny ONNX graph and timed at the layer's real input shape and batch on the chosen provider.
Times are net of onnxruntime's fixed per-run overhead (measured once per table on a one-element
Identity graph), so a block of three nodes is not flattered against a one-node layer by a cost
both pay once per `run` call but a whole model pays once in total.

On CPU (a backend with `blocked_layout`) a conv is timed in context: onnxruntime runs a model's
convs in its blocked NCHWc layout and converts at the model's edges only, but a lone conv pays
both conversions, and a block whose ranks are off the channel block runs in plain NCHW, paying
conversions in a model that a lone probe does not. So conv probes sit between two depthwise 1×1
convs, as a layer sits between its neighbours, and the time of that context (timed on its own,
per shape) is taken off. (Not from onnxruntime's profiler: its per-node times carry ~2 µs of its
own per node, as much as a small conv's.)

Two things make a probe of a few µs trustworthy (BENCHMARKS.md, the latency table's noise): a
small layer that keeps its input's shape (most of a ResNet's) is timed as a chain of copies
doing at least `CHAIN_MACS` of work, its time divided by the copies, so the noisy context and
overhead taken off weigh little; and every probe is timed in `SESSIONS` sessions, one after
the other, and the median session kept, since a thread pool's speed differs more between
sessions than between the runs of one. A block is never priced more than `MAX_EFFICIENCY`
times its MAC reduction faster than its layer (the best blocks measured come near 1): a faster
time is the noise left where no chain can be built (a stride-2 conv).

With `precision="int8"` every probe (layer, block and context alike) is quantized as
`--quantize int8` quantizes the model (`rankfold.runtime.quantize`, calibrated on the probe's own
random input), so the gate and a latency budget plan for the INT8 deployment: a block faster than
its layer in float may not be once both run int8 kernels.

The cache is one JSON file per (provider, machine, threads, precision): the machine is the
backend's `machine_id` (CPU model, core count, onnxruntime version; the GPU name for CUDA); entries
are keyed by the layer geometry, the block (method and ranks) and the batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.core import ConfigError, OutputError, atomic_write_json
from rankfold.passes.latency_gate import on_block, rounded_ranks
from rankfold.passes.methods import Method, Ranks, get_method
from rankfold.runtime.backends import get_backend
from rankfold.runtime.latency import median_interval, time_runs
from rankfold.runtime.quantize import quantize_int8
from rankfold.runtime.session import create_session

CACHE_FORMAT = "rankfold-latency-3"  # 2: convs timed in context; 3: small ones as chains
# A shape-preserving layer's probe repeats it until the chain does this much work (a tenth of a
# millisecond or so on one CPU core), at most MAX_COPIES times.
CHAIN_MACS = 16_000_000
MAX_COPIES = 16
SESSIONS = 3
MAX_EFFICIENCY = 2.0
CACHE_ENV = "RANKFOLD_LATENCY_CACHE"
TIMED_CONVS = ("Conv1d", "Conv2d", "ConvTranspose2d")
# Opset 19: Pad's "wrap" mode (circular padding) needs it; Conv/Gemm/MatMul are unchanged.
TIMING_OPSET = 19
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
CONTEXT_IN, CONTEXT_OUT = "context_in", "context_out"
PRECISIONS = ("float", "int8")


def default_cache_dir() -> Path:
    """$RANKFOLD_LATENCY_CACHE, else $XDG_CACHE_HOME/rankfold/latency, else ~/.cache/..."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rankfold" / "latency"


def layer_geometry(layer: LayerInfo) -> dict:
    """Everything about a layer that changes its run time (not its name or call count)."""
    return {
        "type": layer.type,
        "in_shape": list(layer.in_shape),
        "out_shape": list(layer.out_shape),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "kernel_size": list(layer.kernel_size),
        "stride": list(layer.stride),
        "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
        "dilation": list(layer.dilation),
        "groups": layer.groups,
        "bias": layer.bias,
        "padding_mode": layer.padding_mode,
        # Only where there is one, so cached times of other layers keep their keys.
        **({"output_padding": list(layer.output_padding)} if layer.transposed else {}),
    }


def layer_module(layer: LayerInfo) -> nn.Module:
    """The original layer rebuilt from its geometry, with random weights."""
    if layer.type == "Linear":
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    if layer.type not in TIMED_CONVS:
        timed = ", ".join(TIMED_CONVS)
        raise ValueError(f"layer '{layer.name}' is {layer.type}; only {timed} and Linear are timed")
    geometry = {"output_padding": layer.output_padding} if layer.transposed else {}
    return getattr(nn, layer.type)(
        layer.in_features,
        layer.out_features,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias,
        padding_mode=layer.padding_mode,
        **geometry,
    )


def module_to_onnx(
    module: nn.Module, input_shape: Sequence[int], context: bool = False, copies: int = 1
) -> onnx.ModelProto:
    """A conv (`TIMED_CONVS`), a Linear, or a Sequential of them as an ONNX graph with a
    symbolic batch axis; with `copies` > 1, that many of it one after the other (each with its
    own weights, as the layers of a model have; the module must keep its input's shape).

    With `context` (image inputs only) the graph is CONTEXT_IN → module → CONTEXT_OUT, two
    depthwise 1×1 convs standing in for the layers around it in a model.
    Written node by node with onnx.helper rather than torch.onnx.export: the torch.export-based
    exporter takes ~1.9 s per single block here (a ResNet table needs hundreds of blocks) and
    the TorchScript one is deprecated; these graphs have the same Conv/Gemm/MatMul nodes
    the exporter writes, in ~1 ms.
    """
    layers = (list(module) if isinstance(module, nn.Sequential) else [module]) * copies
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    shape = list(input_shape)
    context = context and len(shape) == 3
    current = "input"
    if context:
        current = _context_conv(CONTEXT_IN, "input", shape[0], nodes, inits)
    for index, sub in enumerate(layers):
        out = "output" if index == len(layers) - 1 and not context else f"t{index}"
        if type(sub).__name__ in TIMED_CONVS:
            shape = _conv_nodes(sub, f"l{index}", current, out, shape, nodes, inits)
        elif isinstance(sub, nn.Linear):
            shape = _linear_nodes(sub, f"l{index}", current, out, shape, nodes, inits)
        else:
            raise ValueError(
                f"cannot time {type(sub).__name__}; blocks must be {'/'.join(TIMED_CONVS)}/Linear"
            )
        current = out
    if context:
        _context_conv(CONTEXT_OUT, current, shape[0], nodes, inits, output="output")
    graph = helper.make_graph(
        nodes,
        "latency_probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *shape])],
        initializer=inits,
    )
    return probe_model(graph)


def probe_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """`graph` as a model of opset TIMING_OPSET, at the oldest IR version that carries it: the
    `onnx` package would stamp its own newest one, which an older onnxruntime refuses to load."""
    opsets = [helper.make_opsetid("", TIMING_OPSET)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


def _context_conv(
    name: str,
    x: str,
    channels: int,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    output: str | None = None,
) -> str:
    """A depthwise 1×1 conv named `name` (its output `name`.y unless given); returns the output."""
    weight = np.random.default_rng(0).standard_normal((channels, 1, 1, 1)).astype(np.float32)
    inits.append(numpy_helper.from_array(weight, f"{name}.w"))
    y = output or f"{name}.y"
    nodes.append(
        helper.make_node(
            "Conv", [x, f"{name}.w"], [y], name=name, group=channels, kernel_shape=[1, 1]
        )
    )
    return y


def _weight(name: str, tensor: torch.Tensor) -> onnx.TensorProto:
    return numpy_helper.from_array(tensor.detach().cpu().float().numpy(), name)


def _conv_nodes(
    conv: nn.Module,
    name: str,
    x: str,
    y: str,
    shape: list[int],
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
) -> list[int]:
    """A conv or transposed conv of any dimension as ONNX Conv / ConvTranspose (+ Pad)."""
    sizes = shape[1:]
    dims = len(sizes)
    before, after = [], []
    for k, d, p in zip(conv.kernel_size, conv.dilation, _per_dim(conv.padding, dims)):
        if p == "same":  # torch puts the odd extra pixel at the end
            total = d * (k - 1)
            before.append(total // 2)
            after.append(total - total // 2)
        else:
            pad = 0 if p == "valid" else int(p)
            before.append(pad)
            after.append(pad)
    inits.append(_weight(f"{name}.w", conv.weight))
    inputs = [x, f"{name}.w"]
    if conv.bias is not None:
        inits.append(_weight(f"{name}.b", conv.bias))
        inputs.append(f"{name}.b")
    conv_pads = before + after
    if conv.padding_mode != "zeros" and any(conv_pads):
        padded = f"{name}.padded"
        inits.append(
            numpy_helper.from_array(
                np.array([0, 0, *before, 0, 0, *after], dtype=np.int64), f"{name}.pads"
            )
        )
        nodes.append(
            helper.make_node(
                "Pad", [x, f"{name}.pads"], [padded], mode=_PAD_MODES[conv.padding_mode]
            )
        )
        inputs[0] = padded
        conv_pads = [0] * (2 * dims)
    geometry = zip(sizes, before, after, conv.kernel_size, conv.stride, conv.dilation)
    extra = {}
    if conv.transposed:
        # ONNX ConvTranspose crops `pads` from the full output, as torch's `padding` does.
        extra["output_padding"] = list(conv.output_padding)
        out_sizes = [
            s * (size - 1) + o + d * (k - 1) + 1 - b - a
            for (size, b, a, k, s, d), o in zip(geometry, conv.output_padding)
        ]
    else:
        out_sizes = [(size + b + a - d * (k - 1) - 1) // s + 1 for size, b, a, k, s, d in geometry]
    nodes.append(
        helper.make_node(
            "ConvTranspose" if conv.transposed else "Conv",
            inputs,
            [y],
            kernel_shape=list(conv.kernel_size),
            strides=list(conv.stride),
            dilations=list(conv.dilation),
            pads=conv_pads,
            group=conv.groups,
            **extra,
        )
    )
    return [conv.out_channels, *out_sizes]


def _per_dim(padding: str | int | tuple[int, ...], dims: int) -> tuple:
    return (padding,) * dims if isinstance(padding, str | int) else tuple(padding)


def _linear_nodes(
    linear: nn.Linear,
    name: str,
    x: str,
    y: str,
    shape: list[int],
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
) -> list[int]:
    # The exporter writes Gemm for batch × features inputs and MatMul (+ Add) otherwise.
    if len(shape) == 1:
        inits.append(_weight(f"{name}.w", linear.weight))
        inputs = [x, f"{name}.w"]
        if linear.bias is not None:
            inits.append(_weight(f"{name}.b", linear.bias))
            inputs.append(f"{name}.b")
        nodes.append(helper.make_node("Gemm", inputs, [y], transB=1))
    else:
        inits.append(_weight(f"{name}.wt", linear.weight.T.contiguous()))
        if linear.bias is None:
            nodes.append(helper.make_node("MatMul", [x, f"{name}.wt"], [y]))
        else:
            inits.append(_weight(f"{name}.b", linear.bias))
            nodes.append(helper.make_node("MatMul", [x, f"{name}.wt"], [f"{name}.mm"]))
            nodes.append(helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [y]))
    return [*shape[:-1], linear.out_features]


def chain_copies(layer: LayerInfo, batch: int) -> int:
    """How many copies of `layer` (or of a block for it) one probe chains: enough for
    `CHAIN_MACS` of work, at most `MAX_COPIES`; one where the layer changes its input's shape."""
    if tuple(layer.in_shape) != tuple(layer.out_shape):
        return 1
    return max(1, min(MAX_COPIES, CHAIN_MACS // max(layer.macs * batch, 1)))


class LatencyTable:
    """Measured milliseconds of layers and their factorized blocks, cached per machine/provider.

    `block_ms` / `layer_ms` time on first use and read the cache afterwards. Timing, in each of
    `SESSIONS` sessions: `warmup` untimed runs, then the median of `repeats` samples, each
    sample the mean of enough runs to last `min_sample_ms` (tiny layers run in microseconds,
    below the timer's noise); the median session is kept.
    """

    def __init__(
        self,
        provider: str = "cpu",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        warmup: int = 2,
        repeats: int = 7,
        min_sample_ms: float = 2.0,
        precision: str = "float",
    ) -> None:
        if warmup < 0 or repeats < 1 or min_sample_ms < 0:
            raise ConfigError(
                f"latency table needs warmup >= 0, repeats >= 1 and min_sample_ms >= 0, got "
                f"{warmup}, {repeats}, {min_sample_ms}; pass e.g. warmup=2, repeats=7"
            )
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}; pass a positive thread count")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision '{precision}' is unknown; use {' or '.join(PRECISIONS)}")
        self.precision = precision
        self.backend = get_backend(provider)
        self.provider = self.backend.name
        self.threads = threads
        self.warmup, self.repeats, self.min_sample_ms = warmup, repeats, min_sample_ms
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.machine = self.backend.machine_id()
        identity = {"machine": self.machine, "provider": self.provider, "threads": threads}
        if precision != "float":  # float tables keep the cache files they had
            identity["precision"] = precision
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.path = self.cache_dir / f"{self.provider}-{digest}.json"
        self.entries: dict[str, float] = {}
        # Per entry, the interval of its median (`median_interval` of the samples), net as the
        # entry is: the gate tells a real difference from noise with it.
        self.ranges: dict[str, tuple[float, float]] = {}
        self._read_cache()
        self.measured = 0  # timings run by this table (cache misses)
        self._overhead: float | None = None
        self.cache_error: str | None = None  # set when the cache file could not be written

    def layer_ms(self, layer: LayerInfo, batch: int) -> float:
        """Milliseconds per run of the original layer on `batch` inputs of its traced shape."""
        return self._lookup(layer, "original", (), batch, lambda: layer_module(layer))

    def block_ms(
        self, layer: LayerInfo, method_name: str, ranks: Sequence[int], batch: int
    ) -> float:
        """Milliseconds per run of `method_name`'s block for `layer` at `ranks`."""
        method: Method = get_method(method_name)
        ranks = tuple(int(r) for r in ranks)
        measured = self._lookup(
            layer, method.name, ranks, batch, lambda: method.build(layer, ranks)
        )
        return max(measured, self._fastest_plausible(layer, method, ranks, batch))

    def _fastest_plausible(
        self, layer: LayerInfo, method: Method, ranks: Ranks, batch: int
    ) -> float:
        """The layer's time scaled by the block's share of its MACs, over `MAX_EFFICIENCY`."""
        share = method.cost(layer, ranks).macs / max(layer.macs, 1)
        return self.layer_ms(layer, batch) * share / MAX_EFFICIENCY

    def speedup_range(
        self, layer: LayerInfo, method_name: str, ranks: Sequence[int], batch: int
    ) -> tuple[float, float] | None:
        """The interval of layer time / block time from both medians' intervals; None for
        entries cached without one."""
        self.layer_ms(layer, batch)
        self.block_ms(layer, method_name, ranks, batch)
        name = get_method(method_name).name
        ranks = tuple(int(r) for r in ranks)
        layer_range = self.ranges.get(self.key(layer, "original", (), batch))
        block_range = self.ranges.get(self.key(layer, name, ranks, batch))
        if layer_range is None or block_range is None:
            return None
        floor = self._fastest_plausible(layer, get_method(name), ranks, batch)
        block_low, block_high = (max(ms, floor) for ms in block_range)
        return layer_range[0] / block_high, layer_range[1] / block_low

    def key(self, layer: LayerInfo, block: str, ranks: Ranks, batch: int) -> str:
        return json.dumps(
            {"layer": layer_geometry(layer), "block": block, "ranks": list(ranks), "batch": batch},
            sort_keys=True,
            separators=(",", ":"),
        )

    def _lookup(self, layer: LayerInfo, block: str, ranks: Ranks, batch: int, build) -> float:
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}; pass e.g. 1 or 8")
        key = self.key(layer, block, ranks, batch)
        if key not in self.entries:
            # Fixed random weights (reruns time the same graph), without touching the caller's RNG.
            # Only a blocked layout needs neighbours; a linear layer has no image input.
            context = self.backend.blocked_layout and len(layer.in_shape) == 3
            copies = chain_copies(layer, batch)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = module_to_onnx(build().eval(), layer.in_shape, context, copies)
            shape = (batch, *layer.in_shape)
            raw, low, high = self._time(model, shape)
            around = self.context_ms(layer.in_shape, layer.out_shape, batch) if context else 0.0
            # Floor at 1 % of the raw time: the overhead estimate is itself noisy.
            net = [
                max(ms - self.overhead_ms() - around, 0.01 * ms) / copies for ms in (raw, low, high)
            ]
            self.entries[key] = net[0]
            self.ranges[key] = (net[1], net[2])
            self.measured += 1
            self._write_cache()
        return self.entries[key]

    def overhead_ms(self) -> float:
        """onnxruntime's fixed cost per `run` call: an Identity on one element (not cached)."""
        if self._overhead is None:
            x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1])
            y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])
            graph = helper.make_graph(
                [helper.make_node("Identity", ["input"], ["output"])], "overhead", [x], [y]
            )
            model = probe_model(graph)
            self._overhead = self._time(model, (1, 1), quantize=False)[0]
        return self._overhead

    def context_ms(self, in_shape: Sequence[int], out_shape: Sequence[int], batch: int) -> float:
        """What the context convs and edge conversions add to a conv probe (net of the run
        overhead): half a two-conv context chain on the input shape (one conversion in, one
        context conv) plus half of one on the output shape (one context conv, one conversion
        out), taking the conversions in and out as equally costly. Cached per shape and batch."""
        return sum(self._chain_ms(shape, batch) for shape in (in_shape, out_shape)) / 2

    def _chain_ms(self, shape: Sequence[int], batch: int) -> float:
        key = json.dumps({"context": list(shape), "batch": batch}, separators=(",", ":"))
        if key not in self.entries:
            chain = module_to_onnx(nn.Sequential(), shape, context=True)
            chain_ms = self._time(chain, (batch, *shape))[0]
            self.entries[key] = max(chain_ms - self.overhead_ms(), 0.0)
            self._write_cache()
        return self.entries[key]

    def _time(
        self, model: onnx.ModelProto, shape: tuple[int, ...], quantize: bool = True
    ) -> tuple[float, float, float]:
        """The median of `SESSIONS` sessions' median ms, and the range of those medians (the
        interval of their median). An int8 table quantizes the probe first."""
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        with tempfile.TemporaryDirectory(prefix="rankfold-latency-") as folder:
            path = Path(folder) / "probe.onnx"
            onnx.save(model, str(path))
            if quantize and self.precision == "int8":
                path = quantize_int8(path, Path(folder) / "probe.int8.onnx", [x]).path
            medians = [self._session_median(path, x) for _ in range(SESSIONS)]
        median = statistics.median(medians)
        return (median, *(median_interval(medians) or (median, median)))

    def _session_median(self, path: Path, x: np.ndarray) -> float:
        session = create_session(path, self.provider, self.threads)
        device = self.backend.device
        # I/O binding keeps inputs and outputs on the provider's device, so a CUDA time is the
        # kernels' time, not host↔device copies; on CPU it is the plain run.
        binding = session.io_binding()
        binding.bind_ortvalue_input("input", onnxruntime.OrtValue.ortvalue_from_numpy(x, device, 0))
        binding.bind_output("output", device)
        run = partial(session.run_with_iobinding, binding)
        # The warm-up runs, timed as one sample, size the samples to last `min_sample_ms`.
        (first,) = time_runs(run, 0, 1, inner=max(self.warmup, 1))
        inner = min(1000, max(1, math.ceil(self.min_sample_ms / max(first, 1e-4))))
        return statistics.median(time_runs(run, 0, self.repeats, inner=inner))

    def _read_cache(self) -> None:
        """Merge the cache file's entries and ranges into this table's (ours win)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return  # no cache yet, or a damaged one: measure again and rewrite it
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return
        entries, ranges = data.get("entries"), data.get("ranges")
        if isinstance(entries, dict):
            read = {k: float(v) for k, v in entries.items() if isinstance(v, (int, float))}
            self.entries = {**read, **self.entries}
        if isinstance(ranges, dict):
            read_ranges = {
                k: (float(v[0]), float(v[1]))
                for k, v in ranges.items()
                if isinstance(v, list) and len(v) == 2
            }
            self.ranges = {**read_ranges, **self.ranges}

    def _write_cache(self) -> None:
        # Another process may have added entries since we read the file: merge, do not clobber.
        self._read_cache()
        try:
            atomic_write_json(
                self.path,
                {
                    "format": CACHE_FORMAT,
                    "provider": self.provider,
                    "threads": self.threads,
                    "machine": self.machine,
                    "entries": self.entries,
                    "ranges": {k: list(v) for k, v in self.ranges.items()},
                },
            )
        except (OutputError, OSError) as exc:
            # The table still works from memory; an unwritable cache only costs re-timing.
            self.cache_error = f"latency cache {self.path} not written ({exc})"


class LatencyMetric:
    """Measured latency as the cost a budgeted rank selector allocates (--latency-reduction).

    `layer(layer)` is the original layer's ms; `block(layer, method, ranks)` the block's ms,
    interpolated in MACs between `anchors` measured candidates of the method's family (timing
    every candidate would take minutes); `total(analysis)` sums the conv/linear layers, the
    same convention as MAC totals.

    With `round_to` (the provider's channel block) a block is priced as what the measured rank
    rounding will deploy: ranks on the block come from a curve through on-block anchors, other
    ranks cost the lesser of their own curve and their rounded ranks' time (`round_ranks` moves
    them there when that is faster). One curve through both would be wrong on ResNet-56: rank 12
    of a 16-channel CP layer runs in 41 µs off the block, rank 16 in 21 µs, and a line from 12
    to 23 priced rank 16 at 50 µs. The prices of all candidates are then made non-decreasing in
    MACs (each the cheapest at its MACs or above), so "the largest candidate within a budget"
    stays well defined and a slow small block does not make larger ones look slow.
    """

    name = "latency"

    def __init__(
        self, table: LatencyTable, batch: int, anchors: int = 6, round_to: int | None = None
    ) -> None:
        if anchors < 2:
            raise ConfigError(f"anchors must be >= 2, got {anchors}")
        if round_to is not None and round_to < 2:
            raise ConfigError(f"round_to must be >= 2 (e.g. 16) or None, got {round_to}")
        self.table, self.batch, self.anchors, self.round_to = table, batch, anchors, round_to
        self._curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def layer(self, layer: LayerInfo) -> float:
        return self.table.layer_ms(layer, self.batch)

    def warm(self, analysis, pairs: Sequence[tuple[LayerInfo, Method]], progress=None) -> None:
        """Time every layer, then each (layer, method)'s anchor blocks, now rather than lazily
        (so a progress bar can show it): `progress(name)` once per layer and once per pair."""
        for layer in analysis.layers:
            self.layer(layer)
            if progress is not None:
                progress(layer.name)
        for layer, method in pairs:
            self._curve(layer, method)
            if progress is not None:
                progress(layer.name)

    def total(self, analysis) -> float:
        return sum(self.layer(layer) for layer in analysis.layers)

    def plan_total(self, analysis, plan) -> float:
        """`total` with `plan` applied: its blocks' times in place of their layers'."""
        blocks = {entry.name: entry for entry in plan.decomposed()}
        return sum(
            self.block(layer, get_method(blocks[layer.name].method), blocks[layer.name].ranks)
            if layer.name in blocks
            else self.layer(layer)
            for layer in analysis.layers
        )

    def block(self, layer: LayerInfo, method: Method, ranks: Sequence[int]) -> float:
        macs, times = self._curve(layer, method)
        return float(np.interp(method.cost(layer, tuple(ranks)).macs, macs, times))

    def _curve(self, layer: LayerInfo, method: Method) -> tuple[np.ndarray, np.ndarray]:
        """(MACs, ms) of every smaller candidate, sorted by MACs, enveloped."""
        # By geometry, not name: one metric may price models that share layer names.
        key = (json.dumps(layer_geometry(layer), sort_keys=True), method.name)
        if key not in self._curves:
            costs = {c: method.cost(layer, c) for c in method.candidates(layer)}
            smaller = [c for c, cost in costs.items() if cost.smaller_than(layer)]
            family = smaller or list(costs)[:1]
            family.sort(key=lambda c: costs[c].macs)
            macs = np.array([costs[c].macs for c in family], dtype=float)
            block = self.round_to
            on = [c for c in family if block and on_block(method, layer, c, block)]
            on_set = set(on)
            off = [c for c in family if c not in on_set]
            on_curve = self._anchored(layer, method, on) if on else None
            off_curve = self._anchored(layer, method, off) if off else None
            prices = []
            for c, c_macs in zip(family, macs):
                if c in on_set:
                    prices.append(np.interp(c_macs, *on_curve))
                    continue
                price = float(np.interp(c_macs, *off_curve))
                rounded = rounded_ranks(method, layer, c, block) if on_curve is not None else None
                if rounded is not None:
                    price = min(price, np.interp(method.cost(layer, rounded).macs, *on_curve))
                prices.append(price)
            self._curves[key] = (macs, np.minimum.accumulate(np.array(prices)[::-1])[::-1])
        return self._curves[key]

    def _anchored(
        self, layer: LayerInfo, method: Method, family: list[Ranks]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Measured (MACs, ms) at up to `anchors` members of `family` spread evenly in MACs."""
        family_macs = np.array([method.cost(layer, c).macs for c in family], dtype=float)
        targets = np.linspace(family_macs[0], family_macs[-1], self.anchors)
        picks = sorted({int(np.argmin(np.abs(family_macs - t))) for t in targets})
        times = [self.table.block_ms(layer, method.name, family[i], self.batch) for i in picks]
        return family_macs[picks], np.array(times)
