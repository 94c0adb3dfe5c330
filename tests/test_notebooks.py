"""The notebooks in notebooks/ run top to bottom in a fresh kernel, and are committed without outputs.

Every `notebooks/*.ipynb` is picked up by the glob below; a new notebook needs no change here. Each runs
in a new `python3` kernel on this interpreter (a kernel spec written for the test, so a `python3` kernel
installed elsewhere on the machine is never used), with the notebooks folder as its working directory,
MPLBACKEND=Agg, and a time limit per notebook: 600 s, or `"jaxdit": {"timeout": N}` in the notebook's
metadata. Any cell error fails the test. A notebook that uses matplotlib (or sets `"jaxdit":
{"figures": true}`) must display at least one image.

Strip outputs before committing a notebook (Jupyter: "Clear All Outputs", or):

    .venv/bin/python tests/test_notebooks.py notebooks/NAME.ipynb
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
DEFAULT_TIMEOUT = 600  # seconds for the whole notebook


def _settings(nb) -> dict:
    return dict(nb.metadata.get("jaxdit", {}))


def _promises_figures(nb) -> bool:
    flag = _settings(nb).get("figures")
    if flag is not None:
        return bool(flag)
    return any(c.cell_type == "code" and "matplotlib" in c.source for c in nb.cells)


def _image_outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if any(k.startswith("image/") for k in o.get("data", {}))]


def strip_outputs(path: Path) -> bool:
    """Remove outputs and execution counts from a notebook file; True if it changed."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count, changed = [], None, True
    if changed:
        nbformat.write(nb, path)
    return changed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} carry outputs or execution counts; strip them with "
                       f"`.venv/bin/python tests/test_notebooks.py notebooks/{path.name}`")


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A `python3` kernel spec running this interpreter, found before any other, and the kernel's env."""
    from ipykernel.kernelspec import write_kernel_spec

    data = tmp_path / "jupyter"
    write_kernel_spec(data / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(data))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    return {**os.environ, "MPLBACKEND": "Agg", "IPYTHONDIR": str(tmp_path / "ipython"),
            "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, kernel_env):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    timeout = int(_settings(nb).get("timeout", DEFAULT_TIMEOUT))
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, startup_timeout=120,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute(env=kernel_env)  # raises CellExecutionError naming the failing cell
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    assert elapsed <= timeout, f"{path.name} took {elapsed:.0f} s, over its {timeout} s budget"
    if _promises_figures(nb):
        assert _image_outputs(nb), f"{path.name} uses matplotlib but displayed no image"


if __name__ == "__main__":
    for name in sys.argv[1:] or [str(p) for p in NOTEBOOKS]:
        print(f"{name}: {'stripped' if strip_outputs(Path(name)) else 'already clean'}")
