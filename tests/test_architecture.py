"""The architecture holds: imports run one way, methods and selectors are plug-ins."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from rankfold.passes import PlanningContext, RankPolicy, analyze, select_ranks, trace
from rankfold.passes.core import ConfigError
from rankfold.passes.methods import METHODS, SVDMethod
from rankfold.passes.plan import PlanDraft
from rankfold.passes.selectors import SELECTORS, Choice, Selector

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("converter", "runtime", "passes", "models")
BASICS = "passes.core"  # errors, atomic writes, hardware facts: importable from everywhere
# converter → runtime → passes, converter → models; every sub-package may use the basics.
ALLOWED = {
    "converter": {"converter", "runtime", "passes", "models"},
    "runtime": {"runtime", "passes"},
    "passes": {"passes"},
    "models": {"models"},
}


def _rankfold_imports(path: Path) -> set[str]:
    """Every `rankfold.X[.Y]` a module imports, at any depth (TYPE_CHECKING blocks included:
    a type-only import is still a dependency of the code that reads it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n.removeprefix("rankfold.") for n in names if n.startswith("rankfold."))
    return found


def _modules() -> dict[str, Path]:
    return {
        f"{package}/{path.relative_to(ROOT / package)}": path
        for package in SUBPACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def test_imports_run_one_way():
    wrong = []
    for name, path in _modules().items():
        package = name.split("/")[0]
        for target in _rankfold_imports(path):
            if target == BASICS or target.startswith(BASICS + "."):
                continue
            if target.split(".")[0] not in ALLOWED[package]:
                wrong.append(f"{name} imports rankfold.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_basics_module_imports_nothing_of_rankfold():
    assert _rankfold_imports(ROOT / "passes" / "core.py") == set()


def test_no_import_cycle_between_subpackages():
    edges = {package: set() for package in SUBPACKAGES}
    for name, path in _modules().items():
        for target in _rankfold_imports(path):
            if target != BASICS and not target.startswith(BASICS + "."):
                edges[name.split("/")[0]].add(target.split(".")[0])
    for a in SUBPACKAGES:
        for b in edges[a] - {a}:
            assert a not in edges[b], f"{a} and {b} import each other"


def test_every_registered_method_and_selector_is_tested_by_name():
    """A guard: each built-in plug-in is exercised somewhere in the suite."""
    text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for name in [*METHODS, *SELECTORS]:
        if name == "svd-plugin":
            continue
        assert f'"{name}"' in text, f"nothing in tests/ names '{name}'"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class _HalfRanks(Selector):
    """Every layer at its candidate halfway up the ladder (a stand-in for a user's selector)."""

    name = "half"
    summary = "the middle candidate of each layer"
    needs_kernels = False

    def choose(self, draft: PlanDraft, context: PlanningContext, advance) -> Choice:
        ladders = [slot.candidates() for slot in draft.slots]
        return Choice([ladder[len(ladder) // 2] for ladder in ladders], ["half"] * len(ladders))


def test_a_selector_is_one_class_registered_by_name(monkeypatch):
    monkeypatch.setitem(SELECTORS, "half", _HalfRanks())
    gm = trace(_Net().eval(), torch.zeros(1, 3, 8, 8))
    analysis = analyze(gm)
    selection = select_ranks(analysis, RankPolicy(method="tucker2", select="half"))
    layers = {layer.name: layer for layer in analysis.layers}
    for entry in selection.plan.layers:
        ladder = METHODS["tucker2"].candidates(layers[entry.name])
        shrinking = [c for c in ladder if METHODS["tucker2"].shrinks(layers[entry.name], c)]
        assert tuple(entry.ranks) == shrinking[len(shrinking) // 2]
    assert selection.selector == "half" and selection.macs < analysis.total_macs
    with pytest.raises(ConfigError, match="unknown rank selector 'hlf' .did you mean 'half'"):
        select_ranks(analysis, RankPolicy(select="hlf"))


PLUGIN = '''
from rankfold.passes.methods import SVDMethod


class PluginSVD(SVDMethod):
    """SVD registered by a third-party package."""

    name = "svd-plugin"


class Broken:
    """Not a Method: listed as failed, and the rest keeps working."""
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """A small package that declares a method entry point, installed with pip into a folder."""
    root = tmp_path_factory.mktemp("plugin")
    package = root / "src"
    (package / "rf_plugin").mkdir(parents=True)
    (package / "rf_plugin" / "__init__.py").write_text(PLUGIN)
    (package / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "rf-plugin"
            version = "0.1"

            [project.entry-points."rankfold.methods"]
            svd-plugin = "rf_plugin:PluginSVD"
            broken = "rf_plugin:Broken"
            """
        )
    )
    site = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        capture_output=True,
    )
    return site


# Runs several CLI command lines in one process (each fresh interpreter pays seconds of
# imports) and prints, as JSON, each one's exit code, stdout and stderr.
CLI_RUNS = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from rankfold.converter.cli import main
    results = []
    for args in json.loads(sys.argv[1]):
        stdout, stderr = io.StringIO(), io.StringIO()
        sys.argv = ["rankfold", *args]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code
        results.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
    print(json.dumps(results))
    """
)


def _rankfold(site: Path, *command_lines: list[str], cwd: Path) -> list[dict]:
    """Each command line's {code, stdout, stderr}, run in one process that sees `site`."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", CLI_RUNS, json.dumps(command_lines)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_method_from_an_installed_package_lists_and_runs_from_the_cli(plugin_site, tmp_path):
    out = tmp_path / "out"
    compress = ["compress", "digits-cnn", "--rank", "4", "--no-latency", "--method"]
    listed, run, broken = _rankfold(
        plugin_site,
        ["methods"],
        [*compress, "svd-plugin", "--out", str(out)],
        [*compress, "broken", "--out", str(tmp_path / "b")],
        cwd=tmp_path,
    )
    assert listed["code"] == 0, listed["stderr"]
    assert "svd-plugin" in listed["stdout"]
    assert "SVD registered by a third-party" in listed["stdout"]
    assert "broken" in listed["stdout"] and "not a rankfold Method" in listed["stdout"]
    assert run["code"] == 0, run["stderr"]
    report = json.loads((out / "report.json").read_text())
    decomposed = [row for row in report["layers"] if row["status"] == "decomposed"]
    # A Linear layer is a matrix: every method hands it to svd (method_for_layer).
    assert {row["type"]: row["method"] for row in decomposed} == {
        "Conv2d": "svd-plugin",
        "Linear": "svd",
    }
    assert all(row["rank"] == [4] for row in decomposed)
    assert report["onnx"]["parity_passed"] and report["macs_reduction"] > 1.0
    assert broken["code"] == 1
    assert "method 'broken' failed to load" in broken["stderr"]
    assert "Traceback" not in broken["stderr"]


def test_method_settings_key_the_cache():
    from rankfold.passes.methods import CPEPCMethod
    from rankfold.passes.search import DecompositionCache

    conv = nn.Conv2d(4, 6, 3)
    cache = DecompositionCache(None)
    keys = {cache.key(conv, CPEPCMethod(max_sweeps=sweeps), (3,)) for sweeps in (10, 20, 10)}
    assert len(keys) == 2
    assert cache.key(conv, SVDMethod(), (3,)) not in keys


def test_every_subpackage_is_packaged():
    """A folder with an __init__.py that pyproject does not list would be missing from wheels."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        "rankfold." + str(init.parent.relative_to(ROOT)).replace("/", ".")
        for package in SUBPACKAGES
        for init in (ROOT / package).rglob("__init__.py")
    }
    assert found == set(setuptools["packages"])
    for name in found:
        folder = name.removeprefix("rankfold.").replace(".", "/")
        assert setuptools["package-dir"][name] == folder
