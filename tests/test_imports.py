"""The package's import graph, read from the source (every import statement, function-level ones too):
no module imports itself through others (no cycle), and the model code does not reach up into the
layers built on it (safety methods, SAE training, the toy world, the command line)."""

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# layers above the models: the models (jaxdit/*.py, jaxdit/text) must not import them
UPPER = ("jaxdit.safety", "jaxdit.train", "jaxdit.toyworld", "jaxdit.cli", "jaxdit.flags", "jaxdit.cli_reference",
         "jaxdit.parity")
MODELS = ("jaxdit.flux", "jaxdit.sd3", "jaxdit.vae", "jaxdit.attention", "jaxdit.layers", "jaxdit.hooks",
          "jaxdit.sampling", "jaxdit.configs", "jaxdit.sharding", "jaxdit.text")


def _modules() -> dict[str, Path]:
    """module name -> file, from pyproject's package-dir mapping."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {}
    for package, folder in sorted(dirs.items()):
        for path in (ROOT / folder).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    for init in (ROOT / "jaxdit").glob("*/__init__.py"):  # subpackages inside jaxdit/ (text, toyworld)
        package = f"jaxdit.{init.parent.name}"
        for path in init.parent.glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (`from jaxdit import x` counts as jaxdit.x)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # a name that is a submodule is an arrow to it; any other name, to the module it comes from
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "jaxdit":
                found.add(t)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_models_do_not_import_the_layers_above_them():
    bad = [(m, n) for m, deps in _graph().items() if m.startswith(MODELS) for n in deps if n.startswith(UPPER)]
    assert not bad, f"model modules importing safety / training / toy world / CLI: {bad}"


def test_the_graph_is_read():
    graph = _graph()
    assert "jaxdit.flux" in graph["jaxdit.pipeline"] and "jaxdit.hooks" in graph["jaxdit.safety.uvr.regulate"]
    assert "jaxdit.toyworld.cli" in graph["jaxdit.cli"]  # a function-level import is an arrow too
