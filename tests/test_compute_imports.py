"""The compute package's layering (docs/architecture_compute.md): no import cycle, core below
the operations, and nothing from the service."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "compute"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """compute module -> the modules it imports (absolute names, resolved relative imports;
    ``from package import module`` depends on the module, not on the package's __init__)."""
    modules = {_module(p) for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.add(sub if sub in modules else base)
        graph[name] = out
    return graph


def test_compute_never_imports_the_service() -> None:
    for name, deps in _imports().items():
        bad = {d for d in deps if d.split(".")[0] in ("app", "workers", "fastapi", "redis")}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_core_is_below_every_operation() -> None:
    ops = ("compute.attention", "compute.tensor_attention", "compute.lora")
    for name, deps in _imports().items():
        if name.startswith("compute.core"):
            assert not {d for d in deps if d.startswith(ops)}, name


def test_no_import_cycle_inside_compute() -> None:
    graph = _imports()
    edges = {n: {d for d in deps if d in graph and d != n} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, n, m]))
            if m not in state:
                visit(m, [*path, n])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [])
