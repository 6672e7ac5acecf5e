"""The house's import arrows, derived from the source: every `import` of a mimood module (at module level or
inside a function: a lazy import is an arrow too) between the package's rooms runs one way, down this order,
and no module imports itself through others.

    cli, testing > bench, pipeline > eval > export > train > runtime > ood > models, restore > data > contract
        > thresholds > config, errors

A room may import its own modules and those of any room further down; rooms on one level import neither
each other nor anything above. `testing` (fuzz inputs for tests and benchmarks) sits at the top: nothing in the
package imports it. `python tests/test_import_graph.py` prints the room graph.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mimood"
ORDER = [("config", "errors"), ("thresholds",), ("contract",), ("data",), ("models", "restore"), ("ood",),
         ("runtime",), ("train",), ("export",), ("eval",), ("bench", "pipeline"), ("cli", "testing")]
LEVEL = {room: i for i, rooms in enumerate(ORDER) for room in rooms}
HEAVY = ("torch", "monai", "sklearn", "matplotlib", "onnx", "onnxscript", "einops", "modelopt", "tensorrt")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement of one file: mimood modules
    resolved to the module itself (`from mimood.a import b` is mimood.a.b when that is a module), third-party
    ones as their top-level name."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            base = node.module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            out.append((name if name.startswith("mimood") else name.split(".")[0], node.lineno, id(node) in top))
    return out


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mimood"


def graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int, bool]]]]:
    """(module -> mimood modules it imports, module -> every import with its line and level)."""
    mods = modules()
    edges, raw = {}, {}
    for name, path in mods.items():
        raw[name] = imports(path, set(mods))
        edges[name] = {m for m, _, _ in raw[name] if m.startswith("mimood.") and m != name}
    return edges, raw


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]], raw) -> list[str]:
    """Imports that run against the order: into a room on the same level or above."""
    bad = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            a, b = room(src), room(dst)
            if a == b or a == "mimood" or b == "mimood":
                continue
            if LEVEL[b] >= LEVEL[a]:
                line = next(n for m, n, _ in raw[src] if m == dst)
                bad.append(f"{src} (line {line}) imports {dst}: {a} -> {b} runs up")
    return bad


def reachable(start: str, edges: dict[str, set[str]], raw, module_level_only: bool = True) -> set[str]:
    """The mimood modules `start` loads when imported (its package __init__s included)."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]                   # parent packages
        todo += [t for t, _, top in raw.get(m, []) if t.startswith("mimood.") and (top or not module_level_only)
                 and t in edges]
    return seen


def test_every_room_is_known_and_on_one_level():
    rooms = {room(m) for m in modules()} - {"mimood"}
    assert rooms == set(LEVEL), f"rooms without a level: {sorted(rooms - set(LEVEL))}"


def test_no_circles_between_modules():
    edges, _ = graph()
    assert cycles(edges) == []


def test_arrows_run_one_way_down_the_order():
    edges, raw = graph()
    assert upward(edges, raw) == []


def test_the_inference_command_loads_no_training_stack_at_import():
    """What `mimood-infer` imports at module level, through mimood, imports none of the heavy packages at module
    level (the lazily imported torch backend and exporter are checked by tests/test_runtime_only.py)."""
    edges, raw = graph()
    loaded = reachable("mimood.cli.infer", edges, raw)
    heavy = sorted(f"{m} imports {t}" for m in loaded for t, _, top in raw[m] if top and t in HEAVY)
    assert heavy == []
    assert not {room(m) for m in loaded} & {"train", "export", "eval", "models", "bench", "pipeline"}


def main() -> None:
    edges, raw = graph()
    rooms: dict[tuple[str, str], int] = {}
    for src, targets in edges.items():
        for dst in targets:
            if room(src) != room(dst) and "mimood" not in (room(src), room(dst)):
                rooms[room(src), room(dst)] = rooms.get((room(src), room(dst)), 0) + 1
    n_edges = sum(len(t) for t in edges.values())
    print(f"{len(edges)} modules, {n_edges} module imports, {len(LEVEL)} rooms on {len(ORDER)} levels")
    for level in reversed(ORDER):
        for r in level:
            out = sorted((d for s, d in rooms if s == r), key=lambda d: -LEVEL[d])
            print(f"  {r:<10} -> " + (", ".join(f"{d} ({rooms[r, d]})" for d in out) or "-"))
    print(f"circles: {cycles(edges) or 'none'}; imports running up: {upward(edges, raw) or 'none'}")
    loaded = reachable("mimood.cli.infer", edges, raw)
    heavy = sorted({t for m in loaded for t, _, top in raw[m] if top and t in HEAVY})
    print(f"mimood-infer loads {len(loaded)} mimood modules at import "
          f"({', '.join(sorted({room(m) for m in loaded}))}); heavy packages among their module-level imports: {heavy or 'none'}")


if __name__ == "__main__":
    main()
