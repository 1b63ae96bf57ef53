"""Weight-free style features of paintings: tone texture, colour structure and colour detail.

Every image is brought to one scale (short side `image.scale` px) and cut into equal tiles; each
block is computed per tile and an image's features are the mean over its tiles, so images of any
size and aspect compare like with like, and a region of an image compares with reference tiles.

The features describe how a painting is made, not its global colour or tone distribution: a
colour filter (a per-channel lookup table, or a 3-D one) matched to the painter's works moves
global histograms onto the painter's, yet leaves these blocks almost where they were
(docs/metrics.md has the measurements).

- tone_texture: local ternary patterns (uniform LBP codes of the neighbours brighter, and of those
  darker, than the centre by more than a threshold) at several scales and thresholds, on the
  image's L* after per-image histogram equalisation: any global tone curve leaves it unchanged.
- colour_structure: at what spatial scale the colour varies (dots or washes: the share of
  chroma, a* and b* energy in difference-of-Gaussians bands), where the most chromatic pixels
  sit in the tone (mean and spread of their equalised L*, and the rank correlation of chroma and
  tone), and how they cluster (the share of their neighbours at several distances that are also
  among the most chromatic).
- colour_detail: which colours occur as small details: the a*b* histogram of every pixel
  weighted by how much its colour stands out from its surroundings (colour minus its Gaussian
  blur), so emerald and ochre dots count and broad washes of the same colours do not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from scipy import ndimage
from scipy.stats import rankdata
from tqdm import tqdm

from artmaster.imagestats import rgb_to_lab

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from artmaster.metrics.backends import LearnedBackend

log = logging.getLogger(__name__)

WEIGHT_FREE_BLOCKS = ("tone_texture", "colour_structure", "colour_detail")
LEARNED_BLOCK = "learned"

# 8 neighbours in circular order, so "uniform" patterns are those with at most 2 bit transitions.
# (skimage's local_binary_pattern has no ternary threshold, which flat paper needs for stable codes.)
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
_LBP_CLASSES = len(_NEIGHBOURS) + 2  # uniform patterns by count of set bits (0..8) + "non-uniform"


def _uniform_pattern_table() -> np.ndarray:
    table = np.empty(256, dtype=np.int64)
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        transitions = sum(bits[i] != bits[(i + 1) % 8] for i in range(8))
        table[code] = sum(bits) if transitions <= 2 else _LBP_CLASSES - 1
    return table


_UNIFORM_PATTERN = _uniform_pattern_table()


class ImageReadError(Exception):
    """An image file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class FeatureSettings:
    scale: int
    tile: int
    max_tiles: int
    max_aspect: float
    blur: float
    texture_scales: tuple[int, ...]
    texture_thresholds: tuple[float, ...]
    colour_bands: tuple[float, ...]
    chroma_quantiles: tuple[float, ...]
    neighbour_distances: tuple[int, ...]
    equalisation_clip: float
    min_chroma: float
    detail_sigma: float
    ab_bins: int
    ab_range: float

    @classmethod
    def from_config(cls, metrics: DictConfig) -> FeatureSettings:
        """Read `style_metric` (conf/style_metric/default.yaml) and check its consistency."""
        settings = cls(
            scale=int(metrics.image.scale),
            tile=int(metrics.image.tile),
            max_tiles=int(metrics.image.max_tiles),
            max_aspect=float(metrics.image.max_aspect),
            blur=float(metrics.image.blur),
            texture_scales=tuple(int(s) for s in metrics.tone_texture.scales),
            texture_thresholds=tuple(float(t) for t in metrics.tone_texture.thresholds),
            equalisation_clip=float(metrics.tone_texture.equalisation_clip),
            min_chroma=float(metrics.colour_structure.min_chroma),
            colour_bands=tuple(float(s) for s in metrics.colour_structure.bands),
            chroma_quantiles=tuple(float(q) for q in metrics.colour_structure.chroma_quantiles),
            neighbour_distances=tuple(int(d) for d in metrics.colour_structure.neighbour_distances),
            detail_sigma=float(metrics.colour_detail.sigma),
            ab_bins=int(metrics.colour_detail.ab_bins),
            ab_range=float(metrics.colour_detail.ab_range),
        )
        if settings.scale < settings.tile:
            raise ValueError(f"metrics.image.scale ({settings.scale}) must be >= image.tile ({settings.tile})")
        for factor in settings.texture_scales:
            if factor < 1 or settings.tile % factor or settings.tile // factor < 3:
                raise ValueError(
                    f"metrics.tone_texture.scales: {factor} must divide image.tile ({settings.tile}) "
                    "and leave at least 3 px"
                )
        if not settings.texture_thresholds or not settings.colour_bands or not settings.chroma_quantiles:
            raise ValueError("metrics: tone_texture.thresholds, colour_structure.bands and "
                             "colour_structure.chroma_quantiles must not be empty")
        if not all(0 < q < 1 for q in settings.chroma_quantiles):
            raise ValueError(f"metrics.colour_structure.chroma_quantiles must lie in (0, 1), got {settings.chroma_quantiles}")
        if not all(0 < d < settings.tile for d in settings.neighbour_distances):
            raise ValueError(f"metrics.colour_structure.neighbour_distances must lie in (0, image.tile), "
                             f"got {settings.neighbour_distances}")
        if settings.max_aspect < 1:
            raise ValueError(f"metrics.image.max_aspect must be >= 1, got {settings.max_aspect}")
        return settings


@dataclass
class FeatureSet:
    """Features of a set of images: one row per image, one row per tile, named column blocks.

    `tiles` holds only the weight-free blocks (the learned block, when present, is per image and
    comes last in `image`), so `blocks` slices apply to both matrices for the weight-free blocks.
    """

    names: list[str]
    image: np.ndarray
    tiles: np.ndarray
    tile_owner: np.ndarray
    blocks: dict[str, slice]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def tile_blocks(self) -> dict[str, slice]:
        return {name: part for name, part in self.blocks.items() if part.stop <= self.tiles.shape[1]}

    def subset(self, indices: Sequence[int]) -> FeatureSet:
        indices = np.asarray(indices, dtype=np.int64)
        # Keep tiles grouped in the order of `indices`, so duplicates and reordering work.
        tile_rows = [np.flatnonzero(self.tile_owner == i) for i in indices]
        owners = [np.full(len(rows), position) for position, rows in enumerate(tile_rows)]
        return FeatureSet(
            names=[self.names[i] for i in indices],
            image=self.image[indices],
            tiles=self.tiles[np.concatenate(tile_rows)] if tile_rows else self.tiles[:0],
            tile_owner=np.concatenate(owners) if owners else self.tile_owner[:0],
            blocks=dict(self.blocks),
        )

    @staticmethod
    def concatenate(sets: Sequence[FeatureSet]) -> FeatureSet:
        if any(s.blocks != sets[0].blocks for s in sets):
            raise ValueError("cannot concatenate feature sets computed with different settings")
        offsets = np.cumsum([0, *(len(s) for s in sets[:-1])])
        return FeatureSet(
            names=[name for s in sets for name in s.names],
            image=np.concatenate([s.image for s in sets]),
            tiles=np.concatenate([s.tiles for s in sets]),
            tile_owner=np.concatenate([s.tile_owner + offset for s, offset in zip(sets, offsets)]),
            blocks=dict(sets[0].blocks),
        )


def image_files(folder: Path) -> list[Path]:
    """Files under `folder` (recursively) whose extension Pillow knows, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    known = {ext.lower() for ext in Image.registered_extensions()}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in known)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16-bit and float greyscale are rescaled, transparency is
    composited onto white (a transparent background is usually bare paper)."""
    if image.mode in {"I", "F"} or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max(initial=0.0))
        full_scale = 65535.0 if image.mode.startswith("I;16") or peak > 255 else (255.0 if peak > 1 else 1.0)
        image = Image.fromarray(np.clip(values / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or "transparency" in image.info:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Read one image file as 8-bit RGB, honouring EXIF orientation; ImageReadError otherwise."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            rgb = to_rgb(image)
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ImageReadError(path, f"not a readable image ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(path, f"damaged or unsupported image ({err})") from err
    return rgb


def _soft_bins(values: np.ndarray, bins: int, low: float, high: float):
    """Linear-interpolation binning: each value splits its unit weight between the two nearest bin
    centres, so a small shift of colour or tone moves the histogram smoothly."""
    position = (np.clip(values, low, high) - low) / (high - low) * bins - 0.5
    lower = np.floor(position)
    upper_weight = (position - lower).astype(np.float64)
    lower_index = np.clip(lower, 0, bins - 1).astype(np.int64)
    upper_index = np.clip(lower + 1, 0, bins - 1).astype(np.int64)
    return ((lower_index, 1.0 - upper_weight), (upper_index, upper_weight))


def _per_tile_histogram(index: np.ndarray, weight: np.ndarray, bins: int) -> np.ndarray:
    """Histograms of `index` (tiles, pixels) weighted by `weight`, one row per tile."""
    tiles = index.shape[0]
    flat = (index.reshape(tiles, -1) + np.arange(tiles)[:, None] * bins).ravel()
    counts = np.bincount(flat, weights=np.broadcast_to(weight, index.shape).ravel(), minlength=tiles * bins)
    return counts.reshape(tiles, bins)


def _tile_starts(length: int, tile: int) -> np.ndarray:
    """Evenly spaced tile starts covering [0, length) with as few tiles as possible."""
    count = math.ceil(length / tile)
    return np.linspace(0, length - tile, count).round().astype(np.int64)


def equalise_lightness(lightness: np.ndarray, clip: float) -> np.ndarray:
    """L* (0-100) through contrast-limited histogram equalisation, to [0, 1]: the histogram of
    1-L* bins is clipped at `clip` times its mean height (the excess spread evenly) before its CDF
    becomes the tone map. A global tone curve then hardly moves the result, while the map's slope
    stays at most `clip` times the identity's, so JPEG noise on flat paper is not blown up into
    texture (plain equalisation, clip = inf, would rank that noise across a wide range)."""
    counts, _ = np.histogram(lightness, bins=100, range=(0.0, 100.0))
    limit = clip * counts.sum() / 100
    clipped = np.minimum(counts, limit)
    clipped += (counts.sum() - clipped.sum()) / 100
    cdf = np.concatenate([[0.0], np.cumsum(clipped)]) / clipped.sum()
    return np.interp(lightness, np.arange(101, dtype=np.float64), cdf)


def _rank_normalised(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Each value's rank among `values` (along `axis`), ties sharing their mean rank, mapped to [0, 1]:
    unchanged by any increasing function of the values (a tone curve, a contrast change)."""
    count = values.size if axis is None else values.shape[axis]
    return (rankdata(values, method="average", axis=axis) - 1.0) / max(count - 1, 1)


def _band_shares(channel: np.ndarray, sigmas: Sequence[float], floor: float) -> np.ndarray:
    """(tiles, h, w) -> (tiles, len(sigmas) + 1): the square root of the share of each tile's
    variance in difference-of-Gaussians bands (finest first) and in what is left above the
    coarsest; whether a quantity varies in dots, strokes or broad washes. Shares are of at least
    `floor`^2, so a tile where the quantity hardly varies has small shares, not ones its noise
    (JPEG blocks, grain) decides."""
    levels = [channel.astype(np.float64)]
    levels += [ndimage.gaussian_filter(levels[0], (0, sigma, sigma), mode="reflect") for sigma in sigmas]
    bands = [finer - coarser for finer, coarser in zip(levels, levels[1:])]
    bands.append(levels[-1] - levels[-1].mean(axis=(1, 2), keepdims=True))
    energy = np.stack([(band**2).mean(axis=(1, 2)) for band in bands], axis=1)
    return np.sqrt(energy / np.maximum(energy.sum(axis=1, keepdims=True), floor**2))


def _row_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of x with the same row of y; 0 where either is constant."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    norm = np.sqrt((x**2).sum(axis=1) * (y**2).sum(axis=1))
    return np.where(norm > 1e-12, (x * y).sum(axis=1) / np.maximum(norm, 1e-12), 0.0)


def _neighbour_share(mask: np.ndarray, distance: int) -> np.ndarray:
    """(tiles, h, w) 0/1 -> per tile, the share of the set pixels' neighbours at `distance` (up,
    down, left, right, inside the tile) that are set too: high for washes, low for scattered dots."""
    pairs = 2 * ((mask[:, distance:, :] * mask[:, :-distance, :]).sum(axis=(1, 2))
                 + (mask[:, :, distance:] * mask[:, :, :-distance]).sum(axis=(1, 2)))
    return pairs / np.maximum(4 * mask.sum(axis=(1, 2)), 1.0)


class StyleFeatureExtractor:
    """Computes FeatureSets for images, files and regions with one fixed set of settings."""

    def __init__(self, settings: FeatureSettings, backend: LearnedBackend | None = None):
        self.settings = settings
        self.backend = backend
        sizes = {
            "tone_texture": 2 * _LBP_CLASSES * len(settings.texture_scales) * len(settings.texture_thresholds),
            "colour_structure": 3 * (len(settings.colour_bands) + 1) + 2 * len(settings.chroma_quantiles) + 1
            + len(settings.chroma_quantiles) * len(settings.neighbour_distances),
            "colour_detail": settings.ab_bins**2,
        }
        self.blocks: dict[str, slice] = {}
        start = 0
        for name in WEIGHT_FREE_BLOCKS:
            self.blocks[name] = slice(start, start + sizes[name])
            start += sizes[name]
        self.tile_dim = start

    @classmethod
    def from_config(cls, metrics: DictConfig) -> StyleFeatureExtractor:
        """Extractor for `style_metric`, with the learned backend when one is configured and
        present on disk (skipped with a logged message otherwise)."""
        from artmaster.metrics.backends import load_backend

        return cls(FeatureSettings.from_config(metrics), load_backend(metrics))

    # -- geometry ---------------------------------------------------------------------------

    def at_scale(self, image: Image.Image) -> tuple[Image.Image, float, tuple[int, int]]:
        """Centre-crop to `max_aspect`, resize so the short side is `scale` px, blur slightly.

        Returns the resized image, the resize factor and the crop offset in source pixels."""
        width, height = image.size
        short = min(width, height)
        longest = max(short, int(short * self.settings.max_aspect))
        crop_w, crop_h = min(width, longest), min(height, longest)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        if (crop_w, crop_h) != (width, height):
            image = image.crop((left, top, left + crop_w, top + crop_h))
        factor = self.settings.scale / short
        size = (max(self.settings.scale, round(crop_w * factor)), max(self.settings.scale, round(crop_h * factor)))
        resized = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        if self.settings.blur > 0:
            resized = resized.filter(ImageFilter.GaussianBlur(self.settings.blur))
        return resized, factor, (left, top)

    def _tiles(self, pixels: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """(tiles, tile, tile[, channels]) cut from an image at scale, inside `box` (default: everything)."""
        tile = self.settings.tile
        height, width = pixels.shape[:2]
        left, top, right, bottom = box or (0, 0, width, height)
        starts = [
            (y, x) for y in _tile_starts(bottom - top, tile) + top for x in _tile_starts(right - left, tile) + left
        ]
        if len(starts) > self.settings.max_tiles:
            keep = np.linspace(0, len(starts) - 1, self.settings.max_tiles).round().astype(np.int64)
            starts = [starts[i] for i in keep]
        return np.stack([pixels[y : y + tile, x : x + tile] for y, x in starts])

    # -- feature blocks ---------------------------------------------------------------------

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """An image at scale as (CIE Lab, equalised L* in [0, 1]), both (H, W[, 3]).

        Equalisation is over the whole image, so a region's tiles see the same tone mapping as the
        image; it is contrast-limited (`equalise_lightness`), so flat paper stays flat."""
        scaled, _, _ = self.at_scale(to_rgb(image))
        lab = rgb_to_lab(np.asarray(scaled, dtype=np.float32) / 255.0)
        return lab, equalise_lightness(lab[..., 0], self.settings.equalisation_clip)

    def tile_features(self, lab_tiles: np.ndarray, tone_tiles: np.ndarray) -> np.ndarray:
        """(tiles, h, w, 3) Lab and (tiles, h, w) equalised L* -> (tiles, tile_dim) features."""
        blocks = (
            self._tone_texture(tone_tiles),
            self._colour_structure(lab_tiles, tone_tiles),
            self._colour_detail(lab_tiles),
        )
        return np.concatenate(blocks, axis=1)

    def _tone_texture(self, tone: np.ndarray) -> np.ndarray:
        tiles, height, width = tone.shape
        histograms = []
        for factor in self.settings.texture_scales:
            small = tone.reshape(tiles, height // factor, factor, width // factor, factor).mean(axis=(2, 4))
            rows, cols = small.shape[1] - 2, small.shape[2] - 2
            centre = small[:, 1:-1, 1:-1]
            neighbours = [small[:, 1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols] for dy, dx in _NEIGHBOURS]
            for threshold in self.settings.texture_thresholds:
                brighter = np.zeros(centre.shape, dtype=np.int64)
                darker = np.zeros(centre.shape, dtype=np.int64)
                for bit, neighbour in enumerate(neighbours):
                    brighter |= (neighbour > centre + threshold).astype(np.int64) << bit
                    darker |= (neighbour < centre - threshold).astype(np.int64) << bit
                for codes in (brighter, darker):
                    counts = _per_tile_histogram(_UNIFORM_PATTERN[codes], np.ones(1), _LBP_CLASSES)
                    histograms.append(np.sqrt(counts / (rows * cols)))
        return np.concatenate(histograms, axis=1)

    def _colour_structure(self, lab: np.ndarray, tone: np.ndarray) -> np.ndarray:
        s = self.settings
        tiles = lab.shape[0]
        chroma = np.hypot(lab[..., 1], lab[..., 2])
        parts = [_band_shares(channel, s.colour_bands, s.min_chroma) for channel in (chroma, lab[..., 1], lab[..., 2])]
        # ranks among the tile's coloured pixels only: in a grey tile, JPEG noise would decide them
        coloured = chroma > s.min_chroma
        chroma_rank = np.where(coloured, _rank_normalised(chroma.reshape(tiles, -1), axis=1).reshape(chroma.shape), 0.0)
        flat_tone = tone.reshape(tiles, -1)
        for quantile in s.chroma_quantiles:
            most = (chroma_rank >= quantile).reshape(tiles, -1)
            count = np.maximum(most.sum(axis=1), 1)
            mean = np.where(most.any(axis=1), (flat_tone * most).sum(axis=1) / count, 0.5)
            spread = np.sqrt(np.maximum((flat_tone**2 * most).sum(axis=1) / count - mean**2, 0.0))
            parts.append(np.stack([mean, spread], axis=1))
        parts.append(_row_correlation(chroma_rank.reshape(tiles, -1), flat_tone)[:, None])
        for quantile in s.chroma_quantiles:
            most = (chroma_rank >= quantile).astype(np.float64)
            parts.append(np.stack([_neighbour_share(most, d) for d in s.neighbour_distances], axis=1))
        return np.concatenate(parts, axis=1)

    def _colour_detail(self, lab: np.ndarray) -> np.ndarray:
        s = self.settings
        a, b = lab[..., 1].astype(np.float64), lab[..., 2].astype(np.float64)
        blur = (0, s.detail_sigma, s.detail_sigma)
        stand_out = np.hypot(a - ndimage.gaussian_filter(a, blur), b - ndimage.gaussian_filter(b, blur))
        tiles = a.shape[0]
        histogram = np.zeros((tiles, s.ab_bins * s.ab_bins))
        for a_index, a_weight in _soft_bins(a, s.ab_bins, -s.ab_range, s.ab_range):
            for b_index, b_weight in _soft_bins(b, s.ab_bins, -s.ab_range, s.ab_range):
                histogram += _per_tile_histogram(a_index * s.ab_bins + b_index, a_weight * b_weight * stand_out,
                                                 s.ab_bins**2)
        return np.sqrt(histogram / (a[0].size * s.ab_range))

    # -- public entry points ----------------------------------------------------------------

    def image_tile_features(self, image: Image.Image) -> np.ndarray:
        lab, tone = self.prepare(image)
        return self.tile_features(self._tiles(lab), self._tiles(tone))

    def _assemble(self, names: list[str], per_image_tiles: list[np.ndarray], learned: np.ndarray | None) -> FeatureSet:
        image = np.stack([t.mean(axis=0) for t in per_image_tiles]) if per_image_tiles else np.zeros((0, self.tile_dim))
        blocks = dict(self.blocks)
        if learned is not None:
            blocks[LEARNED_BLOCK] = slice(self.tile_dim, self.tile_dim + learned.shape[1])
            image = np.concatenate([image, learned], axis=1)
        return FeatureSet(
            names=names,
            image=image,
            tiles=np.concatenate(per_image_tiles) if per_image_tiles else np.zeros((0, self.tile_dim)),
            tile_owner=np.concatenate([np.full(len(t), i) for i, t in enumerate(per_image_tiles)])
            if per_image_tiles
            else np.zeros(0, dtype=np.int64),
            blocks=blocks,
        )

    def extract(self, images: Sequence[Image.Image], names: Sequence[str] | None = None) -> FeatureSet:
        """Features of in-memory images (any mode, any size)."""
        names = list(names) if names is not None else [f"image_{i}" for i in range(len(images))]
        per_image = [self.image_tile_features(image) for image in images]
        learned = self.backend.embed([to_rgb(image) for image in images]) if self.backend else None
        return self._assemble(names, per_image, learned)

    def extract_files(
        self, paths: Iterable[Path], root: Path | None = None, progress: bool = True
    ) -> tuple[FeatureSet, list[ImageReadError]]:
        """Features of image files; unreadable files are logged, skipped and returned.

        Names are paths relative to `root` when given. Files are read in batches so that only a
        batch of decoded images is held in memory (the learned backend embeds per batch)."""
        paths = list(paths)
        batch = self.backend.batch_size if self.backend else 1
        names, per_image, learned, skipped = [], [], [], []
        with tqdm(total=len(paths), desc="style features", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), batch):
                loaded = []
                for path in paths[start : start + batch]:
                    try:
                        loaded.append((path, load_rgb(path)))
                    except ImageReadError as err:
                        log.warning("skipped %s", err)
                        skipped.append(err)
                    bar.update()
                for path, image in loaded:
                    names.append(str(path.relative_to(root)) if root else path.name)
                    per_image.append(self.image_tile_features(image))
                if self.backend and loaded:
                    learned.append(self.backend.embed([image for _, image in loaded]))
        learned_matrix = None
        if self.backend:
            learned_matrix = np.concatenate(learned) if learned else np.zeros((0, self.backend.dim))
        return self._assemble(names, per_image, learned_matrix), skipped

    def extract_folder(self, folder: Path, progress: bool = True) -> tuple[FeatureSet, list[ImageReadError]]:
        return self.extract_files(image_files(folder), root=Path(folder), progress=progress)

    def region_features(self, image: Image.Image, box: Sequence[float], name: str = "region") -> FeatureSet:
        """Features of one region of `image`; `box` = [left, top, right, bottom] in its pixels.

        The region is measured at the same scale as whole images; a box smaller than a tile is
        widened around its centre to one tile, so it compares with reference tiles."""
        rgb = to_rgb(image)
        _, factor, (offset_x, offset_y) = self.at_scale(rgb)
        lab, tone = self.prepare(rgb)
        height, width = tone.shape
        tile = self.settings.tile
        left, top, right, bottom = (float(v) for v in box)
        if not (right > left and bottom > top):
            raise ValueError(f"region box {list(box)} is empty: need left < right and top < bottom")
        edges = []
        for low, high, offset, limit in ((left, right, offset_x, width), (top, bottom, offset_y, height)):
            low = min(max(0, round((low - offset) * factor)), limit)
            high = min(max(0, round((high - offset) * factor)), limit)
            if high - low < tile:
                centre = (low + high) / 2
                low = int(min(max(0, round(centre - tile / 2)), limit - tile))
                high = low + tile
            edges.append((low, high))
        (x0, x1), (y0, y1) = edges
        box = (x0, y0, x1, y1)
        tiles = self.tile_features(self._tiles(lab, box), self._tiles(tone, box))
        return self._assemble([name], [tiles], None)
