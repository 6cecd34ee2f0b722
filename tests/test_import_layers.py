"""The package's import graph, read from the code (every import statement, function-level and TYPE_CHECKING
ones included): no module imports itself back through others, and the packages sit in layers where each
imports only from the layers below it. A change that needs an arrow back up must move code instead (or
change LAYERS here, on purpose)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nbp_ds"

# bottom to top; the top-level modules (nbp_ds/x.py) and the sub-packages (nbp_ds/x/) by their names
LAYERS: list[set[str]] = [
    {"errors", "files", "worker_pool", "tied_process", "ffmpeg_tools"},
    {"layout", "video_io", "visualize", "typed_yaml"},  # typed_yaml: the generic YAML loader of every config
    {"packing"},  # packed rows: several clips, each with its own layout, in one sequence
    {"config"},  # the NBP run schema and its validation
    {"runtime"},  # launch, collectives, checkpoints, metrics, schedule, RNG, stop flags, the saved-parts protocol,
    #               the EMA, the trainers' hooks: below every program and both trainers
    {"model", "data"},
    {"weights"},  # the export format, loading an export, a run's identity (WEIGHT_KEYS): no trainer needed
    {"train"},  # the NBP DeepSpeed trainer: only the programs (cli) import it
    {"official"},  # converts the authors' generators into the export format (weights/)
    {"tokenizer"},  # its port of the authors' tokenizer reads their files through official/
    {"generate"},  # the sampler: generators, the tokenizer that decodes their tokens, the output folder
    {"sample_log", "eval", "perf"},
    {"cli"},  # the programs; ``python -m nbp_ds.X`` modules (X/__main__.py) are programs too
]


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import name`` counts as pkg.name when that is a
    module, else as pkg itself)."""

    def resolve(name: str) -> str:
        while name not in found:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for module, path in found.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("nbp_ds.")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("nbp_ds"):
                targets |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[module] = targets - {module, "nbp_ds"}
    return graph


def room(module: str) -> str:
    """The layer entry a module belongs to: its sub-package, or itself when top-level; programs are cli."""
    parts = module.split(".")
    return "cli" if parts[-1] == "__main__" else parts[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module), Tarjan's way."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back():
    assert cycles(import_graph(modules())) == []


def test_every_package_imports_only_from_the_layers_below_it():
    found = modules()
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    rooms = {room(m) for m in found if m != "nbp_ds"}
    assert rooms <= set(level), f"place these in LAYERS: {sorted(rooms - set(level))}"
    upward = sorted(f"{a} -> {b} ({room(a)} is layer {level[room(a)]}, {room(b)} layer {level[room(b)]})"
                    for a, targets in import_graph(found).items() if a != "nbp_ds"
                    for b in targets if room(a) != room(b) and level[room(b)] >= level[room(a)])
    assert upward == []


def test_only_the_programs_import_the_nbp_trainer():
    """What more than one program needs (the weights' format, the EMA, the saved-parts protocol, the hooks) sits
    below train/, so the sampler, the converters, the tokenizer and sample logging never reach into it."""
    reaching = sorted(f"{a} -> {b}" for a, targets in import_graph(modules()).items()
                      if a != "nbp_ds" and room(a) not in ("train", "cli")
                      for b in targets if b.startswith("nbp_ds.train"))
    assert reaching == []


def test_the_graph_reader_sees_function_level_imports_and_circles():
    """The reader itself: a lazy import inside a function is an arrow, and a two-module circle is found."""
    graph = import_graph(modules())
    assert "nbp_ds.train.loop" in graph["nbp_ds.cli.train"]  # imported inside main()
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
