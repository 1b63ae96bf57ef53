"""Weight-free style features of paintings: palette, tonal range, ink texture and brushwork.

Every image is brought to one scale (short side `image.scale` px) and cut into equal tiles; each
block is computed per tile and an image's features are the mean over its tiles, so images of any
size and aspect compare like with like, and a region of an image compares with reference tiles.

Blocks (all on CIE Lab, computed on CPU with numpy and a tiny torch conv net):
- palette: soft joint a*b* histogram (square-rooted) plus chroma moments and percentiles;
- tonal_range: soft L* histogram (square-rooted) plus L* percentiles;
- ink_texture: local ternary patterns (upper and lower uniform LBP codes) on L* at several scales;
- brushwork: Gram matrices of a fixed random-weight conv net on L* minus its local mean.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from artmaster.imagestats import rgb_to_lab

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from artmaster.metrics.backends import LearnedBackend

log = logging.getLogger(__name__)

WEIGHT_FREE_BLOCKS = ("palette", "tonal_range", "ink_texture", "brushwork")
LEARNED_BLOCK = "learned"

# 8 neighbours in circular order, so "uniform" patterns are those with at most 2 bit transitions.
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
    ab_bins: int
    ab_range: float
    chroma_percentiles: tuple[float, ...]
    tonal_bins: int
    tonal_percentiles: tuple[float, ...]
    lbp_scales: tuple[int, ...]
    lbp_threshold: float
    gram_seed: int
    gram_widths: tuple[int, ...]
    gram_kernel_size: int
    gram_detail_window: int

    @classmethod
    def from_config(cls, metrics: DictConfig) -> FeatureSettings:
        """Read `evaluate.metrics` (conf/evaluate/default.yaml) and check its consistency."""
        settings = cls(
            scale=int(metrics.image.scale),
            tile=int(metrics.image.tile),
            max_tiles=int(metrics.image.max_tiles),
            max_aspect=float(metrics.image.max_aspect),
            blur=float(metrics.image.blur),
            ab_bins=int(metrics.palette.ab_bins),
            ab_range=float(metrics.palette.ab_range),
            chroma_percentiles=tuple(float(p) for p in metrics.palette.chroma_percentiles),
            tonal_bins=int(metrics.tonal_range.bins),
            tonal_percentiles=tuple(float(p) for p in metrics.tonal_range.percentiles),
            lbp_scales=tuple(int(s) for s in metrics.ink_texture.scales),
            lbp_threshold=float(metrics.ink_texture.threshold),
            gram_seed=int(metrics.brushwork.seed),
            gram_widths=tuple(int(w) for w in metrics.brushwork.widths),
            gram_kernel_size=int(metrics.brushwork.kernel_size),
            gram_detail_window=int(metrics.brushwork.detail_window),
        )
        if settings.scale < settings.tile:
            raise ValueError(f"metrics.image.scale ({settings.scale}) must be >= image.tile ({settings.tile})")
        for factor in settings.lbp_scales:
            if settings.tile % factor or settings.tile // factor < 3:
                raise ValueError(
                    f"metrics.ink_texture.scales: {factor} must divide image.tile ({settings.tile}) "
                    "and leave at least 3 px"
                )
        if settings.gram_detail_window < 1 or settings.gram_detail_window % 2 == 0:
            raise ValueError(f"metrics.brushwork.detail_window must be odd, got {settings.gram_detail_window}")
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


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one thread for a while: the conv net's tensors are small, and with several
    threads OpenMP hand-offs and spin-waits cost more than the work, badly so on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class RandomGramNet:
    """A fixed conv net with He-scaled Gaussian weights drawn by numpy's PCG64 from one seed:
    numpy guarantees that stream across versions and platforms, unlike torch's RNG."""

    def __init__(self, seed: int, widths: Sequence[int], kernel_size: int, detail_window: int):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.detail_window = detail_window
        self.weights = []
        channels = 1
        for width in widths:
            fan_in = channels * kernel_size * kernel_size
            weight = rng.standard_normal((width, channels, kernel_size, kernel_size)) * math.sqrt(2.0 / fan_in)
            self.weights.append(torch.from_numpy(weight.astype(np.float32)))
            channels = width
        self.pairs = [torch.triu_indices(w.shape[0], w.shape[0]) for w in self.weights]

    @property
    def dim(self) -> int:
        return sum(p.shape[1] for p in self.pairs)

    def __call__(self, luminance: np.ndarray) -> np.ndarray:
        """(tiles, h, w) L*/100 -> (tiles, dim): square-rooted upper triangles of each layer's Gram.

        The net sees L* minus its local mean over `detail_window` px: strokes and edges, not the
        large tonal layout (which the tonal_range block measures)."""
        x = torch.from_numpy(np.ascontiguousarray(luminance, dtype=np.float32))[:, None]
        grams = []
        with torch.inference_mode():
            window, margin = self.detail_window, self.detail_window // 2
            padded = F.pad(x, (margin, margin, margin, margin), mode="replicate")
            local_mean = F.avg_pool2d(F.avg_pool2d(padded, (window, 1), stride=1), (1, window), stride=1)
            x = x - local_mean
            for layer, (weight, (rows, cols)) in enumerate(zip(self.weights, self.pairs)):
                if layer:
                    x = F.avg_pool2d(x, 2)
                x = F.relu(F.conv2d(x, weight))
                flat = x.flatten(2)
                gram = flat @ flat.transpose(1, 2) / flat.shape[-1]
                grams.append(gram[:, rows, cols])
        return torch.cat(grams, dim=1).sqrt().double().numpy()


class StyleFeatureExtractor:
    """Computes FeatureSets for images, files and regions with one fixed set of settings."""

    def __init__(self, settings: FeatureSettings, backend: LearnedBackend | None = None):
        self.settings = settings
        self.backend = backend
        self.gram_net = RandomGramNet(
            settings.gram_seed, settings.gram_widths, settings.gram_kernel_size, settings.gram_detail_window
        )
        sizes = {
            "palette": settings.ab_bins**2 + 4 + len(settings.chroma_percentiles),
            "tonal_range": settings.tonal_bins + len(settings.tonal_percentiles),
            "ink_texture": 2 * _LBP_CLASSES * len(settings.lbp_scales),
            "brushwork": self.gram_net.dim,
        }
        self.blocks: dict[str, slice] = {}
        start = 0
        for name in WEIGHT_FREE_BLOCKS:
            self.blocks[name] = slice(start, start + sizes[name])
            start += sizes[name]
        self.tile_dim = start

    @classmethod
    def from_config(cls, metrics: DictConfig) -> StyleFeatureExtractor:
        """Extractor for `evaluate.metrics`, with the learned backend when one is configured and
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
        """(tiles, tile, tile, 3) cut from an image at scale, inside `box` (default: everything)."""
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

    def tile_features(self, tiles: np.ndarray) -> np.ndarray:
        """(tiles, h, w, 3) uint8 -> (tiles, tile_dim) weight-free features."""
        lab = rgb_to_lab(tiles.astype(np.float32) / 255.0)
        luminance = lab[..., 0] / 100.0
        blocks = (
            self._palette(lab[..., 1], lab[..., 2]),
            self._tonal_range(lab[..., 0]),
            self._ink_texture(luminance),
            self.gram_net(luminance),
        )
        return np.concatenate(blocks, axis=1)

    def _palette(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        s = self.settings
        tiles = a.shape[0]
        histogram = np.zeros((tiles, s.ab_bins * s.ab_bins))
        for a_index, a_weight in _soft_bins(a, s.ab_bins, -s.ab_range, s.ab_range):
            for b_index, b_weight in _soft_bins(b, s.ab_bins, -s.ab_range, s.ab_range):
                histogram += _per_tile_histogram(a_index * s.ab_bins + b_index, a_weight * b_weight, s.ab_bins**2)
        histogram /= a[0].size
        a_flat, b_flat = a.reshape(tiles, -1), b.reshape(tiles, -1)
        chroma = np.hypot(a_flat, b_flat)
        moments = np.stack([a_flat.mean(1), b_flat.mean(1), a_flat.std(1), b_flat.std(1)], axis=1)
        percentiles = np.percentile(chroma, s.chroma_percentiles, axis=1).T
        return np.concatenate([np.sqrt(histogram), moments / s.ab_range, percentiles / s.ab_range], axis=1)

    def _tonal_range(self, lightness: np.ndarray) -> np.ndarray:
        s = self.settings
        tiles = lightness.shape[0]
        histogram = sum(
            _per_tile_histogram(index, weight, s.tonal_bins) for index, weight in _soft_bins(lightness, s.tonal_bins, 0, 100)
        )
        histogram /= lightness[0].size
        percentiles = np.percentile(lightness.reshape(tiles, -1), s.tonal_percentiles, axis=1).T / 100.0
        return np.concatenate([np.sqrt(histogram), percentiles], axis=1)

    def _ink_texture(self, luminance: np.ndarray) -> np.ndarray:
        tiles, height, width = luminance.shape
        threshold = self.settings.lbp_threshold
        histograms = []
        for factor in self.settings.lbp_scales:
            small = luminance.reshape(tiles, height // factor, factor, width // factor, factor).mean(axis=(2, 4))
            rows, cols = small.shape[1] - 2, small.shape[2] - 2
            centre = small[:, 1:-1, 1:-1]
            brighter = np.zeros(centre.shape, dtype=np.int64)
            darker = np.zeros(centre.shape, dtype=np.int64)
            for bit, (dy, dx) in enumerate(_NEIGHBOURS):
                neighbour = small[:, 1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]
                brighter |= (neighbour > centre + threshold).astype(np.int64) << bit
                darker |= (neighbour < centre - threshold).astype(np.int64) << bit
            for codes in (brighter, darker):
                counts = _per_tile_histogram(_UNIFORM_PATTERN[codes], np.ones(1), _LBP_CLASSES)
                histograms.append(np.sqrt(counts / (rows * cols)))
        return np.concatenate(histograms, axis=1)

    # -- public entry points ----------------------------------------------------------------

    def image_tile_features(self, image: Image.Image) -> np.ndarray:
        scaled, _, _ = self.at_scale(to_rgb(image))
        return self.tile_features(self._tiles(np.asarray(scaled)))

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
        with single_torch_thread():
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
                with single_torch_thread():
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
        scaled, factor, (offset_x, offset_y) = self.at_scale(to_rgb(image))
        width, height = scaled.size
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
        with single_torch_thread():
            tiles = self.tile_features(self._tiles(np.asarray(scaled), (x0, y0, x1, y1)))
        return self._assemble([name], [tiles], None)
