"""The layering the folder tree promises, read from the imports: the pure core imports no vLLM and nothing
above it; model code and kernels never import the reference backend (it is the oracle they are checked against)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_oprm"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    package = ["vllm_oprm", *path.parent.relative_to(PACKAGE).parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.update([module] if node.module else [f"{module}.{alias.name}" for alias in node.names])
    return names


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("core", ("vllm", "vllm_oprm.models", "vllm_oprm.engine", "vllm_oprm.reference", "vllm_oprm.entrypoints")),
        ("models", ("vllm_oprm.reference",)),
        ("ops", ("vllm_oprm.reference",)),
    ],
)
def test_layer_imports_nothing_above_it(layer, forbidden):
    offending = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in (PACKAGE / layer).rglob("*.py")
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }
    assert not offending, sorted(offending)
