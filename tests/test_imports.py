"""The package's import graph has no cycle: every `import` of a dcssdae module (top-level or inside a function) is
an edge, and imports flow one way (see docs/design.md)."""

import ast
from pathlib import Path

import dcssdae

PACKAGE = Path(dcssdae.__file__).parent


def _imported_modules(path: Path, modules: set[str]) -> set[str]:
    """dcssdae modules that the file imports anywhere (module level or in a function), by dotted name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            # `from dcssdae import encoder` imports a submodule; `from dcssdae.x import y` the module dcssdae.x
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            assert not isinstance(node, ast.ImportFrom) or node.level == 0, f"{path.name}: relative import"
            continue
        found.update(name for name in names if name in modules)
    return found


def _module_name(path: Path) -> str:
    """dcssdae/x.py -> dcssdae.x; dcssdae/pkg/__init__.py -> dcssdae.pkg; dcssdae/__init__.py -> dcssdae."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {}
    for path in paths:
        name = _module_name(path)
        graph[name] = _imported_modules(path, modules) - {name}
    # The package's lazy attributes (`dcssdae.DCSSDAE`, ...) import their modules through importlib.
    graph["dcssdae"] |= set(dcssdae._LAZY.values())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None (depth-first search, white / grey / black)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "black"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "dcssdae.photos" in graph["dcssdae.data"]  # imported inside a function
    assert "dcssdae.encoders.weights" in graph["dcssdae.encoders"]
    assert "dcssdae.autoencoder" in graph["dcssdae"]  # through _LAZY


def test_package_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_networks_and_data_import_no_training_code():
    """The layering of docs/design.md: networks import no training code; the data files import no model code."""
    graph = import_graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    training = {"dcssdae.system", "dcssdae.distill", "dcssdae.callbacks", "dcssdae.cli", "dcssdae.losses"}
    for network in ("dcssdae.encoders", "dcssdae.decoder", "dcssdae.decoder_layers", "dcssdae.decoder_lean"):
        assert not reachable(network) & training, network
    models = {"dcssdae.encoders", "dcssdae.decoder", "dcssdae.autoencoder", "dcssdae.system"}
    for data in ("dcssdae.data", "dcssdae.datasets", "dcssdae.shards", "dcssdae.photos", "dcssdae.images"):
        assert not reachable(data) & models, data
