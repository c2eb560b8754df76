"""torch.fx passes: trace → analyze → select_ranks (a Plan) → decompose (new GraphModule, report).

Names are imported on first use (PEP 562), so `rankfold.passes.core` — the errors, atomic writes
and hardware facts every sub-package shares — loads without torch.
"""

from __future__ import annotations

from rankfold.passes.core import lazy_exports

_EXPORTS = {
    "LayerInfo": "analysis",
    "ModelAnalysis": "analysis",
    "analyze": "analysis",
    "DecompositionReport": "surgery",
    "LayerReport": "surgery",
    "decompose": "surgery",
    "restructure": "surgery",
    "RankfoldError": "core",
    "CPLRFMethod": "methods",
    "CPEPCMethod": "methods",
    "Tucker2CPMethod": "methods",
    "METHODS": "methods",
    "Method": "methods",
    "get_method": "methods",
    "register_method": "methods",
    "LayerOverride": "plan",
    "LayerPlan": "plan",
    "Plan": "plan",
    "RankPolicy": "plan",
    "plan_cost": "plan",
    "PlanningContext": "selectors",
    "SELECTORS": "selectors",
    "Selection": "planning",
    "Selector": "selectors",
    "register_selector": "selectors",
    "select_ranks": "planning",
    "trace": "tracing",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
