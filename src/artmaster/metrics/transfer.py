"""Colour filters matched to a painter's works: the trivial trick every style claim must beat.

Both filters are pure colour-to-colour maps (a lookup table: no model, no change of content):

- `channels`: each RGB channel histogram-matched to the pooled pixels of the reference images
  (a per-channel 256-entry lookup table);
- `joint`: the whole 3-D colour distribution matched, by iterative distribution transfer (Pitié
  et al. 2005): per-axis histogram matching along a fixed sequence of random rotations of RGB,
  which converges to a map of the source colours onto the reference's joint colour distribution
  (a 3-D lookup table; it reproduces the painter's palette proportions, not only each channel's).

The validation of the style metric (`artmaster validate-metric`) scores other painters' works
after each filter, and evaluate scores the base model's images after `channels` as baselines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

METHODS = ("channels", "joint")


def _pixels(images: Sequence[Image.Image]) -> np.ndarray:
    return np.concatenate([np.asarray(image.convert("RGB"), dtype=np.uint8).reshape(-1, 3) for image in images])


@dataclass(frozen=True)
class ChannelMatcher:
    """Per-channel histogram matching to pooled reference pixels. Hand-written rather than
    skimage's match_histograms: the reference's 256-bin CDFs are computed once, not per image."""

    reference_cdf: np.ndarray  # (3, 256)

    @classmethod
    def fit(cls, references: Sequence[Image.Image]) -> ChannelMatcher:
        pixels = _pixels(references)
        counts = np.stack([np.bincount(pixels[:, c], minlength=256) for c in range(3)]).astype(np.float64)
        return cls(np.cumsum(counts, axis=1) / len(pixels))

    def __call__(self, image: Image.Image) -> Image.Image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        out = np.empty_like(pixels)
        for c in range(3):
            counts = np.bincount(pixels[..., c].ravel(), minlength=256)
            source_cdf = np.cumsum(counts) / pixels[..., c].size
            # each source level goes to the first reference level whose CDF reaches its own
            lookup = np.searchsorted(self.reference_cdf[c], source_cdf - 1e-12).clip(0, 255).astype(np.uint8)
            out[..., c] = lookup[pixels[..., c]]
        return Image.fromarray(out)


@dataclass(frozen=True)
class JointMatcher:
    """Iterative distribution transfer onto a sample of the reference pixels."""

    rotations: np.ndarray  # (iterations, 3, 3) orthonormal
    targets: np.ndarray  # (iterations, n, 3): the reference sample along each rotation's axes, sorted

    @classmethod
    def fit(cls, references: Sequence[Image.Image], iterations: int = 12, sample: int = 200_000,
            seed: int = 0) -> JointMatcher:
        rng = np.random.default_rng(seed)
        pixels = _pixels(references).astype(np.float64)
        if len(pixels) > sample:
            pixels = pixels[rng.choice(len(pixels), sample, replace=False)]
        rotations = np.stack([np.linalg.qr(rng.standard_normal((3, 3)))[0] for _ in range(iterations)])
        # the same for every image: sorted once here, not per image
        return cls(rotations, np.stack([np.sort(pixels @ rotation, axis=0) for rotation in rotations]))

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        colours = rgb.reshape(-1, 3)
        count = self.targets.shape[1]
        reference_quantiles = (np.arange(count) + 0.5) / count
        for rotation, target in zip(self.rotations, self.targets):
            rotated = colours @ rotation
            for axis in range(3):
                # each value's mid-rank quantile: equal colours share it, so the map is a function
                # of the colour alone (a lookup table), as a filter is
                values = np.sort(rotated[:, axis])
                rank = (np.searchsorted(values, rotated[:, axis], "left")
                        + np.searchsorted(values, rotated[:, axis], "right")) / 2
                rotated[:, axis] = np.interp(rank / len(values), reference_quantiles, target[:, axis])
            colours = rotated @ rotation.T
        return Image.fromarray(np.clip(np.round(colours), 0, 255).astype(np.uint8).reshape(rgb.shape))


def colour_matcher(method: str, references: Sequence[Image.Image]):
    """A callable image -> image that matches colours to `references` by `method` (METHODS)."""
    if method == "channels":
        return ChannelMatcher.fit(references)
    if method == "joint":
        return JointMatcher.fit(references)
    raise ValueError(f"colour transfer method {method!r}: expected one of {', '.join(METHODS)}")
