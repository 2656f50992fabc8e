"""jsft's import graph against its stated layers (README, Layout): imports only go down, never in a cycle.

Read from the source (every `import` statement, also inside functions), so an import that is deferred to
dodge a cycle still counts. Only a script's own `if __name__ == "__main__":` block may reach up: it runs as
the top of the program, never as an import.
"""

from __future__ import annotations

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jsft"

# Bottom to top; a module may import its own layer (without a cycle) and the layers below it.
LAYERS = (
    ("foundation", ("jsft", "jsft.errors", "jsft.config", "jsft.paths", "jsft.units", "jsft.hardware")),
    ("runtime", ("jsft.runtime",)),
    ("mesh", ("jsft.sharding",)),
    ("model", ("jsft.models", "jsft.hf", "jsft.gguf", "jsft.lora.spec", "jsft.lora.quant")),
    ("lora", ("jsft.lora",)),
    ("data", ("jsft.data",)),
    ("objective", ("jsft.loss", "jsft.optim", "jsft.flops")),
    ("step", ("jsft.step", "jsft.guards", "jsft.checkpoint", "jsft.trainer")),
    (
        "around the loop",
        (
            "jsft.generate",
            "jsft.metrics",
            "jsft.logging_backends",
            "jsft.hooks",
            "jsft.export",
            "jsft.plots",
            "jsft.inference",
            "jsft.evaluate",
            "jsft.lm_eval",
        ),
    ),
    ("planning", ("jsft.planning", "jsft.cpu_profile")),
    ("run", ("jsft.train",)),
    ("commands", ("jsft.cli", "jsft.eval")),
)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer whose longest prefix names `module` (a package prefix covers its submodules)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "jsft" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to the README's layout"
    return best


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str]):
    """(imported jsft module, line) for every import under `tree`, skipping `__main__` blocks."""
    for node in ast.iter_child_nodes(tree):
        if _is_main_guard(node):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jsft"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("jsft"):
                for alias in node.names:  # `from jsft import data` imports the module jsft.data
                    name = f"{base}.{alias.name}"
                    yield (name if name in modules else base), node.lineno
        else:
            yield from _imports(node, module, is_package, modules)


def import_graph() -> dict[str, list[tuple[str, int]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {
        module_name(f): list(
            _imports(ast.parse(f.read_text()), module_name(f), f.name == "__init__.py", modules)
        )
        for f in files
    }


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_only_go_down():
    upward = [
        f"{module}:{line} imports {target} ({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(target)][0]})"
        for module, edges in import_graph().items()
        for target, line in edges
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle():
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    graph = {
        m: {t for t, _ in edges if t != m and not t.startswith(m + ".")}
        for m, edges in import_graph().items()
    }
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_readme_layout_names_every_module_and_layer():
    """The README's Layout section is the map of this tree: every layer by name, every module by its path
    (or, inside a package it names, by its file name)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout") :].split("\n## ")[0]
    for name, _ in LAYERS:
        assert name.split()[0] in layout, name
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent)
        if path.name == "__init__.py":
            assert f"{relative.parent}/" in layout or f"{relative.parent}.py" in layout, relative
        else:
            in_package = f"{relative.parent}/" in layout and path.name in layout
            assert str(relative) in layout or in_package, relative


def test_every_test_the_readme_names_exists():
    """The guarantees in "What jsft never does to your files" name their tests: each must exist."""
    readme = (PACKAGE.parent / "README.md").read_text()
    named, current = [], None
    for file, name in re.findall(r"`(?:(test_\w+\.py))?::(\w+)`", readme):
        current = file or current
        named.append((current, name))
    assert len(named) >= 10
    for file, name in named:
        assert f"def {name}(" in (PACKAGE.parent / "tests" / file).read_text(), f"{file}::{name}"


MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 450


def test_functions_and_modules_stay_short_unless_they_say_why():
    """A function over 60 lines says "Long on purpose" in its docstring, a module over 450 lines says
    "Over 450 lines on purpose": length is a choice someone stated, not an accident."""
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        tree = ast.parse(source)
        if len(source.splitlines()) > MAX_MODULE_LINES and "Over 450 lines on purpose" not in (
            ast.get_docstring(tree) or ""
        ):
            too_long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and "Long on purpose" not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)


def test_the_layer_test_sees_violations():
    """The checks are not vacuous: an upward import and a cycle in made-up sources are found."""
    tree = ast.parse(
        "import os\ndef f():\n    from jsft import trainer\nif __name__ == '__main__':\n    import jsft.cli"
    )
    edges = list(_imports(tree, "jsft.config", False, {"jsft.trainer", "jsft.cli"}))
    assert edges == [("jsft.trainer", 3)]
    assert layer_of("jsft.trainer") > layer_of("jsft.config")
    assert layer_of("jsft.lora.spec") < layer_of("jsft.lora.peft") == layer_of("jsft.lora")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
