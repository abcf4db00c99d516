"""The package's layers import downward only (the table at the top of ``entrorl/__init__.py``): a module may import
from its own layer or a lower one, never from a higher one, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"

# the first component under ``entrorl`` -> its layer
LAYER_OF_PACKAGE = {
    "_checks": 0, "_files": 0, "tokens": 0, "dynamics": 0,
    "advantages": 1, "objective": 1,
    "modeling": 2, "rollout": 2, "rewards": 2, "data": 2, "evaluation": 2,
    "trainer": 3, "analysis": 3,
    "lab": 4, "integrations": 4, "cli": 4, "__main__": 4,
}
# the package root re-exports layers 0 and 1 (and holds ``__version__``)
ROOT_LAYER = 1


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts == ["entrorl"]:
        return ROOT_LAYER
    try:
        return LAYER_OF_PACKAGE[parts[1]]
    except KeyError:
        raise AssertionError(f"{module} belongs to no layer: add its package to LAYER_OF_PACKAGE") from None


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_entrorl_modules(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(module, line)`` for every import of an entrorl module in ``source`` (the text of ``module``), relative ones
    resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "entrorl"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                imported = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "entrorl":
                imported = node.module
            else:
                continue
            # ``from entrorl import trainer`` imports the subpackage, ``from entrorl import build_objective`` a name
            found += [(f"{imported}.{alias.name}" if _is_module(f"{imported}.{alias.name}") else imported, node.lineno)
                      for alias in node.names]
    return found


def _is_module(name: str) -> bool:
    path = SOURCE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    return [f"line {line}: {imported} (layer {layer_of(imported)})"
            for imported, line in imported_entrorl_modules(source, module, is_package)
            if layer_of(imported) > layer_of(module)]


SOURCES = sorted((SOURCE / "entrorl").rglob("*.py"))


def test_every_source_file_is_checked():
    assert len(SOURCES) > 50
    for path in SOURCES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(SOURCE)))
def test_imports_point_downward_only(path):
    module = module_name(path)
    upward = upward_imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    assert not upward, f"{module} (layer {layer_of(module)}) imports upward: {'; '.join(upward)}"


def test_upward_imports_are_found_at_module_level_in_functions_and_relative():
    source = (
        "from entrorl.tokens import token_stats\n"         # down: fine
        "from entrorl.trainer import Trainer\n"            # up, absolute
        "def f():\n"
        "    import entrorl.lab.runner\n"                   # up, inside a function
        "    from ..rollout import sampler\n"               # up, relative from entrorl.objective.core
        "    from . import surrogates\n"                    # same layer
    )
    found = upward_imports(source, "entrorl.objective.core")
    assert found == ["line 2: entrorl.trainer (layer 3)", "line 4: entrorl.lab.runner (layer 4)",
                     "line 5: entrorl.rollout.sampler (layer 2)"]
    assert upward_imports("from . import loop\n", "entrorl.trainer", is_package=True) == []
    # a subpackage imported by name from its parent
    assert upward_imports("from entrorl import trainer, build_objective\n", "entrorl.objective.core") == [
        "line 1: entrorl.trainer (layer 3)"]
    assert upward_imports("def f():\n    from .. import lab\n", "entrorl.objective.core") == ["line 2: entrorl.lab (layer 4)"]
