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
from typing import Any

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


def _execute(path: Path, kernel: str, tmp_path: Path, first_cell: str | None = None,
             probe: str = "import sys; print(sys.executable)") -> tuple[Any, list[Any]]:
    """Run the notebook (its first code cell replaced by ``first_cell``), then ``probe``;
    returns the notebook's own code cells, run, and the probe's cell."""
    notebook = nbformat.read(path, as_version=4)
    if first_cell is not None:
        next(c for c in notebook.cells if c.cell_type == "code").source = first_cell
    cells = len(notebook.cells)
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
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
    return code, notebook.cells[-1]


def _images(code: list[Any]) -> int:
    """Inline images the cells displayed (what a reader of the notebook sees)."""
    return sum(
        "image/png" in o.get("data", {}) for c in code for o in c.outputs
        if o.output_type in ("display_data", "execute_result")
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel, tmp_path):
    code, probe = _execute(path, kernel, tmp_path)
    assert probe.outputs[0]["text"].strip() == sys.executable
    if path.name == "explore_checkpoint.ipynb":  # the demo: bytes per layer, layers moved
        assert _images(code) >= 2


def test_explore_notebook_on_your_own_checkpoint_needs_no_ray(cluster, kernel, tmp_path):
    """``CHECKPOINT = ...`` explores that checkpoint: tables, plots (inline), a diff against the
    step before it; no training, no Ray in the kernel."""
    import torch

    import ray_ckpt

    root = tmp_path / "run"
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        for step in (10, 20):
            torch.manual_seed(step)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
            ckptr.save(str(root / f"step-{step:06d}"), {"model": model.state_dict(), "step": step})
    path = next(p for p in NOTEBOOKS if p.name == "explore_checkpoint.ipynb")
    code, probe = _execute(
        path, kernel, tmp_path, first_cell=f'CHECKPOINT = "{root / "step-000020"}"\nOTHER = ""',
        probe="import sys; print('ray' in sys.modules and sys.modules['ray'].is_initialized(), "
              "'TinyLM' in globals())",
    )
    assert probe.outputs[0]["text"].split() == ["False", "False"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert f"{root / 'step-000010'} -> {root / 'step-000020'}: 5 changed" in text
    assert _images(code) == 2  # bytes per layer, how far each layer moved
