"""The package's modules import each other without circles (BRIEF: no import circles).

Every ``from . import x`` / ``from .x import y`` in python/any4 -- at module level or inside a
function -- is an edge; the package's ``__init__`` (the public face, which imports most modules)
is left out. The graph must be acyclic.
"""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "python" / "any4"


def import_graph() -> dict:
    graph = {}
    for path in sorted(PKG.glob("*.py")):
        name = path.stem
        if name == "__init__":
            continue
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges.add(node.module.split(".")[0])
                else:
                    edges.update(a.name for a in node.names)
        graph[name] = {e for e in edges if e != "__init__" and (PKG / f"{e}.py").exists()}
    return graph


def find_cycle(graph: dict):
    state = {}
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_circles():
    graph = import_graph()
    assert {"gemm", "cuda", "pack_gpu", "groups"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
