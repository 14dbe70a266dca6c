"""Every notebook under notebooks/ runs top to bottom without an error.

Each runs with nbclient in a fresh kernel on this virtual environment's Python: the test writes a
kernel spec for ``sys.executable`` into a temporary ``JUPYTER_PATH`` (found before any user or
system spec), so a ``python3`` kernel installed elsewhere on the machine is never picked up. The
notebooks start their own Ray (``address="local"``) in the kernel and shut it down at the end;
the kernel is stopped by nbclient when the run ends, error or not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "ray-ckpt-venv"


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ray_ckpt (this venv)",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_the_explore_notebook_is_there():
    assert "explore_checkpoint.ipynb" in [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    cells = len(notebook.cells)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        notebook, kernel_name=kernel, timeout=300, allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}")
    code = [c for c in notebook.cells[:cells] if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "every code cell ran"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert notebook.cells[-1].outputs[0]["text"].strip() == sys.executable
