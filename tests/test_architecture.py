"""The house rules of DESIGN.md, checked on the source: floors and no import circles."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# DESIGN.md's floors; bench (the `lorafleet bench` implementations) sits just under cli.
FLOORS = {
    "errors": 0,
    "fsutil": 0,
    "adapters": 1,
    "models": 1,
    "data": 2,
    "layers": 2,
    "train": 3,
    "eval": 3,
    "bayes": 3,
    "serve": 3,
    "change": 3,
    "compose": 4,
    "fed": 4,
    "transfer": 4,
    "demo": 4,
    "bench": 4.5,
    "cli": 5,
}
# Imports across one floor that are allowed, and why.
SAME_FLOOR_OK = {
    # PEFT's tensor naming lives in one floor-1 module that imports nothing of lorafleet's
    # but errors; the base fingerprint strips adapter prefixes through it.
    ("models", "adapters.lora_keys"),
    # Validation during training reports the task metric: eval is train's scorer.
    ("train", "eval"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The lorafleet modules `path` imports (at module level only, if asked)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorafleet"):
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found |= (subs & MODULES) or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lorafleet")}
    return found


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in (SRC / "lorafleet").rglob("*.py")}


MODULES = set(sources())


def package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_a_floor_imports_only_floors_below_it():
    bad = []
    for mod, path in sources().items():
        for target in imports(path, top_level_only=False):
            here, there = package(mod), package(target)
            if here == there or here not in FLOORS or there not in FLOORS:
                continue
            allowed = any(
                here == a and target.startswith("lorafleet." + b) for a, b in SAME_FLOOR_OK
            )
            if FLOORS[there] >= FLOORS[here] and not allowed:
                bad.append(f"{mod} -> {target}")
    assert not bad, bad


def test_no_import_circle_at_module_level():
    mods = sources()
    graph = defaultdict(set)
    for mod, path in mods.items():
        for target in imports(path, top_level_only=True):
            # `from lorafleet.x import y` may name a submodule y or a name in x's __init__.
            graph[mod].add(target if target in mods else target.rsplit(".", 1)[0])
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt in mods and nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    cycles = []
    for mod in sorted(mods):
        if mod not in state and (cycle := visit(mod, [mod])):
            cycles.append(" -> ".join(cycle))
    assert not cycles, cycles
