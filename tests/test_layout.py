"""The package layout keeps its promises (docs/design.md, "Layout"): imports only flow down the
stages, commands never import commands, there is no import circle, and every file stays small."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medusaforge"
MAX_LINES = 400
# Which stage may import which (docs/design.md draws the same picture). Anything else is refused.
ALLOWED = {
    "config": set(),
    "files": set(),
    "kv_cache": set(),
    "models": {"files"},
    "data": {"files", "kv_cache", "models"},
    "drafters": {"files", "models"},
    "interop": {"drafters", "files", "models"},
    "training": {"config", "data", "drafters", "interop", "files", "models"},
    "decoding": {"data", "drafters", "interop", "files", "kv_cache", "models"},
    "serving": {"drafters", "interop", "files", "models"},
    "commands": {"config", "data", "drafters", "interop", "training", "decoding", "files", "kv_cache", "models"},
    "cli": {"config"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> set[str]:
    """Every medusaforge module `path` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medusaforge"):
            found.add(node.module)
            # `from medusaforge.interop import layouts` imports the module medusaforge.interop.layouts
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("medusaforge"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in internal_imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_library_modules_never_import_commands_and_commands_never_import_each_other():
    offenders = []
    for name, imports in import_graph().items():
        for target in imports:
            if target.startswith("medusaforge.commands.") and name != "medusaforge.cli":
                offenders.append(f"{name} imports {target}")
    assert not offenders, "\n".join(offenders)


def stage(module: str) -> str:
    return module.split(".")[1]


def test_imports_flow_down_the_stages():
    wrong = [f"{name} imports {target}" for name, imports in import_graph().items() if name != "medusaforge"
             for target in imports if stage(target) != stage(name) and stage(target) not in ALLOWED[stage(name)]]
    assert not wrong, "\n".join(wrong)


def find_circles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return circles


def test_there_is_no_import_circle():
    circles = find_circles(import_graph())
    assert not circles, "\n".join(circles)


def test_no_file_is_over_the_size_limit():
    too_long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, too_long


def test_the_checks_can_fail(tmp_path):
    (tmp_path / "a.py").write_text("from medusaforge.b import x\n\ndef f():\n    import medusaforge.c\n")
    assert internal_imports(tmp_path / "a.py") == {"medusaforge.b", "medusaforge.c"}
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert find_circles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
