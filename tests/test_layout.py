"""The layers of slim.runtime import downwards only (the table in runtime/__init__.py).

Every import of a slim module, at the top of a file or inside a function, is read with `ast`, so a
lazy import that goes upwards is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Rank of each part of slim.runtime: a module may import its own rank or lower. pipeline and train
# share a rank (pruning heals by distillation; training ends in convert).
RANKS = {
    "files": 0,
    "formats": 1,
    "store": 1,
    "inference": 2,
    "pipeline": 3,
    "train": 3,
    "serve": 4,
    "cli": 5,
    "commands": 5,
}


def part_of(module: str) -> str | None:
    """The runtime part a dotted slim module name belongs to; None outside slim.runtime."""
    names = module.split(".")
    if names[:2] != ["slim", "runtime"]:
        return None
    return names[2] if len(names) > 2 else ""


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every slim module a file imports, `from slim.x import y` as slim.x.y
    when y is a module of the package (as in `from slim.runtime import store`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("slim")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("slim"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                package = ROOT / Path(*submodule.split(".")[1:])
                is_module = package.is_dir() or package.with_suffix(".py").exists()
                found.append((node.lineno, submodule if is_module else node.module))
    return found


def runtime_files() -> list[Path]:
    return sorted((ROOT / "runtime").rglob("*.py"))


@pytest.mark.parametrize("path", runtime_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_runtime_imports_point_downwards(path: Path) -> None:
    relative = path.relative_to(ROOT / "runtime")
    own = relative.parts[0].removesuffix(".py")
    if own == "__init__":
        return  # the package docstring only
    assert own in RANKS, f"runtime/{relative} is in no layer: add its folder to RANKS and runtime/__init__.py"
    upward = []
    for line, module in imported_modules(path):
        part = part_of(module)
        if part and RANKS.get(part, 99) > RANKS[own]:
            upward.append(f"line {line}: {module} ({part} is above {own})")
    assert not upward, f"runtime/{relative} imports upwards:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", ["kernels", "models"])
def test_kernels_and_models_do_not_import_the_runtime(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")):
        runtime = [f"{path.name}:{line} {m}" for line, m in imported_modules(path) if part_of(m) is not None]
        assert not runtime, f"{package} must stand below slim.runtime: {runtime}"
