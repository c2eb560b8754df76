"""Decomposition methods: a registry of per-layer decomposers, open to users and packages.

A method knows which layers it applies to (or why not), the exact parameter and MAC cost of its
block at given ranks (equal to counting the built block's layers), a one-parameter family of
candidate ranks ordered by cost (what budgeted allocation walks), how to build the block from
shapes alone, and how to fill it from the layer's weights; capability hooks
(`rankfold.passes.methods.base.Method`) say what else it supports. The factorizations themselves
live in `rankfold.passes.factorizations` as pure functions. One module per method; a third-party
package adds one by declaring an entry point in the group `rankfold.methods` that names a Method
subclass (or instance):

    [project.entry-points."rankfold.methods"]
    my-method = "my_package.module:MyMethod"
"""

from __future__ import annotations

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.core import Registry
from rankfold.passes.methods.base import Cost, FillResult, Method, Ranks, kernel_array
from rankfold.passes.methods.cp import CPMethod, cp_tensor, load_cp
from rankfold.passes.methods.cp_epc import CPEPCMethod
from rankfold.passes.methods.cp_lrf import CPLRFMethod
from rankfold.passes.methods.svd import SVDMethod
from rankfold.passes.methods.tucker2 import Tucker2Method
from rankfold.passes.methods.tucker2_cp import Tucker2CPMethod

METHODS: Registry[Method] = Registry("method", Method, "rankfold.methods")
register_method = METHODS.register
get_method = METHODS.get_named


def method_for_layer(requested: str, layer: LayerInfo) -> tuple[Method, str]:
    """The method a layer gets, and a note when it differs from the requested one.

    A Linear layer or a 1×1 conv is a matrix: every tensor method reduces to its SVD there. A
    grouped conv's ranks are per group (see `Method`), which the note says.
    """
    method = get_method(requested)
    svd = METHODS["svd"]
    notes = []
    if method is not svd and layer.type == "Linear":
        method, notes = svd, [f"{requested} of a matrix is its SVD"]
    if method is not svd and layer.type in svd.layer_types and layer.kernel_area == 1:
        method, notes = svd, [f"{requested} of a 1×1 kernel is its SVD"]
    if layer.groups > 1:
        one = layer.one_group
        notes.append(
            f"ranks per group: {layer.groups} groups of {one.in_features}→{one.out_features}"
        )
    return method, "; ".join(notes)


for _method in (
    SVDMethod(),
    Tucker2Method(),
    CPMethod(),
    CPEPCMethod(),
    Tucker2CPMethod(),
    CPLRFMethod(),
):
    METHODS.register(_method)
METHODS.load_entry_points()

__all__ = [
    "CPEPCMethod",
    "CPLRFMethod",
    "CPMethod",
    "Cost",
    "FillResult",
    "METHODS",
    "Method",
    "Ranks",
    "SVDMethod",
    "Tucker2CPMethod",
    "Tucker2Method",
    "cp_tensor",
    "get_method",
    "kernel_array",
    "load_cp",
    "method_for_layer",
    "register_method",
]
