"""Data-aware decomposition: layer statistics, the whitened fits, and their errors."""

from __future__ import annotations

import tracemalloc
from functools import partial

import numpy as np
import pytest
import torch
from planning_helpers import compress_digits
from torch import nn

from rankfold.passes import analyze, get_method, trace
from rankfold.passes.blocks import block_kernel
from rankfold.passes.core import ConfigError
from rankfold.passes.methods import CPEPCMethod, Tucker2CPMethod
from rankfold.passes.search.cache import DecompositionCache
from rankfold.passes.statistics import (
    InputMoment,
    LayerStatistics,
    Whitening,
    collect_statistics,
)

# Small settings keep EPC-based methods fast; they change the fit, not the wiring under test.
METHODS = {
    "svd": (get_method("svd"), (5,)),
    "tucker2": (get_method("tucker2"), (6, 4)),
    "cp": (get_method("cp"), (10,)),
    "cp-epc": (CPEPCMethod(max_sweeps=30), (10,)),
    "tucker2-cp": (Tucker2CPMethod(max_sweeps=30), (8, 6, 10)),
    "cp-lrf": (get_method("cp-lrf"), (10, 5, 6)),
}


def single_layer(layer: nn.Module, shape: tuple[int, ...]):
    gm = trace(nn.Sequential(layer), torch.zeros(1, *shape), [])
    info = analyze(gm).layers[0]
    return gm, info, gm.get_submodule(info.name)


def fitted(cache: DecompositionCache, module, info, method, ranks) -> tuple[nn.Module, object]:
    block, entry = cache.block(module, info, method, ranks)
    return block, entry


def test_whitened_svd_is_the_output_optimum_and_beats_plain_svd():
    # A Linear 64→32 fed inputs on a planted 6-dimensional subspace (plus faint noise).
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    gm, info, module = single_layer(nn.Linear(64, 32), (64,))
    basis = rng.standard_normal((64, 6))
    x = rng.standard_normal((4000, 6)) @ basis.T + 1e-3 * rng.standard_normal((4000, 64))
    moment = x.T @ x / len(x)
    stats = LayerStatistics({info.name: InputMoment(moment, len(x))}, len(x), damping=0.0)
    rank = 6
    cache = DecompositionCache(None, 0, stats)
    block, entry = fitted(cache, module, info, get_method("svd"), (rank,))
    plain, plain_entry = fitted(cache.weight_only(), module, info, get_method("svd"), (rank,))
    w = module.weight.detach().double().numpy()

    def output_error(approx: np.ndarray) -> float:  # measured on the samples themselves
        return float(np.linalg.norm((w - approx) @ x.T) / np.linalg.norm(w @ x.T))

    whitened_error = output_error(block_kernel(block))
    plain_error = output_error(block_kernel(plain))
    # The closed-form optimum: the output projected on the top singular vectors of W·L
    # (Eckart–Young on W·X), whose error is the tail of W·X's spectrum.
    u, sigma, _ = np.linalg.svd(w @ x.T, full_matrices=False)
    optimum = u[:, :rank] @ u[:, :rank].T @ w
    tail = float(np.sqrt(np.sum(sigma[rank:] ** 2)) / np.sqrt(np.sum(sigma**2)))
    assert whitened_error == pytest.approx(tail, rel=1e-3)
    assert np.allclose(block_kernel(block), optimum, atol=1e-5)
    assert entry.extras["output_error"] == pytest.approx(tail, rel=1e-3)
    assert plain_error > 200 * whitened_error  # 0.5 vs 1e-3 here
    # The plain fit is the better one in the weight metric it optimises.
    assert plain_entry.rel_error < entry.rel_error


@pytest.mark.parametrize("name", list(METHODS))
def test_identity_statistics_reproduce_the_weight_only_fit(name):
    torch.manual_seed(1)
    method, ranks = METHODS[name]
    gm, info, module = single_layer(nn.Conv2d(8, 12, 3, padding=1), (8, 6, 6))
    stats = LayerStatistics({info.name: InputMoment(np.eye(8), 100)}, 10)  # damping 0.01
    aware, _ = fitted(DecompositionCache(None, 0, stats), module, info, method, ranks)
    plain, _ = fitted(DecompositionCache(None, 0), module, info, method, ranks)
    for key, value in plain.state_dict().items():
        assert torch.equal(aware.state_dict()[key], value), key


def test_data_aware_and_weight_only_entries_never_mix():
    gm, info, module = single_layer(nn.Conv2d(8, 12, 3, padding=1), (8, 6, 6))
    stats = LayerStatistics({info.name: InputMoment(np.eye(8), 100)}, 10)
    cache = DecompositionCache(None, 0, stats)
    method, ranks = METHODS["tucker2"]
    cache.get(module, info, method, ranks)
    cache.weight_only().get(module, info, method, ranks)
    assert (cache.misses, cache.hits) == (1, 0)
    assert len(cache._memory) == 2


def correlated_conv(seed: int):
    """A 3×3 conv 16→24 and an input moment with 3 dominant directions."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gm, info, module = single_layer(nn.Conv2d(16, 24, 3, padding=1), (16, 6, 6))
    mix = rng.standard_normal((16, 3))
    moment = mix @ mix.T + 0.02 * np.eye(16)
    return info, module, LayerStatistics({info.name: InputMoment(moment, 1000)}, 10)


@pytest.mark.parametrize("name", list(METHODS))
def test_data_aware_fit_lowers_the_output_error_on_correlated_inputs(name):
    method, ranks = METHODS[name]
    info, module, stats = correlated_conv(2)
    whitening = stats.whitening(info.name)
    kernel = module.weight.detach().double().numpy()
    cache = DecompositionCache(None, 0, stats)
    aware, entry = fitted(cache, module, info, method, ranks)
    plain, _ = fitted(cache.weight_only(), module, info, method, ranks)
    aware_error = whitening.output_error(kernel, block_kernel(aware))
    plain_error = whitening.output_error(kernel, block_kernel(plain))
    assert entry.extras["output_error"] == pytest.approx(aware_error, rel=1e-6)
    # Measured here: 0.50-0.68 data-aware against 0.76-0.91 weight-only.
    assert aware_error < 0.9 * plain_error


def test_block_kernel_is_what_the_block_computes():
    info, module, stats = correlated_conv(3)
    for name, (method, ranks) in METHODS.items():
        block, _ = fitted(DecompositionCache(None, 0, stats), module, info, method, ranks)
        x = torch.randn(2, 16, 6, 6)
        dense = nn.functional.conv2d(x, torch.from_numpy(block_kernel(block)).float(), padding=1)
        with torch.no_grad():
            expected = block(x) - module.bias[None, :, None, None]
        assert torch.allclose(dense, expected, atol=1e-5), name


def test_statistics_pass_measures_the_input_moment():
    torch.manual_seed(4)
    layers = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(80, 4))
    gm = trace(layers, torch.zeros(1, 3, 4, 4), [])
    batches = [torch.randn(7, 3, 4, 4) for _ in range(3)]
    seen = []
    stats = collect_statistics(gm, ["0", "3"], batches, 21, progress=lambda: seen.append(1))
    x = torch.cat(batches).double()
    conv_vectors = x.permute(1, 0, 2, 3).reshape(3, -1)
    assert np.allclose(stats.moments["0"].moment, (conv_vectors @ conv_vectors.T / 21 / 16).numpy())
    with torch.no_grad():
        hidden = torch.relu(layers[0](torch.cat(batches))).flatten(1).double()
    assert np.allclose(stats.moments["3"].moment, (hidden.T @ hidden / 21).numpy(), atol=1e-6)
    assert stats.moments["0"].count == 21 * 16 and len(seen) == 3


def test_statistics_pass_stays_within_its_memory_budget_on_a_wide_layer():
    # 512 channels at 32×32, batch 4: one batch in float64 would be 16 MiB; the budget is 4 MiB
    # (2 MiB of them the 512×512 accumulator).
    conv = nn.Conv2d(512, 8, 1)
    gm = trace(nn.Sequential(conv), torch.zeros(1, 512, 32, 32), [])
    inputs = [torch.randn(4, 512, 32, 32) for _ in range(2)]
    budget = 4 << 20
    tracemalloc.start()  # NumPy reports its buffers to tracemalloc; torch's are the model's
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        stats = collect_statistics(gm, ["0"], inputs, 8, memory_bytes=budget)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak <= budget
    x = torch.cat(inputs).double().permute(1, 0, 2, 3).reshape(512, -1)
    assert np.allclose(stats.moments["0"].moment, (x @ x.T / x.shape[1]).numpy(), atol=1e-8)
    with pytest.raises(ConfigError, match="over the budget"):
        collect_statistics(gm, ["0"], inputs, 8, memory_bytes=2 << 20)


def test_whitening_maps_the_first_stage_back():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((6, 6))
    whitening = Whitening.from_moment(a @ a.T, 0.01)
    weight = rng.standard_normal((4, 6, 3, 3))
    assert np.allclose(whitening.restore(whitening.transform(weight)), weight)
    assert not whitening.is_scalar and Whitening.from_moment(2 * np.eye(6), 0.01).is_scalar


def test_compress_fits_data_aware_with_training_data_and_not_without(tmp_path):
    from rankfold.models.digits import digits_splits

    _, test = digits_splits()
    np.savez(tmp_path / "digits.npz", x=test.x[:128], y=test.y[:128])
    settings = {
        "model": "digits-cnn",
        "ranks": {"method": "svd", "macs_reduction": 2},
        "train_data": str(tmp_path / "digits.npz"),
        "recalibrate": False,
        "refit": False,  # the fits alone
        "latency": {"enabled": False},
        "search": {"cache_dir": str(tmp_path / "cache")},
    }

    run = partial(compress_digits, settings)

    aware = run(statistics={"data_aware": True, "samples": 128})
    rows = [row for row in aware.decomposition.layers if row.status == "decomposed"]
    assert rows and aware.statistics.statistics.images == 128
    assert not aware.statistics.from_cache
    for row in rows:
        if aware.analysis.layer(row.name).in_features == 1:  # a scalar metric: the same fit
            assert row.output_error == pytest.approx(row.weight_only_output_error, rel=1e-12)
        else:
            assert row.output_error < row.weight_only_output_error
        assert row.rel_error >= row.weight_only_rel_error - 1e-6  # it fits another metric
    again = run(statistics={"data_aware": True, "samples": 128})
    assert again.statistics.from_cache
    assert [r.output_error for r in again.decomposition.layers] == [
        r.output_error for r in aware.decomposition.layers
    ]
    plain = run()  # data-aware fits are opt-in
    assert plain.statistics is None
    for row, aware_row in zip(plain.decomposition.layers, aware.decomposition.layers):
        assert row.output_error is None and row.weight_only_output_error is None
        if row.status == "decomposed":
            assert row.rel_error == pytest.approx(aware_row.weight_only_rel_error, rel=1e-9)
