"""torch.fx passes: trace → analyze → select_ranks (a Plan) → decompose (a new GraphModule + report)."""

from rankfold.passes.analysis import LayerInfo, ModelAnalysis, analyze
from rankfold.passes.decompose import DecompositionReport, LayerReport, decompose, restructure
from rankfold.passes.errors import RankfoldError
from rankfold.passes.lrf_method import CPLRFMethod
from rankfold.passes.stable_methods import CPEPCMethod, Tucker2CPMethod
from rankfold.passes.methods import METHODS, Method, get_method, register_method
from rankfold.passes.plan import LayerOverride, LayerPlan, Plan, RankPolicy, plan_cost, select_ranks
from rankfold.passes.tracing import trace

__all__ = [
    "CPEPCMethod",
    "CPLRFMethod",
    "METHODS",
    "DecompositionReport",
    "LayerInfo",
    "LayerOverride",
    "LayerPlan",
    "LayerReport",
    "Method",
    "ModelAnalysis",
    "Plan",
    "RankPolicy",
    "RankfoldError",
    "Tucker2CPMethod",
    "analyze",
    "decompose",
    "get_method",
    "plan_cost",
    "register_method",
    "restructure",
    "select_ranks",
    "trace",
]
