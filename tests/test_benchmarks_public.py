"""Benchmarks call the product: no script under benchmarks/ reaches into a private name.

A figure in BENCHMARKS.md must be what `rankfold compress` or the public API gives, so the
scripts may import only public names (no `_`-prefixed module, name or attribute of rankfold),
and each must answer `--help` without doing benchmark work.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None when the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def private_uses(source: str, filename: str = "<script>") -> list[str]:
    """Each private rankfold import or attribute access in `source`, as 'line: what'."""
    tree = ast.parse(source, filename)
    found: list[tuple[int, str]] = []
    bound: set[str] = set()  # local names that refer to something imported from rankfold
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] != "rankfold":
                    continue
                bound.add(alias.asname or "rankfold")
                if any(_private(p) for p in parts):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "rankfold":
                continue
            if any(_private(p) for p in parts):
                found.append((node.lineno, f"from {node.module} import ..."))
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _dotted(node)
            if chain is not None and chain[0] in bound:
                found.append((node.lineno, ".".join(chain)))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_the_checker_sees_every_kind_of_private_use() -> None:
    source = "\n".join(
        [
            "import rankfold.passes._hidden",
            "from rankfold.converter._impl import thing",
            "from rankfold.passes import _helper",
            "import rankfold",
            "rankfold.passes.core._secret()",
            "from rankfold.passes import methods as m",
            "m._registry",
            "from os import _exit",  # not rankfold: allowed
            "rankfold.__name__",  # dunder: allowed
        ]
    )
    assert [use.split(":")[0] for use in private_uses(source)] == ["1", "2", "3", "5", "7"]


def test_benchmarks_exist() -> None:
    assert len(SCRIPTS) >= 7, [p.name for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_uses_only_public_names(script: Path) -> None:
    assert private_uses(script.read_text(), str(script)) == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_help_runs(script: Path) -> None:
    # --help must parse arguments and exit before any data is read or work is done.
    env = {**os.environ, "RANKFOLD_DATA": "/nonexistent-rankfold-data"}
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
