"""The data contract between stages, in code: the rows of data/crop/crops.jsonl and
data/caption/captions.jsonl, the train / held-out split, sizes FLUX accepts (also the size a stage's
`generation` section paints at), and training examples (a crop joined with its caption).

A library module: the stages that write these rows (crop, caption) and those that read them
(train, augment, retrain, evaluate) import it, never each other. docs/architecture.md lists the
fields of every file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from artmaster.config import Settings, stage_dir
from artmaster.files import read_jsonl

log = logging.getLogger(__name__)

# --- splits: the `split` field of crops.jsonl -----------------------------------------------------

TRAIN, HELDOUT = "train", "heldout"  # values of the `split` field of crops.jsonl


def split_rows(rows: list[dict], split: str) -> list[dict]:
    """Rows of crops.jsonl in `split` (train | heldout). Rows written before the split existed
    have no `split` field and count as train (such a crops.jsonl has no held-out scans)."""
    if split not in (TRAIN, HELDOUT):
        raise ValueError(f"split must be {TRAIN!r} or {HELDOUT!r}, got {split!r}")
    return [row for row in rows if row.get("split", TRAIN) == split]


# --- sizes ----------------------------------------------------------------------------------------


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Pixel size after `scale`; FLUX needs both sides divisible by 16 (VAE /8, then 2x2 patches)."""
    size = (round(width * scale), round(height * scale))
    if size[0] % 16 or size[1] % 16 or min(size) <= 0:
        raise ValueError(
            f"{width}x{height} scaled by train.image_scale={scale} is {size[0]}x{size[1]}; "
            "both sides must be positive multiples of 16"
        )
    return size


@dataclass(frozen=True)
class GenerationSettings(Settings):
    """A stage's `generation` section (augment's, evaluate's): the sampler and the image size."""

    width: int
    height: int
    image_scale: float
    steps: int
    guidance: float
    batch_size: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after `image_scale`, as train sees its crops."""
        return scaled_size(self.width, self.height, self.image_scale)


# --- examples: crops joined with their captions -------------------------------------------------


@dataclass(frozen=True)
class Example:
    sample_id: str
    image_path: Path
    caption: str
    size: tuple[int, int]  # (width, height) in pixels after train.image_scale


def load_examples(cfg: DictConfig) -> list[Example]:
    """Every training crop (`split: train`; the held-out scans' crops are evaluate's reference and
    never trained on) that has a caption; a crop that cannot be used is reported and skipped."""
    crop_dir = stage_dir(cfg, "crop").resolve()
    captions_file = stage_dir(cfg, "caption") / "captions.jsonl"
    captions = {str(row["crop_id"]): str(row["caption"]) for row in read_jsonl(captions_file)}
    examples, problems = [], []
    for row in split_rows(read_jsonl(crop_dir / "crops.jsonl"), TRAIN):
        crop_id = str(row.get("crop_id", ""))
        path = (crop_dir / str(row.get("path", ""))).resolve()
        if crop_id not in captions:
            problems.append(f"{crop_dir / 'crops.jsonl'}: crop {crop_id!r} has no caption in {captions_file}")
        elif not path.is_relative_to(crop_dir) or not path.is_file():
            problems.append(f"{path}: crop {crop_id!r} image missing or outside {crop_dir}")
        else:
            try:
                size = scaled_size(int(row["width"]), int(row["height"]), float(cfg.train.image_scale))
            except (KeyError, ValueError) as error:
                problems.append(f"{path}: crop {crop_id!r}: {error}")
                continue
            examples.append(Example(crop_id, path, captions[crop_id], size))
    for problem in problems:
        log.error("train: skipping %s", problem)
    if not examples:
        raise ValueError(f"train: no usable crop in {crop_dir} ({len(problems)} skipped: {'; '.join(problems[:3])})")
    return sorted(examples, key=lambda e: e.sample_id)
