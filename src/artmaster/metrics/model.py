"""The reference model of one painter: where their works lie in feature space, and how far other
images (or regions of them) are from there."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial.distance import cdist

from artmaster.metrics import stats
from artmaster.metrics.features import FeatureSet

if TYPE_CHECKING:
    from omegaconf import DictConfig


@dataclass(frozen=True)
class ModelSettings:
    k: int
    std_floor: float
    block_weights: dict[str, float]
    kid_degree: int
    kid_coef0: float
    bootstrap: int
    confidence: float
    permutations: int
    seed: int

    @classmethod
    def from_config(cls, metrics: DictConfig) -> ModelSettings:
        settings = cls(
            k=int(metrics.model.k),
            std_floor=float(metrics.model.std_floor),
            block_weights={str(name): float(w) for name, w in metrics.model.block_weights.items()},
            kid_degree=int(metrics.kid.degree),
            kid_coef0=float(metrics.kid.coef0),
            bootstrap=int(metrics.stats.bootstrap),
            confidence=float(metrics.stats.confidence),
            permutations=int(metrics.stats.permutations),
            seed=int(metrics.stats.seed),
        )
        if settings.k < 1:
            raise ValueError(f"metrics.model.k must be >= 1, got {settings.k}")
        if not 0 < settings.confidence < 1:
            raise ValueError(f"metrics.stats.confidence must be in (0, 1), got {settings.confidence}")
        return settings


@dataclass(frozen=True)
class RegionScore:
    """How a region compares with reference tiles: `style_score` on the same scale as image
    scores, and per block the distance to the nearest reference tiles relative to the distance
    typical among the references themselves (1 = typical; larger = further off)."""

    style_score: float
    deviation: dict[str, float]

    @property
    def worst_block(self) -> str:
        return max(self.deviation, key=self.deviation.get)


class _Standardiser:
    """Centre and scale each dimension on reference rows, then weight each block equally:
    after it, every block adds about weight^2 to a reference row's squared norm, whatever its
    number of dimensions. A dimension's scale never drops below `std_floor` times the mean scale
    of its block, so dimensions that barely vary among the references cannot dominate."""

    def __init__(self, rows: np.ndarray, blocks: dict[str, slice], weights: dict[str, float], std_floor: float):
        self.mean = rows.mean(axis=0)
        spread = rows.std(axis=0, ddof=1)
        self.factor = np.zeros(rows.shape[1])
        self.blocks = blocks
        for name, part in blocks.items():
            if name not in weights:
                raise ValueError(f"metrics.model.block_weights has no weight for feature block {name!r}")
            block_spread = spread[part]
            floor = std_floor * block_spread.mean()
            if floor <= 0:  # the block is constant over the references: measure it in raw units
                floor = 1.0
            scale = np.maximum(block_spread, floor)
            self.factor[part] = weights[name] / math.sqrt(part.stop - part.start) / scale
        self.squared_norm = sum(weights[name] ** 2 for name in blocks)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return (rows - self.mean) * self.factor


def _mean_nearest(distance: np.ndarray, k: int) -> np.ndarray:
    return np.sort(distance, axis=1)[:, :k].mean(axis=1)


class StyleModel:
    """Fitted on one painter's reference works (a FeatureSet); scores other images against them.

    style_score = -(mean distance to the k nearest references) / (the median of the same quantity
    for each reference against the others). A typical reference work scores about -1; 0 would be
    indistinguishable from the references; the further from the painter, the lower."""

    def __init__(self, reference: FeatureSet, settings: ModelSettings):
        if len(reference) < 2:
            raise ValueError(f"a style model needs at least 2 reference images, got {len(reference)}")
        self.reference = reference
        self.settings = settings
        self.k = min(settings.k, len(reference) - 1)
        self.standardise = _Standardiser(reference.image, reference.blocks, settings.block_weights, settings.std_floor)
        self.reference_embedding = self.standardise(reference.image)
        among = cdist(self.reference_embedding, self.reference_embedding)
        np.fill_diagonal(among, np.inf)
        self.typical_distance = float(np.median(_mean_nearest(among, self.k)))
        if self.typical_distance <= 0:
            raise ValueError("the reference images are (near) duplicates of each other: no spread to compare against")

    @classmethod
    def fit(cls, reference: FeatureSet, metrics: DictConfig) -> StyleModel:
        return cls(reference, ModelSettings.from_config(metrics))

    def embed(self, features: FeatureSet) -> np.ndarray:
        """Image rows in the model's space (standardised, block-weighted); for distances."""
        if features.blocks != self.reference.blocks:
            raise ValueError(
                f"features have blocks {list(features.blocks)} but the model was fitted on "
                f"{list(self.reference.blocks)}: extract both with the same settings and backend"
            )
        return self.standardise(features.image)

    def nearest_references(self, features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        """(index, distance) of each image's nearest reference work (memorisation checks)."""
        distance = cdist(self.embed(features), self.reference_embedding)
        index = distance.argmin(axis=1)
        return index, distance[np.arange(len(index)), index]

    def score(self, features: FeatureSet) -> np.ndarray:
        """One style_score per image: higher = closer to the painter."""
        distance = cdist(self.embed(features), self.reference_embedding)
        return -_mean_nearest(distance, self.k) / self.typical_distance

    def set_distance(self, features: FeatureSet) -> stats.Interval:
        """KID (unbiased MMD^2, polynomial kernel) of the images against the references, with a
        bootstrap interval; about 0 when they come from the painter's distribution."""
        s = self.settings
        return stats.kernel_mmd2(
            self.embed(features),
            self.reference_embedding,
            degree=s.kid_degree,
            gamma=1.0 / self.standardise.squared_norm,
            coef0=s.kid_coef0,
            bootstrap=s.bootstrap,
            confidence=s.confidence,
            seed=s.seed,
        )

    # -- regions ------------------------------------------------------------------------------

    @cached_property
    def _tile_reference(self):
        """Tile-level counterpart of the model (weight-free blocks), fitted on reference tiles;
        typical distances leave out tiles of the same work, as a region of a new image would."""
        reference = self.reference
        blocks = reference.tile_blocks
        standardise = _Standardiser(reference.tiles, blocks, self.settings.block_weights, self.settings.std_floor)
        embedding = standardise(reference.tiles)
        same_work = reference.tile_owner[:, None] == reference.tile_owner[None, :]
        k = min(self.settings.k, int((~same_work).sum(axis=1).min()))
        typical = {}
        for name, part in {**blocks, "all": slice(0, embedding.shape[1])}.items():
            distance = cdist(embedding[:, part], embedding[:, part])
            distance[same_work] = np.inf
            typical[name] = max(float(np.median(_mean_nearest(distance, k))), np.finfo(float).tiny)
        return standardise, embedding, k, typical

    def score_region(self, region: FeatureSet) -> RegionScore:
        """Score a region (from `StyleFeatureExtractor.region_features`) against reference tiles
        and say which feature block deviates most."""
        standardise, embedding, k, typical = self._tile_reference
        point = standardise(region.image[:, : embedding.shape[1]])
        deviation = {}
        for name, part in standardise.blocks.items():
            distance = cdist(point[:, part], embedding[:, part])
            deviation[name] = float(_mean_nearest(distance, k)[0] / typical[name])
        overall = float(_mean_nearest(cdist(point, embedding), k)[0] / typical["all"])
        return RegionScore(style_score=-overall, deviation=deviation)


@dataclass(frozen=True)
class Validation:
    """How well the metric tells the painter's works from other images."""

    retrieval_accuracy: float
    painter_accuracy: float
    others_accuracy: float
    auc: float
    painter_scores: np.ndarray
    others_scores: np.ndarray
    misretrieved: list[tuple[str, str]]


def validate(painter: FeatureSet, others: FeatureSet, settings: ModelSettings) -> Validation:
    """Leave-one-out checks of the metric on labelled folders.

    - Retrieval: in the space standardised on all images (no labels used), is each image's
      nearest other image from the same class (painter / others)?
    - AUC: each painter work is scored by a model fitted on the painter's other works; each other
      image by the model fitted on all of them; AUC of painter works over others."""
    if len(painter) < 3:
        raise ValueError(f"validation needs at least 3 of the painter's works, got {len(painter)}")
    if len(others) < 1:
        raise ValueError("validation needs at least 1 image in the other folder")
    pool = FeatureSet.concatenate([painter, others])
    labels = np.r_[np.ones(len(painter), dtype=bool), np.zeros(len(others), dtype=bool)]
    embed = _Standardiser(pool.image, pool.blocks, settings.block_weights, settings.std_floor)
    nearest = stats.leave_one_out_nearest(embed(pool.image))
    correct = labels[nearest] == labels
    painter_scores = np.array(
        [
            StyleModel(painter.subset([j for j in range(len(painter)) if j != i]), settings).score(painter.subset([i]))[0]
            for i in range(len(painter))
        ]
    )
    others_scores = StyleModel(painter, settings).score(others)
    return Validation(
        retrieval_accuracy=float(correct.mean()),
        painter_accuracy=float(correct[labels].mean()),
        others_accuracy=float(correct[~labels].mean()),
        auc=stats.roc_auc(painter_scores, others_scores),
        painter_scores=painter_scores,
        others_scores=others_scores,
        misretrieved=[(pool.names[i], pool.names[nearest[i]]) for i in np.flatnonzero(~correct)],
    )
