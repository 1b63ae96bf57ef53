"""notebooks/review.ipynb runs top to bottom against the MLflow store of a tiny training run (and an
evaluate run's record) and shows its runs table, loss and val_loss curves, labelled sample grids,
the rank heatmap and the evaluation's table and pictures."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image
from helpers.training import make_run_cfg

from artmaster import train
from artmaster.tracking import log_summary, stage_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "review.ipynb"
pytestmark = pytest.mark.slow


def outputs(notebook, kind: str) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if kind in o.get("data", {}) or o.get("output_type") == kind]


def record_an_evaluation(cfg, folder: Path) -> None:
    """What the evaluate stage leaves in MLflow for the notebook: headline, summary.md, grid.png."""
    folder.mkdir()
    Image.new("RGB", (64, 32), "white").save(folder / "grid.png")
    (folder / "summary.md").write_text("| model | style_score |\n|---|---|\n| adapter | -4.1 |\n", encoding="utf-8")
    with stage_run(cfg, "evaluate", sections=()) as tracker:
        log_summary({"adapter_gain": 0.336})
        tracker.log_artifact(folder / "summary.md", artifact_path="evaluate")
        tracker.log_picture(folder / "grid.png", "evaluate")


def test_review_notebook_executes_against_a_tiny_run(train_assets, tmp_path, monkeypatch):
    cfg = make_run_cfg(train_assets, tmp_path, "train.samples.every=6")
    train.run(cfg)
    record_an_evaluation(cfg, tmp_path / "evaluation")
    monkeypatch.setenv("ARTMASTER_TRACKING_URI", str(cfg.tracking.uri))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert not outputs(notebook, "error")
    text = "".join(o.get("text", "") for o in outputs(notebook, "stream"))
    assert re.search(r"^2 runs$", text, re.M), text
    assert "curves: loss/train, loss/val" in text, text
    grids = int(re.search(r"run train r=8 lr=[^:]+: (\d+) sample grids", text).group(1))
    assert grids >= 2, text
    assert "run evaluate: 1 evaluation pictures" in text, text
    html = "".join(o["data"]["text/html"] for o in outputs(notebook, "text/html"))
    assert "train r=8" in html and "result/loss" in html  # runs table: names and headline columns
    assert "adapter_gain" in html  # the evaluation's headline
    markdown = "".join(o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown"))
    assert "| adapter | -4.1 |" in markdown
    # loss curves, each sample grid, the rank heatmap, the evaluation grid
    assert len(outputs(notebook, "image/png")) == 1 + grids + 1 + 1
