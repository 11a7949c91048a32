"""The notebooks run headless, top to bottom, on the fixture checkpoints and show real output."""
import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_detections", "02_head_conflicts", "03_iof_iob")


def outputs_of(notebook, mime: str) -> list[str]:
    """Every display / result output of `mime` type, in cell order."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if mime in output.get("data", {}):
                found.append(output["data"][mime])
    return found


def test_notebooks_are_committed_without_outputs():
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and "CODETR_CKPT" in code[0].source and "CODETR_NUM_IMAGES" in code[0].source, name
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{name} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, co_tiny_pp_ckpt, tiny_ckpt, synth_root, monkeypatch):
    # the kernel inherits this process's environment
    monkeypatch.setenv("CODETR_CKPT", str(co_tiny_pp_ckpt))
    monkeypatch.setenv("CODETR_CKPT_BASELINE", str(tiny_ckpt))
    monkeypatch.setenv("CODETR_DATA_ROOT", str(synth_root))
    monkeypatch.setenv("CODETR_NUM_IMAGES", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # raises CellExecutionError (with the cell's traceback) if any cell fails
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()

    assert outputs_of(notebook, "image/png"), f"{name} displayed no figure"
    tables = outputs_of(notebook, "text/html")
    if name == "01_detections":
        assert any("AP50" in table for table in tables)
    if name == "02_head_conflicts":
        assert len(outputs_of(notebook, "image/png")) >= 2  # the heatmap and at least one overlay
        assert any("atss" in table and "faster_rcnn" in table and "S_i" in table for table in tables)
    if name == "03_iof_iob":
        assert len(outputs_of(notebook, "image/png")) >= 2  # the maps and the curves
        labels = {f"{ckpt.parent.name}/last" for ckpt in (co_tiny_pp_ckpt, tiny_ckpt)}
        assert any(all(label in table for label in labels) and "AUC pooled" in table for table in tables)
