"""The `augment` section's typed settings, read once by augment (and augment.rounds by retrain;
checked by `config.validate` whatever set them: this module loads without torch, as validation
runs before every stage)."""

from __future__ import annotations

from dataclasses import dataclass

from artmaster.config import Settings
from artmaster.dataset import GenerationSettings


@dataclass(frozen=True)
class FilterSettings(Settings):
    margin: float
    near_copy_distance: float


@dataclass(frozen=True)
class PictureSettings(Settings):
    panel_height: int
    font_size: int
    line_width: int
    colours: tuple[str, ...]
    contact_columns: int


@dataclass(frozen=True)
class AugmentSettings(Settings):
    round: int
    rounds: int
    prompts: tuple[str, ...]
    count: int
    seed: int
    generation: GenerationSettings
    filter: FilterSettings
    picture: PictureSettings
