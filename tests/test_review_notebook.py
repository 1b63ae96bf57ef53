"""notebooks/review.ipynb runs top to bottom against the MLflow store of a tiny training run and
shows its runs table, loss curve, sample grids and rank heatmap."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_train import assets, make_run_cfg  # noqa: F401  (assets: fixture)

from artmaster import train

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "review.ipynb"
pytestmark = pytest.mark.slow


def outputs(notebook, kind: str) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if kind in o.get("data", {}) or o.get("output_type") == kind]


def test_review_notebook_executes_against_a_tiny_run(assets, tmp_path, monkeypatch):  # noqa: F811
    cfg = make_run_cfg(assets, tmp_path, "train.samples.every=6")
    train.run(cfg)
    monkeypatch.setenv("ARTMASTER_TRACKING_URI", str(cfg.tracking.uri))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert not outputs(notebook, "error")
    text = "".join(o.get("text", "") for o in outputs(notebook, "stream"))
    assert re.search(r"^1 runs$", text, re.M), text
    grids = int(re.search(r"run train: (\d+) sample grids", text).group(1))
    assert grids >= 2, text
    html = "".join(o["data"]["text/html"] for o in outputs(notebook, "text/html"))
    assert "train" in html  # the runs table lists the training stage
    # loss curve, each sample grid and the rank heatmap
    assert len(outputs(notebook, "image/png")) == 1 + grids + 1
