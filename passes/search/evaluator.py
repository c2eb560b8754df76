"""Trial evaluation: build a model from cached blocks, recalibrate it, score it on the proxy."""

from __future__ import annotations

import copy
import hashlib
import multiprocessing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rankfold.passes.analysis import ModelAnalysis
from rankfold.passes.capture import recompiled
from rankfold.passes.layout import conv_layout, fast_layout
from rankfold.passes.methods import Method, Ranks
from rankfold.passes.plan import Choices, PlanDraft
from rankfold.passes.recalibrate import correct_bias, has_batchnorm, recalibrate_bn
from rankfold.passes.search.cache import DecompositionCache
from rankfold.passes.search.calibration import Calibration
from rankfold.passes.search.config import SearchConfig

if TYPE_CHECKING:
    from rankfold.passes.selectors.base import PlanningContext


class Evaluator:
    """Builds a model from per-layer choices out of the cache, recalibrates it and scores it.

    Scores on the calibration proxy split: accuracy, top-1 agreement with the original model and
    the KL divergence from the original's predictive distribution (knowledge-distillation loss).
    """

    def __init__(
        self,
        gm: nn.Module,
        analysis: ModelAnalysis,
        calibration: Calibration,
        cache: DecompositionCache,
        reference_logits: torch.Tensor | None = None,
    ) -> None:
        self.original = copy.deepcopy(gm).eval()  # private: the layout change must not leak
        self.original.to(memory_format=conv_layout())
        self.analysis = analysis
        self.calibration = calibration
        self.cache = cache
        self.uses_bn = has_batchnorm(self.original)
        if reference_logits is None:
            reference_logits = self.logits(self.original)
        self.reference = reference_logits
        self.reference_log_probs = F.log_softmax(reference_logits.double(), dim=1)

    def build(self, choices: Mapping[str, tuple[Method, Ranks]]) -> nn.Module:
        """A copy of the original with each named layer replaced by its cached block."""
        model = copy.deepcopy(self.original)
        for name, (method, ranks) in choices.items():
            original = self.original.get_submodule(name)
            block, _ = self.cache.block(original, self.analysis.layer(name), method, ranks)
            model.set_submodule(name, block.to(memory_format=conv_layout()))
        return recompiled(model).eval()

    def recalibrate(self, model: nn.Module, names: Sequence[str]) -> None:
        """BatchNorm statistics on the recalibration split; bias correction without BatchNorm."""
        if self.uses_bn:
            recalibrate_bn(model, self.calibration.bn_batches())
        elif names:
            correct_bias(self.original, model, list(names), self.calibration.bn_batches())

    def logits(self, model: nn.Module) -> torch.Tensor:
        calibration = self.calibration
        outputs = []
        model.eval()
        with torch.no_grad():
            for start in range(0, len(calibration.inputs), calibration.batch_size):
                x = fast_layout(calibration.inputs[start : start + calibration.batch_size])
                outputs.append(model(x).detach().float())
        return torch.cat(outputs)

    def score(self, model: nn.Module) -> dict[str, float]:
        logits = self.logits(model)
        predictions = logits.argmax(dim=1)
        log_probs = F.log_softmax(logits.double(), dim=1)
        kd = F.kl_div(log_probs, self.reference_log_probs, log_target=True, reduction="batchmean")
        return {
            "accuracy": float((predictions == self.calibration.labels).double().mean()),
            "agreement": float((predictions == self.reference.argmax(dim=1)).double().mean()),
            "kd": float(kd),
        }

    def evaluate(
        self, choices: Mapping[str, tuple[Method, Ranks]], raw: bool = False
    ) -> dict[str, float]:
        """Scores after recalibration; with `raw`, also the accuracy before it (`raw_accuracy`)."""
        model = self.build(choices)
        scores = {}
        if raw:
            scores["raw_accuracy"] = self.score(model)["accuracy"]
        self.recalibrate(model, list(choices))
        return {**self.score(model), **scores}


def proxy_value(scores: Mapping[str, float], proxy: str) -> float:
    """The number a search maximises: accuracy, agreement, or minus the KD loss."""
    return -scores["kd"] if proxy == "kd" else scores[proxy]


def slot_choices(draft: PlanDraft, choices: Choices) -> dict[str, tuple[Method, Ranks]]:
    return {
        slot.layer.name: (slot.method, ranks)
        for slot, ranks in zip(draft.slots, choices, strict=True)
        if ranks is not None
    }


def weights_digest(gm: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(gm.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class SearchContext:
    """Everything a search process needs; pickled to worker processes."""

    gm: nn.Module
    analysis: ModelAnalysis
    draft: PlanDraft
    calibration: Calibration
    search: SearchConfig
    cache: DecompositionCache  # on disk, so worker processes share it
    threads: int
    reference_logits: torch.Tensor | None = None

    @classmethod
    def of(cls, draft: PlanDraft, planning: PlanningContext) -> SearchContext:
        """The search's view of a planning context (the calibration data was checked present)."""
        return cls(
            gm=planning.gm,
            analysis=draft.analysis,
            draft=draft,
            calibration=planning.calibration,
            search=planning.search,
            cache=planning.cache,
            threads=torch.get_num_threads(),
        )

    @property
    def seed(self) -> int:
        """The factorization seed (the sampler's seeds derive from it too)."""
        return self.cache.seed

    def evaluator(self) -> Evaluator:
        evaluator = Evaluator(
            self.gm, self.analysis, self.calibration, self.cache, self.reference_logits
        )
        self.reference_logits = evaluator.reference
        return evaluator


def spawn_context() -> multiprocessing.context.SpawnContext:
    # Fresh interpreters: forking a process that has run torch's thread pools can hang.
    return multiprocessing.get_context("spawn")
