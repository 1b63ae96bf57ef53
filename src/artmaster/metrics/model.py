"""The reference model of one painter: where their works lie in feature space, and how far other
images (or regions of them) are from there."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial.distance import cdist
from scipy.linalg import cholesky, solve_triangular
from sklearn.covariance import ledoit_wolf_shrinkage

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


def _shrunk_whitening(rows: np.ndarray) -> np.ndarray:
    """W with rows @ W white: the inverse Cholesky factor of the Ledoit-Wolf estimate
    (1 - d) S + d tr(S)/p I of the covariance of centred `rows` (sklearn's shrinkage d; the
    factor is built directly rather than through LedoitWolf's eigendecomposition, ~20x faster)."""
    count, width = rows.shape
    empirical = rows.T @ rows / count
    shrinkage = ledoit_wolf_shrinkage(rows, assume_centered=True)
    covariance = (1 - shrinkage) * empirical + shrinkage * np.trace(empirical) / width * np.eye(width)
    factor = cholesky(covariance + 1e-12 * np.eye(width), lower=True)
    return solve_triangular(factor, np.eye(width), lower=True).T


class Whitener:
    """Per block: centre and scale each dimension on the reference rows, then whiten with the
    references' covariance (Ledoit-Wolf shrinkage: a few dozen works cannot estimate hundreds of
    covariances alone), so directions along which the painter's works hardly vary weigh most;
    then weight each block: every block adds about weight^2 to a reference row's squared norm,
    whatever its number of dimensions. A dimension's scale never drops below `std_floor` times
    the mean scale of its block, so dimensions constant among the references cannot explode."""

    def __init__(self, rows: np.ndarray, blocks: dict[str, slice], weights: dict[str, float], std_floor: float):
        self.blocks = blocks
        self.parts = []
        for name, part in blocks.items():
            if name not in weights:
                raise ValueError(f"metrics.model.block_weights has no weight for feature block {name!r}")
            values = rows[:, part]
            mean = values.mean(axis=0)
            spread = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
            floor = std_floor * spread.mean()
            if floor <= 0:  # the block is constant over the references: measure it in raw units
                floor = 1.0
            scale = np.maximum(spread, floor)
            standardised = (values - mean) / scale
            whiten = _shrunk_whitening(standardised) if len(values) > 1 else np.eye(values.shape[1])
            width = part.stop - part.start
            self.parts.append((part, mean, scale, whiten * (weights[name] / math.sqrt(width))))
        self.squared_norm = sum(weights[name] ** 2 for name in blocks)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the whitened space, blocks side by side (their own slices of the output)."""
        return np.concatenate([((rows[:, part] - mean) / scale) @ whiten
                               for part, mean, scale, whiten in self.parts], axis=1)


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
        self.whiten = Whitener(reference.image, reference.blocks, settings.block_weights, settings.std_floor)
        self.reference_embedding = self.whiten(reference.image)
        among = cdist(self.reference_embedding, self.reference_embedding)
        np.fill_diagonal(among, np.inf)
        self.typical_distance = float(np.median(_mean_nearest(among, self.k)))
        if self.typical_distance <= 0:
            raise ValueError("the reference images are (near) duplicates of each other: no spread to compare against")

    @classmethod
    def fit(cls, reference: FeatureSet, metrics: DictConfig) -> StyleModel:
        return cls(reference, ModelSettings.from_config(metrics))

    def embed(self, features: FeatureSet) -> np.ndarray:
        """Image rows in the model's space (whitened per block, block-weighted); for distances."""
        if features.blocks != self.reference.blocks:
            raise ValueError(
                f"features have blocks {list(features.blocks)} but the model was fitted on "
                f"{list(self.reference.blocks)}: extract both with the same settings and backend"
            )
        return self.whiten(features.image)

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
            gamma=1.0 / self.whiten.squared_norm,
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
        whiten = Whitener(reference.tiles, blocks, self.settings.block_weights, self.settings.std_floor)
        embedding = whiten(reference.tiles)
        same_work = reference.tile_owner[:, None] == reference.tile_owner[None, :]
        k = min(self.settings.k, int((~same_work).sum(axis=1).min()))
        typical = {}
        for name, part in {**blocks, "all": slice(0, embedding.shape[1])}.items():
            distance = cdist(embedding[:, part], embedding[:, part])
            distance[same_work] = np.inf
            typical[name] = max(float(np.median(_mean_nearest(distance, k))), np.finfo(float).tiny)
        return whiten, embedding, k, typical

    def score_region(self, region: FeatureSet) -> RegionScore:
        """Score a region (from `StyleFeatureExtractor.region_features`) against reference tiles
        and say which feature block deviates most."""
        whiten, embedding, k, typical = self._tile_reference
        point = whiten(region.image[:, : embedding.shape[1]])
        deviation = {}
        for name, part in whiten.blocks.items():
            distance = cdist(point[:, part], embedding[:, part])
            deviation[name] = float(_mean_nearest(distance, k)[0] / typical[name])
        overall = float(_mean_nearest(cdist(point, embedding), k)[0] / typical["all"])
        return RegionScore(style_score=-overall, deviation=deviation)
