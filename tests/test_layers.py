"""Imports point down: cli -> tools -> stages (teacher, student) -> config -> cache -> data/modeling/dist/errors.

Every `from ..x import` / `import pikv_offline.x` in the package, top-level or inside a function, is
read with ast and checked against the layer of the importing module; the two stages never import
each other. A module in no layer fails the test, so a new module has to be placed.
"""

from __future__ import annotations

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "pikv_offline")
LAYERS = {  # higher may import lower (or the same layer), never higher
    "errors": 0, "lock": 1, "storage": 1, "faults": 1, "dist": 1, "modeling": 1, "data": 1,
    "cache": 2, "config": 3, "teacher": 4, "student": 4, "tools": 5, "cli": 6, "__main__": 6, "__init__": 0,
}


def _unit(parts: list[str]) -> str:
    """The layer unit of a module path inside the package: its top folder or module name."""
    return parts[0].removesuffix(".py")


def _imports(path: str, parts: list[str]):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = parts[:-1][: len(parts) - node.level] if node.level > 1 else parts[:-1]
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:  # `from .. import x`: a module x, or a name of the package's __init__
                    for alias in node.names:
                        mod = os.path.join(PACKAGE, *target, alias.name)
                        yield target + ([alias.name] if os.path.exists(mod + ".py") or os.path.isdir(mod)
                                        else ["__init__"])
                    continue
                yield target
            elif node.module and node.module.startswith("pikv_offline"):
                yield node.module.split(".")[1:] or ["__init__"]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pikv_offline."):
                    yield alias.name.split(".")[1:]


def test_imports_point_down():
    bad = []
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            parts = os.path.relpath(path, PACKAGE).split(os.sep)
            me = _unit(parts)
            assert me in LAYERS, f"{'/'.join(parts)} is in no layer; add it to LAYERS"
            for target in _imports(path, parts):
                if not target:
                    continue
                other = _unit(target)
                if other == me:
                    continue
                if other not in LAYERS:
                    bad.append(f"{'/'.join(parts)} imports unknown {'.'.join(target)}")
                elif LAYERS[other] > LAYERS[me] or (LAYERS[other] == LAYERS[me] == 4):
                    bad.append(f"{'/'.join(parts)} ({me}) imports {'.'.join(target)} ({other})")
    assert not bad, "imports that point up or across the stages:\n" + "\n".join(bad)
