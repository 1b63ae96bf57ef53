"""Does the style metric tell a painter's works from other images, also after a colour filter?

Every check holds out whole groups (a scan and all its crops; crops of one scan overlap and share
its palette, so leaving out one crop at a time would let its siblings vouch for it):

- AUC: each of the painter's works is scored by a model fitted on the painter's OTHER groups;
  every other image by the model fitted on all the painter's works; AUC of painter over others.
- the same AUC with every other image first passed through a colour filter matched to the
  painter's works (artmaster.metrics.transfer): a metric that a lookup table can fool fails here;
- `colour_gain`: the share of the gap between the others' and the painter's mean score that the
  filter closes (0 = the filter gains nothing, 1 = it makes the others score like the painter);
- retrieval: is each image's nearest image of another group (in the space whitened on all images,
  no labels used) of its own class?

`choose_block_weights` picks the block weights that separate best while the named filters close
no more than a set share of the gap: the defaults in conf/style_metric/default.yaml come from it, run on the
synthetic painters (`artmaster validate-metric --synthetic DIR --choose-weights`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.spatial.distance import cdist

from artmaster.metrics import stats
from artmaster.metrics.features import FeatureSet
from artmaster.metrics.model import ModelSettings, StyleModel, Whitener


@dataclass(frozen=True)
class Validation:
    """How well the metric tells the painter's works from other images."""

    auc: float
    auc_transferred: dict[str, float]
    colour_gain: dict[str, float]
    retrieval_accuracy: float
    painter_accuracy: float
    others_accuracy: float
    painter_groups: int
    painter_scores: np.ndarray
    others_scores: np.ndarray
    transferred_scores: dict[str, np.ndarray] = field(default_factory=dict)
    misretrieved: list[tuple[str, str]] = field(default_factory=list)

    @property
    def worst_auc(self) -> float:
        return min([self.auc, *self.auc_transferred.values()])


def _group_ids(groups: Sequence[str] | None, count: int, prefix: str) -> np.ndarray:
    if groups is None:
        return np.array([f"{prefix}{i}" for i in range(count)])
    if len(groups) != count:
        raise ValueError(f"{len(groups)} group labels for {count} images")
    return np.array([f"{prefix}{g}" for g in groups])


def leave_group_out_scores(painter: FeatureSet, groups: np.ndarray, settings: ModelSettings) -> np.ndarray:
    """Each painter work scored by a model fitted on the works of the other groups."""
    scores = np.empty(len(painter))
    for group in np.unique(groups):
        held = np.flatnonzero(groups == group)
        rest = np.flatnonzero(groups != group)
        scores[held] = StyleModel(painter.subset(rest), settings).score(painter.subset(held))
    return scores


def _gap_closed(painter: np.ndarray, others: np.ndarray, transferred: np.ndarray) -> float:
    gap = painter.mean() - others.mean()
    return float((transferred.mean() - others.mean()) / gap) if gap > 0 else float("nan")


def validate(painter: FeatureSet, others: FeatureSet, settings: ModelSettings,
             painter_groups: Sequence[str] | None = None, others_groups: Sequence[str] | None = None,
             transferred: Mapping[str, FeatureSet] | None = None) -> Validation:
    """Leave-one-group-out checks (groups = scans; None: every image its own group). `transferred`
    holds, per colour filter, the features of `others` after that filter (same order)."""
    if len(painter) < 3:
        raise ValueError(f"validation needs at least 3 of the painter's works, got {len(painter)}")
    if len(others) < 1:
        raise ValueError("validation needs at least 1 image in the other folder")
    painter_ids = _group_ids(painter_groups, len(painter), "painter:")
    if len(np.unique(painter_ids)) < 2:
        raise ValueError("validation needs the painter's works from at least 2 scans (groups)")
    others_ids = _group_ids(others_groups, len(others), "others:")

    painter_scores = leave_group_out_scores(painter, painter_ids, settings)
    model = StyleModel(painter, settings)
    others_scores = model.score(others)
    transferred = dict(transferred or {})
    transferred_scores = {name: model.score(features) for name, features in transferred.items()}

    pool = FeatureSet.concatenate([painter, others])
    labels = np.r_[np.ones(len(painter), dtype=bool), np.zeros(len(others), dtype=bool)]
    group_ids = np.r_[painter_ids, others_ids]
    embedding = Whitener(pool.image, pool.blocks, settings.block_weights, settings.std_floor)(pool.image)
    distance = cdist(embedding, embedding)
    distance[group_ids[:, None] == group_ids[None, :]] = np.inf
    nearest = distance.argmin(axis=1)
    correct = labels[nearest] == labels
    return Validation(
        auc=stats.roc_auc(painter_scores, others_scores),
        auc_transferred={name: stats.roc_auc(painter_scores, s) for name, s in transferred_scores.items()},
        colour_gain={name: _gap_closed(painter_scores, others_scores, s) for name, s in transferred_scores.items()},
        retrieval_accuracy=float(correct.mean()),
        painter_accuracy=float(correct[labels].mean()),
        others_accuracy=float(correct[~labels].mean()),
        painter_groups=len(np.unique(painter_ids)),
        painter_scores=painter_scores,
        others_scores=others_scores,
        transferred_scores=transferred_scores,
        misretrieved=[(pool.names[i], pool.names[nearest[i]]) for i in np.flatnonzero(~correct)],
    )


@dataclass(frozen=True)
class WeightChoice:
    weights: dict[str, float]
    validation: Validation
    evaluated: int


def choose_block_weights(painter: FeatureSet, others: FeatureSet, settings: ModelSettings,
                         painter_groups: Sequence[str], transferred: Mapping[str, FeatureSet],
                         candidates: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0),
                         max_colour_gain: Mapping[str, float] | None = None, sweeps: int = 4) -> WeightChoice:
    """Coordinate ascent over the block weights (each from `candidates`), starting from every
    block alone: maximise the worst AUC (plain and after each colour filter) among weightings
    where each filter named in `max_colour_gain` closes at most that share of the gap.
    Deterministic."""
    limits = dict(max_colour_gain or {})
    blocks = list(painter.blocks)
    cache: dict[tuple[float, ...], tuple[float, Validation]] = {}

    def objective(weights: dict[str, float]) -> tuple[float, Validation]:
        key = tuple(weights[b] for b in blocks)
        if key not in cache:
            result = validate(painter, others, replace(settings, block_weights=weights), painter_groups,
                              transferred=transferred)
            excess = max([0.0, *(result.colour_gain[m] - limit for m, limit in limits.items()
                                 if np.isfinite(result.colour_gain.get(m, np.nan)))])
            cache[key] = (result.worst_auc - 10.0 * excess, result)
        return cache[key]

    best_weights, (best_value, best_result) = None, (-np.inf, None)
    for start in blocks:
        weights = {b: float(b == start) for b in blocks}
        value, result = objective(weights)
        for _ in range(sweeps):
            improved = False
            for block in blocks:
                for candidate in candidates:
                    trial = {**weights, block: float(candidate)}
                    if trial == weights or not any(trial.values()):
                        continue
                    trial_value, trial_result = objective(trial)
                    if trial_value > value + 1e-9:
                        weights, value, result, improved = trial, trial_value, trial_result, True
            if not improved:
                break
        if value > best_value + 1e-9:
            best_weights, best_value, best_result = weights, value, result
    return WeightChoice(best_weights, best_result, len(cache))
