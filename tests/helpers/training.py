"""The train stage's test fixture data: a few small crops with captions (as crop and caption write
them), the demo config on them with a short recipe, and a run killed at a given step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artmaster import train
from artmaster.config import compose
from artmaster.training.step import training_step

SQUARE, PORTRAIT = (512, 512), (512, 768)


def write_fixture_data(data_dir: Path, sizes: list[tuple[int, int]]) -> None:
    """crops.jsonl + PNGs and captions.jsonl the way the crop and caption stages write them."""
    crop_dir, caption_dir = data_dir / "crop", data_dir / "caption"
    rows, captions = [], []
    rng = np.random.default_rng(0)
    for index, (width, height) in enumerate(sizes):
        bucket = f"{width}x{height}"
        crop_id = f"scan{index}-{bucket}-00"
        (crop_dir / bucket).mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, (height // 64, width // 64, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        image.save(crop_dir / bucket / f"{crop_id}.png")
        rows.append({"crop_id": crop_id, "scan_id": f"scan{index}", "bucket": bucket, "width": width,
                     "height": height, "box": [0, 0, width, height], "path": f"{bucket}/{crop_id}.png",
                     "split": "train"})
        captions.append({"crop_id": crop_id, "caption": f"zxh style, ink mountains, mist {index}",
                         "source": "template"})
    caption_dir.mkdir(parents=True, exist_ok=True)
    (crop_dir / "crops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (caption_dir / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions), encoding="utf-8")


# 4 training crops (2 held out), batches of 2, 2 repeats, 3 epochs: 12 optimizer steps
FAST = (
    "train.epochs=3", "train.repeats=2", "train.batch_size=2", "train.log_every=2",
    "train.checkpoint.every=4", "train.checkpoint.keep=2", "train.checkpoint.keep_after_success=true",
    "train.validation.every=6", "train.samples.every=12", "train.samples.seeds=[0]",
    "train.samples.width=64", "train.samples.height=64", "train.samples.steps=2",
    "train.adalora.delta_t=2", "replicates.count=1",
)


def make_run_cfg(assets: Path, root: Path, *overrides: str):
    """The demo config on the fixture data, outputs and MLflow store under `root`."""
    data = root / "data"
    for stage in ("crop", "caption"):
        if not (data / stage).exists():
            shutil.copytree(assets / "data" / stage, data / stage)
    if not (root / "mlflow.db").exists():
        shutil.copy(assets / "mlflow.db", root / "mlflow.db")
    return compose([
        f"paths.data_dir={data}", f"model.path={assets / 'pipeline'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"tracking.artifact_dir={root / 'mlartifacts'}",
        *FAST, *overrides,
    ])


class Killed(Exception):
    pass


def killed_at_step(cfg, monkeypatch, step: int) -> None:
    """Run the stage until it dies at optimizer step `step` (an exception where a kill would be)."""
    real_step = training_step

    def dies(state, micro_batches, at, generators):
        if at == step:
            raise Killed
        return real_step(state, micro_batches, at, generators)

    monkeypatch.setattr("artmaster.training.loop.training_step", dies)
    with pytest.raises(Killed):
        train.run(cfg)
    monkeypatch.undo()
