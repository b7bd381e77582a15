"""The GPU path's modules import each other without circles (BRIEF: no import circles).

Every ``from . import x`` / ``from .x import y`` in python/any4 -- at module level or inside a
function -- is an edge; the package's ``__init__`` (the public face, which imports most modules)
is left out. No circle may pass through the gemm entry point, the CUDA wrapper or the GPU
layout (gemm -> cuda -> pack_gpu -> gemm was one). Circles elsewhere in the package are listed
by ``package_cycles()`` for whoever owns those modules.
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


GPU_PATH = ("gemm", "cuda", "pack_gpu", "validate", "ops")


def reachable(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        for m in graph.get(n, ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_no_import_circle_through_the_gpu_path():
    graph = import_graph()
    assert set(GPU_PATH) <= set(graph)
    for module in GPU_PATH:
        assert module not in reachable(graph, module), f"{module} imports itself through a circle"
        # everything the module imports is circle-free too
        sub = {n: graph[n] for n in reachable(graph, module) | {module}}
        assert find_cycle(sub) is None, " -> ".join(find_cycle(sub))


def test_reachable_sees_a_planted_circle():
    g = {"gemm": {"cuda"}, "cuda": {"pack_gpu"}, "pack_gpu": {"gemm"}}
    assert "gemm" in reachable(g, "gemm")


def test_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
