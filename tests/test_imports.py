"""Imports point down only, in RecBole's order: entry points -> trainer -> model -> knowledge ->
llm -> config building -> lookup by name -> data / compat / errors (a static scan of every import
in recbole_llm, function-level ones included; code under ``if __name__ == "__main__":`` runs as a
script, an entry point). As RecBole's ``get_model``/``get_trainer`` do, the lookup by name names
the models and trainers above it as ``"module:Class"`` strings, imported when asked; no other
module names a recbole_llm module that way. Each module also imports alone in a fresh interpreter."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import recbole_llm

PACKAGE = Path(recbole_llm.__file__).parent
#: Layers from the bottom up; a module may import its own layer's modules and those below.
LAYERS = [
    ("base", ("errors", "compat", "distributed", "cache_io", "yaml_io", "data")),
    ("registry", ("registry",)),
    ("config", ("config", "checks", "settings", "setting_rules")),
    ("llm", ("llm",)),
    ("knowledge", ("knowledge",)),
    ("model", ("model",)),
    ("trainer", ("trainer",)),
    ("entry points", ("cli", "quick_start", "recommend", "hyper", "run", "plugin", "knowledge.cli", "")),
]
#: Arrows up that remain, each with its reason (none: stage 1 imports the config building and the
#: lookup by name, which sit below the models).
ALLOWED_UP: dict[tuple[str, str], str] = {}
#: The one module that names recbole_llm modules as "module:Class" strings (imported when asked).
LOOKUP = "registry"


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """Index of the layer of ``module`` (relative to recbole_llm; "" is the package itself)."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"recbole_llm.{module} is in no layer of {__file__}"
    return best[0]


def _is_main_guard(node) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"


def imports(path: Path) -> set[str]:
    """recbole_llm modules ``path`` imports (relative names), skipping ``__main__`` blocks."""
    found = set()

    def visit(node):
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                base = PACKAGE.parent.joinpath(*full.split("."))
                found.add(full if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name.removeprefix("recbole_llm").lstrip(".") for name in found
            if name == "recbole_llm" or name.startswith("recbole_llm.")}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {_name(path): imports(path) - {_name(path)} for path in sorted(package.rglob("*.py"))}


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if _layer(b) > _layer(a) and (a, b) not in ALLOWED_UP)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_is_in_a_layer():
    for module in import_graph():
        _layer(module)


def test_imports_point_down_only():
    assert arrows_up(import_graph()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_scan_sees_a_function_level_import_up_and_a_cycle(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import torch\n\ndef f():\n    from recbole_llm.quick_start import run\n\n"
                      "if __name__ == '__main__':\n    from recbole_llm.cli import main\n")
    assert imports(source) == {"quick_start"}
    graph = import_graph()
    graph["llm.backbone"] = graph["llm.backbone"] | {"quick_start"}
    assert arrows_up(graph) == ["llm.backbone -> quick_start"]
    graph["llm.batching"] = graph["llm.batching"] | {"model.lrurec"}  # model.lrurec imports llm.batching
    assert ["llm.batching", "model.lrurec", "llm.batching"] in cycles(graph)


def lookup_strings(path: Path) -> set[str]:
    """String constants in ``path`` that name a recbole_llm module or ``"module:Class"``."""
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and re.fullmatch(r"recbole_llm(\.\w+)+(:\w+)?", node.value)}


def test_only_the_lookup_by_name_names_modules_in_strings():
    """A "module:Class" string is an import the scan above does not see: only the registry
    (below the models, as RecBole's get_model) may hold them, and each names what exists."""
    others = {_name(path): found for path in sorted(PACKAGE.rglob("*.py"))
              if _name(path) != LOOKUP and (found := lookup_strings(path))}
    assert others == {}
    import importlib

    for target in lookup_strings(PACKAGE / f"{LOOKUP}.py"):
        module, _, name = target.partition(":")
        assert importlib.util.find_spec(module) is not None, target
        assert not name or name in (PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
                                    .read_text(encoding="utf-8")), target


def test_each_module_imports_alone_in_a_fresh_interpreter():
    """No import cycle at run time: each module imported first, every recbole_llm module
    forgotten in between (third-party packages stay loaded, so one interpreter does)."""
    modules = sorted("recbole_llm" + (f".{name}" if name else "") for name in import_graph())
    code = ("import importlib, sys, traceback\n"
            f"for module in {modules!r}:\n"
            "    for loaded in [m for m in sys.modules if m == 'recbole_llm' or m.startswith('recbole_llm.')]:\n"
            "        del sys.modules[loaded]\n"
            "    try:\n"
            "        importlib.import_module(module)\n"
            "    except Exception:\n"
            "        print(module, traceback.format_exc(limit=-3))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout == "", run.stdout + run.stderr
