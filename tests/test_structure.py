"""The package's layering (docs/architecture.md): lower rooms never import higher ones.

Every import statement counts, including those inside functions, so a lazy import cannot
hide a dependency the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "quantcli"

# room -> module prefixes it must not import
FORBIDDEN = {
    "calibrate": ("quantcli.quantize", "quantcli.search", "quantcli.cli", "quantcli.cluster"),
    "data": ("quantcli.quantize", "quantcli.calibrate", "quantcli.search", "quantcli.cli"),
    "graph": ("quantcli.quantize", "quantcli.calibrate", "quantcli.search", "quantcli.cli"),
    "quantize/math": ("quantcli.", "onnx", "onnx_ir", "onnxruntime"),
    "quantize/int8": ("quantcli.quantize.int4", "quantcli.search", "quantcli.cli"),
    "quantize/int4": ("quantcli.quantize.int8", "quantcli.search", "quantcli.cli"),
    "evaluate": ("quantcli.search", "quantcli.cli", "quantcli.cluster"),
    "search": ("quantcli.cli",),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_rules_cover_real_files() -> None:
    for room in FORBIDDEN:
        assert list((PACKAGE / room).glob("*.py")), room


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_does_not_import_higher_layers(room: str) -> None:
    bad = []
    for path in sorted((PACKAGE / room).rglob("*.py")):
        for name in imported_modules(path):
            own = name.startswith("quantcli." + room.replace("/", "."))
            if not own and any(name.startswith(p) for p in FORBIDDEN[room]):
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, "\n".join(bad)


def test_checker_sees_lazy_imports(tmp_path: Path) -> None:
    """The scan would catch an import placed inside a function."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from quantcli.quantize.int8.plan import Plan\n")
    assert "quantcli.quantize.int8.plan" in imported_modules(module)


def test_only_the_cluster_package_imports_ray_and_no_layer_below_imports_it() -> None:
    below = ("calibrate", "evaluate", "data", "graph", "quantize")
    for path in sorted(PACKAGE.rglob("*.py")):
        names = imported_modules(path)
        room = path.relative_to(PACKAGE).parts[0]
        if room != "cluster":
            assert not any(n == "ray" or n.startswith("ray.") for n in names), path
        if room in below:
            assert not any(n.startswith("quantcli.cluster") for n in names), path
    # and quantcli.cluster itself imports ray only inside functions, when asked for a cluster
    for path in sorted((PACKAGE / "cluster").glob("*.py")):
        top = ast.parse(path.read_text()).body
        module_level = {
            alias.name
            for node in top
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        } | {node.module for node in top if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(n == "ray" or n.startswith("ray.") for n in module_level), path
