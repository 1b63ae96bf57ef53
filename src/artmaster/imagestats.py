"""Small image statistics shared by stages: CIE Lab, ink density, window sums, named colours.

Everything works on numpy arrays at whatever (usually reduced) analysis resolution the caller
chooses; every threshold is a parameter so each stage keeps its values in its own conf/ group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

# sRGB (D65) -> CIE XYZ, and the D65 white point, from the sRGB and CIE definitions.
_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ],
    dtype=np.float32,
)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)


def to_float_rgb(image: Image.Image) -> np.ndarray:
    """PIL image -> (H, W, 3) float32 sRGB in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def reduced(image: Image.Image, long_side: int) -> Image.Image:
    """An antialiased copy whose long side is at most `long_side` px (never enlarged)."""
    scale = long_side / max(image.size)
    if scale >= 1.0:
        return image.convert("RGB")
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.BOX)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 1] -> CIE L*a*b* (D65): L in [0, 100], a and b roughly [-128, 127]."""
    rgb = np.asarray(rgb, dtype=np.float32)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def paper_lightness(lightness: np.ndarray, block: int, percentile: float, max_shading: float) -> np.ndarray:
    """Per-pixel estimate of the bare paper's L*: a high percentile per `block` x `block` tile,
    smoothly interpolated, so it follows uneven light. Uneven light never darkens paper by more
    than `max_shading` L* below the image's own high percentile: tiles fully covered by ink are
    lifted to that floor instead of being taken for dark paper."""
    height, width = lightness.shape
    block = max(1, min(block, height, width))
    rows, cols = -(-height // block), -(-width // block)
    padded = np.pad(lightness, ((0, rows * block - height), (0, cols * block - width)), mode="edge")
    tiles = padded.reshape(rows, block, cols, block).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    envelope = np.percentile(tiles, percentile, axis=2).astype(np.float32)
    envelope = np.maximum(envelope, np.percentile(lightness, percentile) - max_shading)
    full = ndimage.zoom(envelope, block, order=1, mode="nearest")
    return ndimage.gaussian_filter(full[:height, :width], sigma=block / 2, mode="nearest")


def paper_tint(lab: np.ndarray, percentile: float) -> np.ndarray:
    """The (a*, b*) of the paper: the median over the lightest pixels (L* at or above the
    `percentile`), which are bare paper wherever any paper shows."""
    lightness = lab[..., 0]
    light = lightness >= np.percentile(lightness, percentile)
    return np.median(lab[light][:, 1:], axis=0)


def ink_density(
    lab: np.ndarray,
    paper_block: int,
    paper_percentile: float,
    max_shading: float,
    dark_range: float,
    chroma_floor: float,
    chroma_range: float,
) -> np.ndarray:
    """(H, W) in [0, 1]: how strongly each pixel departs from the paper it is painted on.

    Darkness is measured against the local paper lightness (`paper_lightness`, robust to uneven
    light), colour as the a*b* distance from the paper's tint (`paper_tint`): tint differences
    up to `chroma_floor` are paper and mist, `dark_range` L* units of darkening or
    `chroma_floor + chroma_range` units of tint count as full density.
    """
    lightness = lab[..., 0]
    paper = paper_lightness(lightness, paper_block, paper_percentile, max_shading)
    darkness = np.clip((paper - lightness) / dark_range, 0.0, 1.0)
    tint = paper_tint(lab, paper_percentile)
    distance = np.hypot(lab[..., 1] - tint[0], lab[..., 2] - tint[1])
    colour = np.clip((distance - chroma_floor) / chroma_range, 0.0, 1.0)
    return np.maximum(darkness, colour).astype(np.float32)


def integral_image(values: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero row and column in front: sums of any box in O(1)."""
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = values.astype(np.float64).cumsum(axis=0).cumsum(axis=1)
    return table


def box_sums(table: np.ndarray, left, top, right, bottom) -> np.ndarray:
    """Sums over [left, right) x [top, bottom) for arrays of boxes, from `integral_image`."""
    return table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]


def box_iou(first: Sequence[float], second: Sequence[float]) -> float:
    """Intersection over union of two [left, top, right, bottom] boxes."""
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (_area(first) + _area(second) - inter)


def _area(box: Sequence[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def named_colour_fractions(
    lab: np.ndarray,
    prototypes: Mapping[str, Sequence[float]],
    min_chroma: float,
    tint: Sequence[float] = (0.0, 0.0),
) -> tuple[dict[str, float], np.ndarray]:
    """Assign every clearly coloured pixel (a*b* at least `min_chroma` away from `tint`, e.g.
    the paper's own tint) to the nearest named Lab prototype. Returns each name's fraction of
    all pixels and the label map (-1 = uncoloured, i = the i-th prototype in mapping order)."""
    names = list(prototypes)
    labels = np.full(lab.shape[:2], -1, dtype=np.int32)
    if not names:
        return {}, labels
    centres = np.asarray([prototypes[name] for name in names], dtype=np.float32)
    coloured = np.hypot(lab[..., 1] - tint[0], lab[..., 2] - tint[1]) >= min_chroma
    pixels = lab[coloured]
    if pixels.size:
        distances = ((pixels[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        labels[coloured] = distances.argmin(axis=1)
    total = labels.size
    fractions = {name: float((labels == index).sum()) / total for index, name in enumerate(names)}
    return fractions, labels


def small_blob_count(mask: np.ndarray, max_area: int) -> int:
    """Connected components (8-neighbourhood) of `mask` no larger than `max_area` pixels: dots."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return 0
    areas = np.bincount(components.ravel())[1:]
    return int((areas <= max_area).sum())
