"""The control/ wall: policies import only the standard library and each other."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import lifl.control

ALLOWED = {"__future__", "dataclasses", "enum", "math", "typing", "collections", "itertools", "functools",
           "random"}  # random only seeded, by the caller (placement baseline)


def test_control_imports_no_runtime_grpc_or_shared_memory():
    root = Path(lifl.control.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: must stay inside control/
                    assert node.level == 1, f"{path.name} reaches outside control/"
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED and top in sys.stdlib_module_names, f"{path.name} imports {name}"
