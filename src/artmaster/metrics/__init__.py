"""Style-fidelity metrics: how closely images follow one painter's works.

Typical use (settings from `cfg.style_metric`, conf/style_metric/default.yaml)::

    extractor = StyleFeatureExtractor.from_config(cfg.style_metric)
    reference, _ = extractor.extract_folder(painter_dir)
    model = StyleModel.fit(reference, cfg.style_metric)
    images, skipped = extractor.extract_folder(generated_dir)
    model.score(images)           # style_score per image, higher = closer to the painter
    model.set_distance(images)    # KID against the references, with a bootstrap interval
    model.score_region(extractor.region_features(image, box)).worst_block
"""

from artmaster.metrics.features import (
    FeatureSet,
    FeatureSettings,
    ImageReadError,
    StyleFeatureExtractor,
    image_files,
    load_rgb,
)
from artmaster.metrics.model import ModelSettings, RegionScore, StyleModel
from artmaster.metrics.stats import Interval, PairedEffect, bootstrap_mean, paired_effect
from artmaster.metrics.validation import Validation, choose_block_weights, validate

__all__ = [
    "FeatureSet",
    "FeatureSettings",
    "ImageReadError",
    "Interval",
    "ModelSettings",
    "PairedEffect",
    "RegionScore",
    "StyleFeatureExtractor",
    "StyleModel",
    "Validation",
    "bootstrap_mean",
    "choose_block_weights",
    "image_files",
    "load_rgb",
    "paired_effect",
    "validate",
]
