"""Training replicates: the same recipe trained again with other seeds, so that evaluate can say
how much a conclusion owes to one seed (and to the float rounding of one CPU, which perturbs a
run like another seed does).

`replicates.count` (conf/replicates/default.yaml) runs of train, augment and retrain, with seeds
`seed`, `seed + 1`, ... Replicate 0 is the product: its outputs are the stage's usual ones
(data/train/lora, ...). Replicate k > 0 writes the same layout into the stage folder's
`replicates/seed_<seed + k>/`, and reads its own upstream replicate there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from artmaster.config import Settings

FOLDER = "replicates"


@dataclass(frozen=True)
class ReplicatesSettings(Settings):
    count: int
    samples: str  # product | all: which replicates paint train's samples


@dataclass(frozen=True)
class Replicate:
    index: int
    seed: int

    @property
    def is_product(self) -> bool:
        return self.index == 0

    @property
    def label(self) -> str:
        return f"seed {self.seed}"

    def folder(self, stage_folder: Path) -> Path:
        """Where this replicate's outputs of a stage go (or are read) given the product's folder."""
        return Path(stage_folder) if self.is_product else Path(stage_folder) / FOLDER / f"seed_{self.seed}"

    def adapter(self, product_adapter: Path) -> Path:
        """This replicate's LoRA folder, given the product's (e.g. data/train/lora)."""
        product_adapter = Path(product_adapter)
        return self.folder(product_adapter.parent) / product_adapter.name

    def config(self, cfg: DictConfig) -> DictConfig:
        """`cfg` with this replicate's seed (every use of `seed` in the stages follows it), and
        without training samples unless `replicates.samples` is `all`."""
        if self.is_product:
            return cfg
        changes: dict = {"seed": self.seed}
        if ReplicatesSettings.from_config(cfg.replicates).samples == "product":
            changes["train"] = {"samples": {"enabled": False}}
        return OmegaConf.merge(cfg, changes)


def replicates(cfg: DictConfig) -> list[Replicate]:
    count = ReplicatesSettings.from_config(cfg.replicates).count
    if count < 1:
        raise ValueError(f"replicates.count={count}: at least 1 (the product itself)")
    return [Replicate(index, int(cfg.seed) + index) for index in range(count)]


def each(cfg: DictConfig) -> Iterator[tuple[Replicate, DictConfig]]:
    """(replicate, its config) for every replicate, the product first."""
    for replicate in replicates(cfg):
        yield replicate, replicate.config(cfg)
