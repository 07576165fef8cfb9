"""Lower layers never import higher ones (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "quantcli"
# layer -> packages it must not import
FORBIDDEN = {
    "calibrate": ("quantcli.quantize", "quantcli.search", "quantcli.cli", "quantcli.evaluate"),
    "data": ("quantcli.quantize", "quantcli.calibrate", "quantcli.search", "quantcli.cli"),
    "graph": ("quantcli.quantize", "quantcli.calibrate", "quantcli.search", "quantcli.cli"),
    "quantize": ("quantcli.search", "quantcli.cli"),
    "evaluate": ("quantcli.search", "quantcli.cli", "quantcli.calibrate"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer: str) -> None:
    bad = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in _imports(path)
        if name.startswith(FORBIDDEN[layer])
    ]
    assert not bad, bad
