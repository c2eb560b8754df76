"""Per-layer analysis of a traced model: shapes, parameters and MACs on the real traced shapes.

MACs (multiply-accumulates) are per sample: a conv costs H_out·W_out·T·(S/groups)·kh·kw, a linear
layer in·out per position. A transposed conv scatters every input position through its whole
kernel, so it costs H_in·W_in·S·(T/groups)·kh·kw (what ONNX Runtime computes, and the count of
ptflops/fvcore). Model totals count conv and linear layers, the usual convention.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from rankfold.passes.attention import ATTENTION_MACS, kept_reason

# Analysed (and counted in the MACs); which ones a method decomposes is its own `layer_types`.
CONV_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@dataclass(frozen=True)
class LayerInfo:
    """One conv/linear call site; shapes exclude the batch dimension."""

    name: str
    type: str  # "Linear" or the conv module's class name ("Conv2d", "Conv1d", "ConvTranspose2d", …)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_features: int  # S (channels or features)
    out_features: int  # T
    kernel_size: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    bias: bool = False
    padding_mode: str = "zeros"
    calls: int = 1
    output_padding: tuple[int, ...] = ()  # transposed convs only

    @property
    def is_conv(self) -> bool:
        return self.type != "Linear"

    @property
    def transposed(self) -> bool:
        return self.type.startswith("ConvTranspose")

    @property
    def kernel_positions(self) -> int:
        """Positions the kernel is applied at: the output's for a conv, the input's for a
        transposed conv (it scatters each input position)."""
        return self.in_positions if self.transposed else self.out_positions

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel_size)

    @property
    def kernel_area(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def in_positions(self) -> int:
        """Spatial positions (conv) or leading positions (linear) of the input, per sample."""
        return (
            math.prod(self.in_shape[:-1]) if self.type == "Linear" else math.prod(self.in_shape[1:])
        )

    @property
    def out_positions(self) -> int:
        return (
            math.prod(self.out_shape[:-1])
            if self.type == "Linear"
            else math.prod(self.out_shape[1:])
        )

    @property
    def params(self) -> int:
        weight = self.out_features * (self.in_features // self.groups) * self.kernel_area
        return weight + (self.out_features if self.bias else 0)

    @property
    def macs(self) -> int:
        per_position = self.out_features * (self.in_features // self.groups) * self.kernel_area
        return self.kernel_positions * per_position * self.calls

    @property
    def one_group(self) -> LayerInfo:
        """One group of a grouped conv as a conv of its own (S/g → T/g, same geometry); the
        layer itself when it has one group."""
        g = self.groups
        if g == 1:
            return self
        return dataclasses.replace(
            self,
            in_shape=(self.in_shape[0] // g, *self.in_shape[1:]),
            out_shape=(self.out_shape[0] // g, *self.out_shape[1:]),
            in_features=self.in_features // g,
            out_features=self.out_features // g,
            groups=1,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "params": self.params, "macs": self.macs}


@dataclass(frozen=True)
class ModelAnalysis:
    layers: tuple[LayerInfo, ...]
    total_params: int  # every parameter of the model
    total_macs: int  # conv + linear MACs, modules and functional calls
    # Functional convs and matrix products (F.conv2d, F.linear, matmul, …): node name → MACs,
    # nn.MultiheadAttention modules (see `_attention_macs`) and leaf modules' layers (see
    # `_leaf_macs`). Counted in total_macs (they are part of the model's cost) but not
    # decomposable.
    functional: dict[str, int] = dataclasses.field(default_factory=dict)

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(name)

    def fingerprint(self) -> str:
        """What a plan depends on: every layer's name, type and geometry (not the weights).
        `output_padding` counts only where a layer has one, so plans saved before transposed
        convs were analysed still match their models."""
        rows = [
            dataclasses.astuple(layer)[: None if layer.output_padding else -1]
            for layer in self.layers
        ]
        return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()[:16]


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        raise ValueError(
            f"node {node.name} has no shape; trace the model with rankfold.passes.trace"
        )
    return tuple(int(d) for d in meta.shape[1:])


def _dims(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(int(v) for v in value)


def layer_info(
    name: str, module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], calls: int
) -> LayerInfo:
    """The LayerInfo of a conv/linear module called `calls` times at these shapes (no batch)."""
    if isinstance(module, nn.Linear):
        return LayerInfo(
            name,
            "Linear",
            in_shape,
            out_shape,
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            calls=calls,
        )
    n = len(module.kernel_size)
    padding = module.padding if isinstance(module.padding, str) else _dims(module.padding, n)
    return LayerInfo(
        name,
        type(module).__name__,
        in_shape,
        out_shape,
        module.in_channels,
        module.out_channels,
        kernel_size=_dims(module.kernel_size, n),
        stride=_dims(module.stride, n),
        padding=padding,
        dilation=_dims(module.dilation, n),
        groups=module.groups,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
        calls=calls,
        output_padding=_dims(module.output_padding, n) if module.transposed else (),
    )


LAYER_TYPES = (nn.Linear, *CONV_TYPES)


def analyze(gm: fx.GraphModule) -> ModelAnalysis:
    """One LayerInfo per conv/linear module called in the graph (shapes from `trace`)."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, LAYER_TYPES):
                calls.setdefault(node.target, []).append(node)
    layers = [
        layer_info(
            name,
            gm.get_submodule(name),
            _shape(nodes[0].args[0]),
            _shape(nodes[0]),
            calls=len(nodes),
        )
        for name, nodes in calls.items()
    ]
    total_params = sum(p.numel() for p in gm.parameters())
    functional = {**_functional_macs(gm), **_attention_macs(gm), **_leaf_macs(gm)}
    total_macs = sum(info.macs for info in layers) + sum(functional.values())
    return ModelAnalysis(tuple(layers), total_params, total_macs, functional)


CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
TRANSPOSED_CONV_FUNCTIONS = {
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
}
MATMUL_FUNCTIONS = {F.linear, torch.matmul, torch.mm, torch.bmm, operator.matmul}


def conv_macs(out_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """MACs per sample of a functional conv (weight: out × in/groups × k…)."""
    return int(math.prod(out_shape[1:]) * math.prod(weight_shape[1:]))


def transposed_conv_macs(in_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """MACs per sample of a functional transposed conv (weight: in × out/groups × k…): every
    input element through its group's whole kernel."""
    return int(math.prod(in_shape[1:]) * math.prod(weight_shape[1:]))


def matmul_macs(out_shape: tuple[int, ...], first_shape: tuple[int, ...]) -> int:
    """MACs per sample of a matrix product whose first operand has this shape."""
    return int(math.prod(out_shape[1:]) * first_shape[-1])


def einsum_macs(
    equation: str, shapes: Sequence[Sequence[int]], out_shape: Sequence[int]
) -> int | None:
    """MACs per sample of a two-operand einsum (MaxViT's attention): every index's size
    multiplied, over the batch (the output's first dimension); None for other forms."""
    equation = equation.replace(" ", "")
    terms = equation.partition("->")[0].split(",")
    if len(terms) != 2 or "." in equation or len(shapes) != 2:
        return None
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        if len(term) != len(shape):
            return None
        sizes.update(zip(term, (int(d) for d in shape), strict=True))
    return math.prod(sizes.values()) // max(int(out_shape[0]), 1)


def _functional_macs(gm: fx.GraphModule) -> dict[str, int]:
    """MACs of conv and matrix-product calls that are not modules, from the traced shapes (a
    model that calls F.conv2d would otherwise report a reduction larger than it gets)."""
    found: dict[str, int] = {}

    def add(node: fx.Node, operands: Sequence, macs: int, key: str | None = None) -> None:
        fixed = _fixed_operand(gm, operands)
        key = fixed_kernel_key(fixed) if fixed is not None else key or node.name
        found[key] = found.get(key, 0) + macs

    from_input: set[fx.Node] = set()  # nodes whose value depends on the model's input
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(arg in from_input for arg in node.all_input_nodes):
            from_input.add(node)
        if node.op != "call_function" or "tensor_meta" not in node.meta:
            continue
        if node.target in ATTENTION_MACS:
            shapes = [arg.meta["tensor_meta"].shape for arg in node.args[:3]]
            found[attention_key(node)] = ATTENTION_MACS[node.target](*shapes)
            continue
        if not hasattr(node.meta["tensor_meta"], "shape"):
            continue  # several tensors (chunk, unbind): neither a conv nor a matrix product
        out = node.meta["tensor_meta"].shape
        if node.target in CONV_FUNCTIONS | TRANSPOSED_CONV_FUNCTIONS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            meta = getattr(weight, "meta", {}).get("tensor_meta")
            first = getattr(node.args[0], "meta", {}).get("tensor_meta")
            if node.target in CONV_FUNCTIONS and meta is not None:
                add(node, [weight], conv_macs(out, meta.shape))
            elif meta is not None and first is not None:
                add(node, [weight], transposed_conv_macs(first.shape, meta.shape))
        elif node.target is torch.einsum and isinstance(node.args[0], str):
            operands = node.args[1] if isinstance(node.args[1], list | tuple) else node.args[1:]
            metas = [getattr(op, "meta", {}).get("tensor_meta") for op in operands]
            if None not in metas:
                macs = einsum_macs(node.args[0], [meta.shape for meta in metas], out)
                if macs is not None:
                    add(node, operands, macs, _product_key(node, operands, from_input))
        elif node.target in MATMUL_FUNCTIONS:
            first = (
                node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
            )
            if first is None:
                continue
            key = _product_key(node, node.args[:2], from_input)
            add(node, node.args[:2], matmul_macs(out, first.shape), key)
    return found


FIXED_KERNEL_NOTE = "(fixed kernel: a buffer, not a parameter)"


def fixed_kernel_key(tensor_name: str) -> str:
    """The report's name for a functional conv or product whose weight is a buffer (option-A
    shortcuts' 0/1 kernels, blur filters; to torch.fx also a tensor constant): the module
    holding it. Nothing trained there to decompose, so the summary does not ask for a module."""
    owner = tensor_name.rpartition(".")[0] or tensor_name
    return f"{owner} {FIXED_KERNEL_NOTE}"


def _fixed_operand(gm: fx.GraphModule, operands: Sequence) -> str | None:
    """The qualified name of the first operand read straight from a buffer or tensor constant
    (a get_attr that is not a parameter)."""
    for operand in operands:
        if isinstance(operand, fx.Node) and operand.op == "get_attr":
            module, _, name = operand.target.rpartition(".")
            value = getattr(gm.get_submodule(module), name)
            if not isinstance(value, nn.Parameter):
                return operand.target
    return None


ACTIVATION_PRODUCT_NOTE = "(product of activations)"


def _product_key(node: fx.Node, operands: Sequence, from_input: set[fx.Node]) -> str:
    """A matrix product's name, marked when every operand comes from the input (attention's
    scores, say): it has no weight that a decomposition could factor."""
    if all(op in from_input for op in operands):
        return f"{node.name} {ACTIVATION_PRODUCT_NOTE}"
    return node.name


def attention_key(node: fx.Node) -> str:
    """The report's name for the attention products of a split attention module: the module
    that called them (from fx's module stack), else the node."""
    stack = node.meta.get("nn_module_stack")
    owner = next(reversed(stack.values()))[0] if stack else node.name
    return f"{owner} {ATTENTION_PRODUCTS_NOTE}"


ATTENTION_PRODUCTS_NOTE = "(attention scores and weighted sum)"


def _attention_macs(gm: fx.GraphModule) -> dict[str, int]:
    """MACs of nn.MultiheadAttention modules called whole (a leaf to torch.fx; those
    `split_attention` keeps): the q/k/v and output projections and the two attention products,
    kept whole; the key says why in every report."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        metas = [getattr(arg, "meta", {}).get("tensor_meta") for arg in node.args[:3]]
        if not isinstance(module, nn.MultiheadAttention) or None in metas:
            continue
        found[attention_kept_key(node.target, module)] = attention_macs(
            module, *(meta.shape for meta in metas)
        )
    return found


LEAF_NOTE = "(a leaf module, kept whole)"


def _leaf_macs(gm: fx.GraphModule) -> dict[str, int]:
    """MACs of the convs and linear layers inside modules torch.fx called whole (`--leaf`
    containers): run once on zeros of the call's traced shapes, their layers counted by hooks.
    Without this a leaf's layers would drop out of the model's MACs."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, (*LAYER_TYPES, nn.MultiheadAttention)):
            continue
        inner = [(n, m) for n, m in module.named_modules() if n and isinstance(m, LAYER_TYPES)]
        metas = [getattr(arg, "meta", {}).get("tensor_meta") for arg in node.args]
        if not inner or not metas or None in metas or node.kwargs:
            continue
        found[f"{node.target} {LEAF_NOTE}"] = _macs_inside(module, inner, metas)
    return found


def _macs_inside(module: nn.Module, inner: list[tuple[str, nn.Module]], metas: list) -> int:
    """The summed MACs of `inner` layers over one call of `module` on zeros of these shapes."""
    counted: list[int] = []

    def count(name: str, sub: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        in_shape, out_shape = tuple(inputs[0].shape[1:]), tuple(output.shape[1:])
        counted.append(layer_info(name, sub, in_shape, out_shape, calls=1).macs)

    hooks = [
        sub.register_forward_hook(lambda m, i, o, name=name: count(name, m, i, o))
        for name, sub in inner
    ]
    try:
        with torch.no_grad():
            module(*(torch.zeros(meta.shape, dtype=meta.dtype) for meta in metas))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(counted)


def attention_kept_key(name: str, module: nn.MultiheadAttention) -> str:
    return f"{name} (nn.MultiheadAttention kept whole: {kept_reason(module)})"


def attention_macs(module: nn.MultiheadAttention, *shapes: tuple[int, ...]) -> int:
    """MACs of one nn.MultiheadAttention call on query, key and value of these shapes."""
    position = 1 if module.batch_first else 0
    (l_q, e_q), (l_k, e_k), (l_v, e_v) = ((shape[position], shape[-1]) for shape in shapes)
    e = module.embed_dim
    return l_q * e_q * e + l_k * e_k * e + l_v * e_v * e + 2 * l_q * l_k * e + l_q * e * e
