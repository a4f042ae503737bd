"""notebooks/evaluate.ipynb runs top to bottom on a tiny configuration (Set5, two images)."""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO


def test_evaluate_notebook_runs(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    overrides = f"sets=[Set5] limit=2 grids=1 batch_size=2 progress=false output_dir={tmp_path / 'eval'}"
    monkeypatch.setenv("LATENTUP_NOTEBOOK_OVERRIDES", overrides)
    notebook = nbformat.read(REPO / "notebooks" / "evaluate.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "### Set5 (2 images)" in markdown and "| ceiling |" in markdown
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "eval" / "grids" / "Set5" / "baby.png").is_file()
