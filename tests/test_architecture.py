"""The house rules of DESIGN.md, checked on the source: floors, no import circles (also not
through function-level imports), no private name read across modules, no formatter pragmas."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from importlib.util import resolve_name
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# DESIGN.md's floors; bench (the `lorafleet bench` implementations) sits just under cli.
FLOORS = {
    "cpu": 0,
    "errors": 0,
    "fsutil": 0,
    "lazy": 0,
    "adapters": 1,
    "kernels": 1,
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
    """The lorafleet modules `path` imports (at module level only, if asked); a package's lazy
    exports (`lorafleet.lazy`) are deferred imports of the submodules they name."""
    source = path.read_text()
    found = imports_in(source, top_level_only)
    if not top_level_only:
        found |= lazy_imports(source, module_name(path))
    return found


def lazy_imports(source: str, package: str) -> set[str]:
    """The modules named by `lazy_exports(__name__, {name: ".sub" or "lorafleet.mod", with
    ":attr" or not})` in the source of the package `package`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "lazy_exports"
            and len(node.args) == 2
            and isinstance(node.args[1], ast.Dict)
        ):
            specs = [v.value for v in node.args[1].values if isinstance(v, ast.Constant)]
            found |= {resolve_name(spec.partition(":")[0], package) for spec in specs}
    return found


def imports_in(source: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(source)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorafleet"):
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found |= subs & MODULES
            if subs - MODULES:  # a name defined in the package's (or module's) own file
                found.add(node.module)
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


def import_graph() -> dict[str, set[str]]:
    """Module -> the lorafleet modules it imports anywhere in its file (function bodies and
    `if TYPE_CHECKING:` blocks included: a deferred import still couples the two modules)."""
    mods = sources()
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        for target in imports(path, top_level_only=False):
            # `from lorafleet.x import y` may name a submodule y or a name in x's __init__.
            found = target if target in mods else target.rsplit(".", 1)[0]
            if found != mod:
                graph[mod].add(found)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other (strongly connected, two or more), sorted;
    Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def one_circle(graph: dict[str, set[str]], group: list[str]) -> str:
    """A shortest import path from the group's first module back to itself, for the message."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(graph.get(node, set()) & members):
            if nxt == start:
                return " -> ".join([*paths[node], start])
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    return " <-> ".join(group)


def test_circle_finder_sees_a_circle_through_a_third_module():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert one_circle(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
    assert circles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_count():
    source = """
from lorafleet.bench import print_table, serve


def run():
    from lorafleet.serve.engine import Engine
"""
    found = {"lorafleet.bench", "lorafleet.bench.serve", "lorafleet.serve.engine"}
    assert imports_in(source, top_level_only=False) == found
    assert imports_in(source, top_level_only=True) == found - {"lorafleet.serve.engine"}


def test_lazy_exports_count_as_imports_of_their_submodules():
    source = """
from lorafleet.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {"EvalConfig": ".config", "check": ".quant:check_mode", "names": "lorafleet.linear_layers"},
)
"""
    found = {"lorafleet.eval.config", "lorafleet.eval.quant", "lorafleet.linear_layers"}
    assert lazy_imports(source, "lorafleet.eval") == found


def test_no_import_circle():
    graph = import_graph()
    found = [one_circle(graph, group) for group in circles(graph)]
    assert not found, found


# -- private names ---------------------------------------------------------------------------

# Private names of other packages that lorafleet reads on purpose: (the object, the name) -> why.
# Keep it tiny; every entry must still be used (checked below).
PRIVATE_OK = {
    # torch exposes its packed int8 / int4 CPU matmul kernels only as aten operators, whose
    # names start with "_"; the operator registry is their public handle (layers/quant.py).
    ("torch.ops.aten", "_weight_int8pack_mm"),
    ("torch.ops.aten", "_weight_int4pack_mm_for_cpu"),
    ("torch.ops.aten", "_convert_weight_to_int4pack_for_cpu"),
    # oneDNN's packed CPU linear, likewise only as operators (kernels/packed.py), and a
    # tensor's in-place version counter, which torch exposes by no public name (packed.py uses
    # it to never multiply by a copy of a weight changed since it was packed)
    ("torch.ops.mkldnn", "_reorder_linear_weight"),
    ("torch.ops.mkldnn", "_linear_pointwise"),
    ("weight", "_version"),
}
ATTR_FUNCTIONS = {"getattr", "hasattr", "setattr", "delattr"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_names(tree: ast.AST) -> set[str]:
    """The names a module defines itself: its functions, classes, methods, variables, fields,
    arguments and the attributes it sets on `self` / `cls`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and on_self(node.value)
        ):
            names.add(node.attr)
    return names


def on_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def private_import(node: ast.Import | ast.ImportFrom) -> bool:
    """`from x import _name`, or any import of a private module (`x._mod`)."""
    if isinstance(node, ast.ImportFrom):
        modules = [node.module or ""]
        if any(is_private(a.name) for a in node.names):
            return True
    else:
        modules = [a.name for a in node.names]
    return any(is_private(part) for m in modules for part in m.split("."))


def private_reach_ins(source: str) -> list[tuple[int, str]]:
    """(line, code) of every use of a private name that `source` does not define: `obj._name`
    (on `self` too: a base class's private is another module's), `getattr(obj, "_name")` and
    friends (on anything but `self` / `cls`, whoever defines the name), `from x import _name`,
    and imports of private modules (`x._mod`)."""
    tree = ast.parse(source)
    own = defined_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            if node.attr not in own and (ast.unparse(node.value), node.attr) not in PRIVATE_OK:
                found.append((node.lineno, ast.unparse(node)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ATTR_FUNCTIONS
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
            and not (on_self(node.args[0]) and node.args[1].value in own)
        ):
            # By name, on another object, even the module's own private is read blind: the
            # object's type is not known here (else it would read `obj._name`).
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and private_import(node):
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_private_check_sees_reach_ins_and_spares_own_names():
    source = """
import sys
from lorafleet.bayes.fit import _helper, public
from torch._C import thing


class Box:
    _slot = 1

    def __init__(self, other):
        self._mine = other._mine  # this module's own private name: fine
        self._x = other._cache  # another module's
        self.y = getattr(other, "_closed", False)
        self.__dict__.update({})
        sys._getframe()
        self._inherited_from_elsewhere()
"""
    found = [code for _, code in private_reach_ins(source)]
    assert found == [
        "from lorafleet.bayes.fit import _helper, public",
        "from torch._C import thing",
        "other._cache",
        "getattr(other, '_closed', False)",
        "sys._getframe",
        "self._inherited_from_elsewhere",
    ], found


def test_no_private_name_read_across_modules():
    bad = []
    for path in sorted((SRC / "lorafleet").rglob("*.py")):
        for line, code in private_reach_ins(path.read_text()):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {code}")
    assert not bad, bad


def test_every_private_allowance_is_still_used():
    used = set()
    for path in (SRC / "lorafleet").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                used.add((ast.unparse(node.value), node.attr))
    assert used >= PRIVATE_OK, sorted(PRIVATE_OK - used)


# -- the formatter owns the layout -------------------------------------------------------------

PRAGMA = re.compile(r"#\s*fmt:\s*(skip|off)\b")


def test_no_formatter_pragma_in_src_or_tests():
    bad = []
    for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRAGMA.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{number}")
    assert not bad, bad
