"""No module outside the inference layer touches an underscore name of its objects: an AST check
over runtime/ (outside runtime/inference/), benchmarks/ and tests/.

The rule: the private names of slim.runtime.inference are the underscore names its modules define
(functions, classes, methods, module globals, attributes they assign, such as `self._ctx`).
Elsewhere, reading or writing `x.<one of them>` for any x but `self`/`cls`, getattr/setattr with one,
or importing one from the package is a violation. Dunder names are not private.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INFERENCE = ROOT / "runtime" / "inference"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def inference_private_names() -> set[str]:
    names: set[str] = set()
    for path in INFERENCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if _private(name)}


def violations(source: str, private: set[str]) -> list[str]:
    """`line: what` for every touch of an inference private name in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in private:
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner not in ("self", "cls"):
                found.append(f"{node.lineno}: .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
        ):
            target, name = node.args[0], node.args[1]
            if (
                isinstance(name, ast.Constant)
                and name.value in private
                and not (isinstance(target, ast.Name) and target.id in ("self", "cls"))
            ):
                found.append(f"{node.lineno}: {node.func.id}(..., {name.value!r})")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slim.runtime.inference"):
            found += [f"{node.lineno}: import {alias.name}" for alias in node.names if _private(alias.name)]
    return found


def checked_files() -> list[Path]:
    runtime = [p for p in (ROOT / "runtime").rglob("*.py") if INFERENCE not in p.parents]
    return sorted(runtime + list((ROOT / "benchmarks").rglob("*.py")) + list((ROOT / "tests").rglob("*.py")))


def test_the_rule_catches_private_access() -> None:
    private = inference_private_names()
    assert {"_ctx", "_L", "_take_slot", "_release"} <= private
    source = (
        "from slim.runtime.inference.batching import _log_softmax\n"
        "model._ctx\nmodel.slots\nself._ctx\ngetattr(model, '_L')\nmodel.__class__\n"
    )
    assert violations(source, private) == ["1: import _log_softmax", "2: ._ctx", "5: getattr(..., '_L')"]


def test_nothing_outside_inference_touches_its_private_names() -> None:
    private = inference_private_names()
    found = {
        str(path.relative_to(ROOT)): hits
        for path in checked_files()
        if (hits := violations(path.read_text(encoding="utf-8"), private))
    }
    assert found == {}
