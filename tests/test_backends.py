"""rankfold.runtime.backends: one Backend per onnxruntime provider, and who may depend on it."""

from __future__ import annotations

import ast
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import rankfold.passes
from rankfold.converter.config import CompressConfig
from rankfold.converter.pipeline import backend_round_to
from rankfold.passes.core import ConfigError, ProviderError
from rankfold.runtime import BACKENDS, Backend, create_session, get_backend
from rankfold.runtime.backends import cpu

PASSES = Path(rankfold.passes.__file__).parent


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each registered backend; one this machine cannot run is skipped with its one-line reason."""
    chosen = get_backend(request.param)
    try:
        chosen.check()
    except ProviderError as exc:
        pytest.skip(str(exc))
    return chosen


def identity_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "id", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_session_options_set_threads(backend: Backend) -> None:
    assert backend.session_options(3).intra_op_num_threads == 3
    assert backend.session_options().intra_op_num_threads == 0  # onnxruntime's default: all cores
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        backend.session_options(0)


def test_sessions_run_on_the_backends_provider(backend: Backend, tmp_path: Path) -> None:
    session = create_session(identity_onnx(tmp_path / "id.onnx"), backend.name, threads=1)
    assert session.get_providers()[0] == backend.providers[0]


def test_machine_id_names_what_timings_depend_on(backend: Backend) -> None:
    ident = backend.machine_id()
    assert {"cpu", "cores", "onnxruntime"} <= set(ident)
    assert ("gpu" in ident) == (backend.name == "cuda")


def test_channel_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    for flags, block in (({"avx512f", "avx2"}, 16), ({"avx2"}, 8), ({"sse4_2"}, None)):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert get_backend("cpu").channel_block() == block
    assert get_backend("cuda").channel_block() == 8  # without a GPU: planning needs none


def test_round_to_auto_takes_the_providers_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f"}))
    config = CompressConfig(model="m", latency={"provider": "cuda"})
    assert config.ranks.round_to == "auto"
    assert backend_round_to(config) == 8  # not this CPU's AVX-512 block
    assert backend_round_to(CompressConfig(model="m")) == 16
    explicit = {"ranks": {"round_to": 32, "macs_reduction": 2}, "latency": {"provider": "cuda"}}
    assert backend_round_to(CompressConfig(model="m", **explicit)) == 32
    assert backend_round_to(CompressConfig(model="m", ranks={"round_to": 0})) is None


def test_unknown_provider_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown execution provider 'tpu'; use one of: cpu"):
        CompressConfig(model="m", latency={"provider": "tpu"})


def test_passes_import_nothing_of_runtime() -> None:
    """Dependencies run converter → runtime → passes: the latency gate takes any table with
    `provider`, `layer_ms` and `block_ms` (a Protocol), not runtime's LatencyTable."""
    for path in PASSES.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.startswith("rankfold.runtime") for name in names), path
