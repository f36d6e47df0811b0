"""The three walls of shared/DESIGN.md, checked by reading every module's imports with ``ast``:

1. the policies in ``lifl/control/`` and the reduction (``lifl/engine/reduction.py``) import no
   runtime, no gRPC and no shared memory -- directly or through any ``lifl`` module they import;
2. the platform (``lifl``) never imports ``heteroswitch``;
3. ``heteroswitch`` reaches the platform only through ``lifl.client`` or ``lifl.flower``.

Every import counts, also one inside a function (a lazy import still crosses the wall) and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. The checker is
itself tested on a synthetic tree with one violation of each kind.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lifl", "heteroswitch")
PURE = ("lifl.control", "lifl.engine.reduction")           # wall 1: what must stay pure
IMPURE = {                                                 # wall 1: what it must not reach
    "a runtime": ("lifl.runtime", "ray", "multiprocessing", "subprocess"),
    "gRPC": ("grpc", "grpc_health", "grpc_status", "lifl.v1"),
    "shared memory": ("lifl.shm", "multiprocessing.shared_memory", "mmap"),
}
PLATFORM_DOORS = ("lifl.client", "lifl.flower")            # wall 3: heteroswitch's only ways in


@dataclass(frozen=True)
class Import:
    module: str   # absolute dotted name of what is imported
    line: int


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path) -> bool:
    p = root.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every module ``path`` imports, resolved to absolute names (relative imports included)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}", root)]
            out += [Import(m, node.lineno) for m in subs] or [Import(base, node.lineno)]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            out.append(Import(node.args[0].value, node.lineno))
    return out


def import_graph(root: Path) -> dict[str, tuple[Path, list[Import]]]:
    """module name -> (file, its imports) for every module of the packages under ``root``."""
    return {_module_name(p, root): (p, imports_of(p, root))
            for pkg in PACKAGES if (root / pkg).is_dir() for p in sorted((root / pkg).rglob("*.py"))}


def _with_parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def wall_violations(root: Path) -> list[str]:
    """One line per import that crosses a wall, naming file, line and (wall 1) the import chain."""
    graph = import_graph(root)
    rel = {m: str(p.relative_to(root)) for m, (p, _) in graph.items()}
    bad: list[str] = []
    for start in sorted(m for m in graph if any(_under(m, p) for p in PURE)):
        seen, todo = {start}, [(start, [start])]
        while todo:                       # every lifl module that importing ``start`` runs
            mod, chain = todo.pop()
            for imp in graph[mod][1]:
                for what, prefixes in IMPURE.items():
                    if any(_under(imp.module, p) for p in prefixes):
                        bad.append(f"wall 1: {start} reaches {what}: {' -> '.join(chain)} imports {imp.module} "
                                   f"({rel[mod]}:{imp.line})")
                for m in _with_parents(imp.module):
                    if m in graph and m not in seen:
                        seen.add(m)
                        todo.append((m, chain + [m]))
    for mod, (_, imps) in sorted(graph.items()):
        for imp in imps:
            if _under(mod, "lifl") and _under(imp.module, "heteroswitch"):
                bad.append(f"wall 2: the platform imports heteroswitch: {imp.module} ({rel[mod]}:{imp.line})")
            if (_under(mod, "heteroswitch") and _under(imp.module, "lifl")
                    and not any(_under(imp.module, d) for d in PLATFORM_DOORS)):
                bad.append(f"wall 3: heteroswitch reaches the platform through {imp.module}, not lifl.client or "
                           f"lifl.flower ({rel[mod]}:{imp.line})")
    return sorted(set(bad))


def test_the_repository_keeps_the_three_walls():
    graph = import_graph(ROOT)
    assert "lifl.engine.reduction" in graph and "lifl.control.planner" in graph and "heteroswitch.aggregate" in graph
    assert wall_violations(ROOT) == []


def test_the_bench_never_imports_the_command_line():
    """``heteroswitch.cli`` imports the bench; the bench importing the cli back would be a cycle."""
    back = [(m, i) for m, (_, imps) in import_graph(ROOT).items() if _under(m, "heteroswitch.bench")
            for i in imps if _under(i.module, "heteroswitch.cli")]
    assert back == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    """Write a synthetic source tree: ``files`` plus an empty ``__init__.py`` in every package."""
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        for d in p.relative_to(root).parents:
            if d != Path(".") and not (root / d / "__init__.py").exists():
                (root / d / "__init__.py").write_text("")
    return root


def test_the_checker_flags_each_kind_of_violation(tmp_path):
    bad = wall_violations(_tree(tmp_path, {
        "lifl/client.py": "import grpc\n",
        "lifl/server.py": "import grpc\n",
        "lifl/flower/mod.py": "from ..client import Client\n",
        "lifl/shm.py": "from multiprocessing import shared_memory\n",
        "lifl/helper.py": "from . import shm\n",
        "lifl/control/planner.py": "import math\n\ndef plan():\n    import grpc\n",
        "lifl/engine/reduction.py": "from ..helper import thing\n",
        "lifl/demo.py": "import importlib\nimportlib.import_module('heteroswitch.bias')\n",
        "heteroswitch/aggregate.py": "from lifl.client import Client\nfrom lifl.flower import mod\nfrom lifl import server\n",
    }))
    assert any(v.startswith("wall 1: lifl.control.planner reaches gRPC") and "control/planner.py:4" in v
               for v in bad), bad
    assert any(v.startswith("wall 1: lifl.engine.reduction reaches shared memory")
               and "lifl.engine.reduction -> lifl.helper imports lifl.shm (lifl/helper.py:1)" in v for v in bad), bad
    assert any(v.startswith("wall 2") and "heteroswitch.bias" in v and "demo.py:2" in v for v in bad), bad
    assert [v for v in bad if v.startswith("wall 3")] == [
        "wall 3: heteroswitch reaches the platform through lifl.server, not lifl.client or lifl.flower "
        "(heteroswitch/aggregate.py:3)"]
    # allowed: gRPC in the client, the client and the mod from heteroswitch
    assert not any("lifl.client imports" in v or "heteroswitch/aggregate.py:1" in v for v in bad), bad


def test_the_checker_passes_a_tree_within_the_walls(tmp_path):
    assert wall_violations(_tree(tmp_path, {
        "lifl/control/model.py": "import math\nfrom dataclasses import dataclass\n",
        "lifl/control/planner.py": "from .model import dataclass\n",
        "lifl/client.py": "import grpc\nfrom .control import planner\n",
        "lifl/flower/mod.py": "from ..client import Client\n",
        "heteroswitch/aggregate.py": "import lifl.client\nfrom lifl.flower.mod import lifl_mod\n",
    })) == []
