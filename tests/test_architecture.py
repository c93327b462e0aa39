"""The package's import structure, read from the source with `ast` (imports inside functions too):
no cycles, every import goes down the layers, and the training path never reaches the toy world."""

import ast
import os

import pytest

PACKAGE = "agentflow_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Lower layers first; a module may import its own layer's modules (acyclically) and lower layers.
LAYERS = (
    ("errors", "config_reader", "train_state", "optim"),       # foundations: no model, no agent
    ("sharding", "distributed", "models", "sampling"),
    ("engines",),
    ("tools",),
    ("agent",),
    ("rl",),
    ("data", "checkpoint", "experiment", "observability", "supervised", "evaluate", "cli"),
    ("train", "sft", "solve", "generate", "plan"),            # entry points
    ("toy",),                                                  # beside the entry points
)
TRAINING_PATH = ("agentflow_jax.train", "agentflow_jax.evaluate", "agentflow_jax.rl")


def module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def modules() -> dict[str, str]:
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found[module_name(path)] = path
    return found


def imports_of(path: str, known: set[str]) -> set[str]:
    """Project modules a file imports anywhere (top level or inside functions), resolved to files."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` imports that module; `from module import name`, the module.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith(PACKAGE) and name != PACKAGE:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) - {name} for name, path in known.items()}


def layer_of(module: str) -> int:
    part = module.split(".")[1]
    for index, members in enumerate(LAYERS):
        if part.removesuffix("_main") in members:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS; add it where it belongs")


def test_every_module_has_a_layer(graph):
    for module in graph:
        if module != PACKAGE:
            layer_of(module)


def test_imports_go_down(graph):
    upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                    for a, targets in graph.items() if a != PACKAGE for b in targets if layer_of(b) > layer_of(a))
    assert not upward, "\n".join(upward)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_tools_do_not_import_the_agent(graph):
    offending = [(a, b) for a, targets in graph.items() if a.startswith(f"{PACKAGE}.tools")
                 for b in targets if b.startswith(f"{PACKAGE}.agent")]
    assert not offending


def test_the_training_path_never_reaches_the_toy_world(graph):
    seen, stack = set(), [m for m in graph if m.startswith(TRAINING_PATH)]
    while stack:
        module = stack.pop()
        if module not in seen:
            seen.add(module)
            stack.extend(graph.get(module, ()))
    assert not sorted(m for m in seen if m.startswith(f"{PACKAGE}.toy")), sorted(seen)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The walk is what the tests above rely on: an import inside a function counts."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from agentflow_jax.toy import world\n    import agentflow_jax.rl.loss\n")
    assert imports_of(str(path), {"agentflow_jax.toy.world", "agentflow_jax.rl.loss"}) == {
        "agentflow_jax.toy.world", "agentflow_jax.rl.loss"}
