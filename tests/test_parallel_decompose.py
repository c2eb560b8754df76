"""decompose on a thread pool (EPC in worker processes): the same blocks as one worker, progress
per layer, resumable."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from planning_helpers import plan_of
from torch import nn

from rankfold.passes import RankPolicy, analyze, decompose, surgery, trace
from rankfold.passes.search import DecompositionCache
from rankfold.passes.search.evaluator import spawn_context
from rankfold.passes.surgery import largest_first, pool_shape


def _model(depth: int = 3) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers = [nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
    for _ in range(depth - 3):
        layers += [nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
    layers += [nn.ReLU(), nn.Conv2d(16, 12, 3, padding=1)]
    return nn.Sequential(*layers).eval(), torch.randn(1, 8, 8, 8)


def test_pool_shape_never_oversubscribes_the_cores() -> None:
    assert pool_shape(jobs=10, cores=2) == (2, 1)
    assert pool_shape(jobs=1, cores=4) == (1, 1)
    assert pool_shape(jobs=3, cores=8) == (3, 1)
    for jobs in range(1, 9):
        workers, threads = pool_shape(jobs, cores=6)
        assert 1 <= workers <= jobs and workers * threads <= 6


@pytest.mark.parametrize("method", ["cp", "cp-epc"])
def test_parallel_blocks_equal_serial_ones_and_a_rerun_loads_them(
    tmp_path, monkeypatch, method
) -> None:
    # Four layers: two GIL-bound fills per worker start the worker processes.
    model, x = _model(depth=4 if method == "cp-epc" else 3)
    gm = trace(model, x)
    analysis = analyze(gm)
    plan = plan_of(analysis, RankPolicy(method=method, macs_reduction=2.0, round_to=None))
    serial, serial_report = decompose(gm, analysis, plan, cores=1)
    finished: list[str] = []
    cache = DecompositionCache(tmp_path, seed=0)
    spawned = []  # EPC's GIL-bound sweeps go to worker processes, ALS stays on threads
    monkeypatch.setattr(surgery, "spawn_context", lambda: spawned.append(1) or spawn_context())
    parallel, report = decompose(gm, analysis, plan, progress=finished.append, cache=cache, cores=2)
    assert len(spawned) == (method == "cp-epc")
    names = [entry.name for entry in plan.decomposed()]
    assert sorted(finished) == sorted(names) and len(names) == len(analysis.layers)
    for key, value in serial.state_dict().items():
        torch.testing.assert_close(parallel.state_dict()[key], value, rtol=0, atol=0)
    assert [r.rel_error for r in report.layers] == [r.rel_error for r in serial_report.layers]
    assert not any(row.from_cache for row in report.layers if row.status == "decomposed")
    # Every finished layer is on disk: a new run with the same plan factorizes nothing.
    again = DecompositionCache(tmp_path, seed=0)
    _, rerun = decompose(gm, analysis, plan, cache=again, cores=2)
    assert again.misses == 0 and again.hits == len(names)
    assert all(row.from_cache for row in rerun.layers if row.status == "decomposed")


def test_largest_layers_are_started_first() -> None:
    model, x = _model()
    gm = trace(model, x)
    analysis = analyze(gm)
    plan = plan_of(analysis, RankPolicy(method="cp", macs_reduction=2.0, round_to=None))
    layers = {layer.name: layer for layer in analysis.layers}
    order = [entry.name for entry in largest_first(plan.decomposed(), layers)]
    # By weights × rank: 16→16 (2304 weights), then 16→12 (1728), then 8→16 (1152).
    assert order == ["2", "4", "0"]


def test_worker_processes_load_no_torchvision_models() -> None:
    """A worker process imports the fill's module; torchvision's model zoo (a second per
    process) is loaded only where a model needs it, e.g. to split a Swin attention."""
    probe = (
        "import sys, rankfold.passes.surgery, rankfold.passes.analysis\n"
        "assert 'torchvision.models' not in sys.modules, 'loaded torchvision.models'\n"
        "from rankfold.passes.attention import SplitShiftedWindowAttentionV2 as split\n"
        "from torchvision.models.swin_transformer import ShiftedWindowAttentionV2\n"
        "assert issubclass(split, ShiftedWindowAttentionV2)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_compress_starts_the_worker_processes_before_exporting_and_decompose_uses_them(
    tmp_path, monkeypatch
) -> None:
    """cp-epc's worker processes load while original.onnx is exported; decompose fills in
    them instead of starting its own, with the blocks one worker makes."""
    import rankfold.converter.pipeline as pipeline
    from rankfold.converter import CompressConfig, compress

    events: list[str] = []
    real_export, real_pool = pipeline.export_original, surgery.worker_processes

    class Recorded(surgery.FillProcesses):
        def __init__(self, workers: int, spare_core: bool = False) -> None:
            events.append(f"start {workers}, a core spared" if spare_core else f"start {workers}")
            super().__init__(workers, spare_core)

        def close(self, cancel: bool = False) -> None:
            events.append("close")
            super().close(cancel)

    def export(*args):
        events.append("export")
        return real_export(*args)

    def pool(workers, gil_bound_fills, started=None):
        events.append("decompose in started processes" if started else "decompose")
        return real_pool(workers, gil_bound_fills, started)

    monkeypatch.setattr(pipeline, "FillProcesses", Recorded)
    monkeypatch.setattr(pipeline, "pool_shape", lambda jobs: (2, 1))
    monkeypatch.setattr(pipeline, "export_original", export)
    monkeypatch.setattr(surgery, "worker_processes", pool)
    model, x = _model(depth=4)
    config = CompressConfig(
        model="net",
        ranks=RankPolicy(method="cp-epc", macs_reduction=2.0, round_to=None),
        search={"cache_dir": tmp_path},
        latency={"enabled": False},
    )
    result = compress(model, x, config)
    assert events == ["start 2, a core spared", "export", "decompose in started processes", "close"]
    gm = trace(model, x)
    analysis = analyze(gm)
    _, serial = decompose(gm, analysis, result.plan, cores=1)
    assert [r.rel_error for r in result.decomposition.layers] == [
        r.rel_error for r in serial.layers
    ]

    # The error selector's searches fill in the same processes.
    events.clear()
    searched = config.ranks.model_copy(update={"select": "error"})
    compress(model, x, config.model_copy(update={"ranks": searched}))
    assert events == [
        "start 2, a core spared",
        "export",
        "decompose in started processes",  # the selector's binary searches
        "decompose in started processes",
        "close",
    ]

    # A refused export closes the processes it started beside.
    events.clear()

    def refused(*args):
        events.append("export")
        raise pipeline.ExportError("refused")

    monkeypatch.setattr(pipeline, "export_original", refused)
    with pytest.raises(pipeline.ExportError):
        compress(model, x, config)
    assert events == ["start 2, a core spared", "export", "close"]

    # cp holds no GIL: no processes.
    events.clear()
    monkeypatch.setattr(pipeline, "export_original", export)
    compress(
        model,
        x,
        config.model_copy(update={"ranks": config.ranks.model_copy(update={"method": "cp"})}),
    )
    assert events == ["export", "decompose"]
