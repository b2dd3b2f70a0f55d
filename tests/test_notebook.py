"""examples/walkthrough.ipynb runs top to bottom in a real Jupyter kernel (nbclient), so it never rots."""

from pathlib import Path

import nbformat
from conftest import shared
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_the_walkthrough_notebook_runs_and_reaches_its_figures(tmp_path, monkeypatch):
    """Every cell runs without an error, and the cells tagged counts, accuracy and cross-validated show the
    dataset the notebook planned and the scores it reaches. The kernel is stopped at once after the last cell
    (its exit handlers, e.g. stopping joblib's workers, would only add seconds)."""
    monkeypatch.setenv("PTL_DATA", str(shared()))
    monkeypatch.setenv("PTL_WORK", str(tmp_path))
    notebook = nbformat.read(ROOT / "examples" / "walkthrough.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        shutdown_kernel="immediate",
    ).execute()
    assert not [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]

    def result(tag: str) -> str:
        (cell,) = [c for c in notebook.cells if tag in c.get("metadata", {}).get("tags", [])]
        return " ".join(o["data"]["text/plain"] for o in cell.outputs if "data" in o).replace("\n", " ")

    counts = " ".join(result("counts").split())
    assert "'training': {'cats': 30, 'dogs': 30}" in counts and "'evaluation': {'cats': 10, 'dogs': 10}" in counts
    assert float(result("accuracy")) >= 0.9  # model.evaluate on the 20 held-out photos
    assert float(result("cross-validated")) >= 0.85  # the transformer in a pipeline, 4-fold
