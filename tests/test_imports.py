"""The package's import graph, read from the source (every import statement, function-level ones too):
no module imports itself through others (no cycle), and each layer reaches only down. From the bottom:
`jaxdit.io` (imports no project module); the models; the conversion and loading of checkpoints
(`jaxdit.convert`); the pipelines; the layers built on them (safety methods, SAE training, the toy world,
the command line)."""

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# layers above the pipelines: neither the models (jaxdit/*.py, jaxdit/text), the conversion nor the pipelines
# may import them
UPPER = ("jaxdit.safety", "jaxdit.train", "jaxdit.toyworld", "jaxdit.cli", "jaxdit.flags", "jaxdit.experiment",
         "jaxdit.cli_reference", "jaxdit.parity")
PIPELINES = ("jaxdit.pipelines", "jaxdit.pipeline")  # the pipelines: above the conversion
CONVERT = ("jaxdit.convert",)  # checkpoint conversion and the loading of every component: above the models
MODELS = ("jaxdit.flux", "jaxdit.sd3", "jaxdit.vae", "jaxdit.attention", "jaxdit.layers", "jaxdit.hooks",
          "jaxdit.sampling", "jaxdit.configs", "jaxdit.sharding", "jaxdit.text")
IO = "jaxdit.io"  # the bottom: atomic writes, the safetensors reader, the checkpoint errors
# what each layer must not import (a prefix of the module name -> forbidden prefixes)
FORBIDDEN = {MODELS: UPPER + PIPELINES + CONVERT, CONVERT: UPPER + PIPELINES, PIPELINES: UPPER}


def _modules() -> dict[str, Path]:
    """module name -> file, from pyproject's package-dir mapping."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {}
    for package, folder in sorted(dirs.items()):
        for path in (ROOT / folder).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    for init in (ROOT / "jaxdit").glob("*/**/__init__.py"):  # subpackages inside jaxdit/ (text, toyworld, ...)
        package = ".".join(("jaxdit",) + init.parent.relative_to(ROOT / "jaxdit").parts)
        for path in init.parent.glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (`from jaxdit import x` counts as jaxdit.x; a
    name of the package root that is no module, such as `jaxdit.load_transformer`, counts as `jaxdit`)."""
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
            if t and t != name:
                found.add(t)
    return found


def _graph():
    """module -> the project modules it imports; the package root (`jaxdit`, a facade over every layer)
    is left out of the cycle search but kept as an arrow for the layering tests."""
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _without_root(graph):
    return {m: {n for n in deps if n != "jaxdit"} for m, deps in graph.items() if m != "jaxdit"}


def test_no_import_cycle():
    graph = _without_root(_graph())
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


def test_each_layer_reaches_only_down():
    """models -/-> convert, pipelines, above; convert -/-> pipelines, above; pipelines -/-> above; and none of
    them imports a name of the package root (`from jaxdit import load_transformer`): the root is above all."""
    graph = _graph()
    bad = [(m, n) for layer, forbidden in FORBIDDEN.items() for m, deps in graph.items() if m.startswith(layer)
           for n in deps if n.startswith(forbidden) or n == "jaxdit"]
    assert not bad, f"imports reaching up a layer: {bad}"


def test_io_is_the_bottom():
    assert _graph()[IO] == set(), "jaxdit.io imports project modules"


def test_the_graph_is_read():
    graph = _graph()
    assert "jaxdit.flux" in graph["jaxdit.pipelines.flux"] and "jaxdit.hooks" in graph["jaxdit.safety.uvr.regulate"]
    assert "jaxdit.pipelines.loops" in graph["jaxdit.pipeline"]  # the subpackage is read
    assert "jaxdit.toyworld.safedig.steering" in graph["jaxdit.toyworld.safedig.calibration"]  # sub-subpackages too
    assert "jaxdit" in graph["jaxdit.train.cli"]  # `from jaxdit import load_transformer`: an arrow to the root
    assert "jaxdit.toyworld.cli" in graph["jaxdit.cli"]  # a function-level import is an arrow too


def test_every_package_is_installed():
    """Every folder holding an __init__.py under the mapped package folders is in pyproject's `packages`
    (a subpackage missing there imports from the source tree but not from an installed wheel)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package,) + rel))
    assert found <= packages, f"packages missing from pyproject.toml: {sorted(found - packages)}"
