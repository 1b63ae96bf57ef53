"""Deterministic procedural landscape painter: the demo painter and a few clearly different others.

A `PainterStyle` holds a palette, brushwork and composition. `paint` renders the bare painting:
layered mountain washes with lit and shaded faces, a gorge, texture strokes, dotted trees and
mist bands. `scan` turns it into what a photographed hanging scroll looks like: toned paper with
fibres, a silk mounting border, a column of inscription, a red seal and uneven light.

Smooth fields (washes, light, mist) are computed at a reduced working resolution and upsampled;
strokes and dots are drawn at full resolution. The same (style, size, seed) gives the same bytes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageChops, ImageDraw

RGB = tuple[int, int, int]

# Long side of the grid the smooth fields are computed on; strokes and dots use full resolution.
WORK_LONG_SIDE = 640
# Layout of a hanging-scroll mount, as fractions of the scan's short side (long side for top/bottom).
MOUNT_SIDE = 0.07
MOUNT_TOP = 0.10
MOUNT_BOTTOM = 0.08
MOUNT_EDGE = 0.012


@dataclass(frozen=True)
class PainterStyle:
    """How a painter paints. Fractions are of the painting's short side unless noted."""

    name: str
    # palette
    paper: RGB
    sky: RGB  # colour the paper turns to at the top of the painting
    ink: RGB
    mountain_tints: tuple[RGB, ...]  # wash colours, far layer first
    highlight: RGB  # colour of lit faces
    mist: RGB
    tree_colours: tuple[RGB, ...]
    seal: RGB
    mount: RGB  # mounting silk
    # brushwork
    stroke_texture: float  # 0..1: how many texture strokes cover the mountains
    stroke_length: float
    dry_brush: float  # 0 wet, solid strokes .. 1 broken bristle marks
    dot_size: float
    dot_density: float  # 0..1: how many clusters of tree dots
    dot_aspect: float  # dot height / width: >1 gives conifer-like marks
    wash_softness: float  # 0 flat, hard-edged fills .. 1 soft graded washes
    edge_roughness: float  # 0 smooth ridges .. 1 jagged ridges
    outline: float  # 0..1: strength of contour lines along ridges
    # composition
    layers: int
    peak_height: float  # fraction of the painting's height
    peak_sharpness: float  # 0 round .. 1 pointed peaks
    gorge: float  # 0..1: depth of a central gorge flanked by cliffs
    mist_bands: int
    light: float  # 0..1: contrast between lit and shaded faces
    portrait_share: float  # share of this painter's works that are portrait

    def __post_init__(self):
        if self.layers < 1 or not self.mountain_tints or not self.tree_colours:
            raise ValueError(f"style {self.name!r} needs at least one layer, tint and tree colour")


STYLES: dict[str, PainterStyle] = {
    style.name: style
    for style in (
        # The demo painter (launch case): layered ink-wash mountains and gorges, strong light,
        # mist bands, bright emerald-green and ochre-yellow dotted trees.
        PainterStyle(
            name="zeng_xiaohu",
            paper=(236, 229, 212),
            sky=(242, 238, 226),
            ink=(20, 21, 24),
            mountain_tints=((168, 172, 170), (118, 121, 118), (76, 79, 76), (44, 47, 45)),
            highlight=(246, 242, 230),
            mist=(245, 243, 236),
            tree_colours=((18, 150, 96), (40, 178, 112), (214, 158, 36), (236, 196, 64), (26, 28, 30)),
            seal=(186, 32, 30),
            mount=(198, 186, 152),
            stroke_texture=0.75,
            stroke_length=0.025,
            dry_brush=0.3,
            dot_size=0.0045,
            dot_density=1.0,
            dot_aspect=1.0,
            wash_softness=0.45,
            edge_roughness=0.55,
            outline=0.45,
            layers=5,
            peak_height=0.42,
            peak_sharpness=0.65,
            gorge=0.85,
            mist_bands=3,
            light=1.0,
            portrait_share=0.7,
        ),
        # Mineral blue-green (qinglü) gongbi: flat azurite and malachite fills, crisp outlines.
        PainterStyle(
            name="blue_green_gongbi",
            paper=(230, 214, 178),
            sky=(236, 222, 190),
            ink=(62, 46, 34),
            mountain_tints=((92, 150, 178), (52, 128, 150), (46, 138, 108), (28, 104, 92)),
            highlight=(120, 176, 160),
            mist=(238, 226, 196),
            tree_colours=((30, 84, 54), (170, 62, 40), (40, 110, 70)),
            seal=(176, 40, 36),
            mount=(70, 92, 112),
            stroke_texture=0.08,
            stroke_length=0.02,
            dry_brush=0.0,
            dot_size=0.004,
            dot_density=0.3,
            dot_aspect=1.0,
            wash_softness=0.04,
            edge_roughness=0.12,
            outline=1.0,
            layers=4,
            peak_height=0.36,
            peak_sharpness=0.95,
            gorge=0.25,
            mist_bands=2,
            light=0.25,
            portrait_share=0.5,
        ),
        # Sparse dry grey strokes on much empty paper.
        PainterStyle(
            name="dry_brush_monochrome",
            paper=(226, 223, 216),
            sky=(228, 226, 220),
            ink=(78, 78, 76),
            mountain_tints=((212, 210, 204), (184, 183, 178)),
            highlight=(230, 228, 222),
            mist=(228, 226, 220),
            tree_colours=((96, 96, 94), (120, 120, 116)),
            seal=(150, 40, 40),
            mount=(160, 158, 150),
            stroke_texture=1.0,
            stroke_length=0.06,
            dry_brush=0.95,
            dot_size=0.003,
            dot_density=0.12,
            dot_aspect=1.0,
            wash_softness=0.2,
            edge_roughness=0.9,
            outline=0.7,
            layers=2,
            peak_height=0.22,
            peak_sharpness=0.4,
            gorge=0.0,
            mist_bands=1,
            light=0.15,
            portrait_share=0.5,
        ),
        # Oil-like western sunset: warm palette, smooth gradients, no outlines or texture strokes.
        PainterStyle(
            name="warm_sunset_western",
            paper=(246, 196, 132),
            sky=(236, 112, 64),
            ink=(70, 34, 46),
            mountain_tints=((196, 116, 104), (146, 74, 70), (92, 46, 48), (56, 30, 34)),
            highlight=(252, 170, 96),
            mist=(250, 200, 140),
            tree_colours=((52, 62, 30), (86, 70, 30), (200, 120, 40)),
            seal=(150, 40, 30),
            mount=(110, 80, 60),
            stroke_texture=0.0,
            stroke_length=0.05,
            dry_brush=0.0,
            dot_size=0.011,
            dot_density=0.25,
            dot_aspect=0.8,
            wash_softness=1.0,
            edge_roughness=0.2,
            outline=0.0,
            layers=4,
            peak_height=0.26,
            peak_sharpness=0.2,
            gorge=0.1,
            mist_bands=1,
            light=0.6,
            portrait_share=0.2,
        ),
        # Cold snow mountains with dark pines: white and blue, elongated dark marks.
        PainterStyle(
            name="snow_pine",
            paper=(232, 238, 244),
            sky=(206, 220, 236),
            ink=(34, 46, 70),
            mountain_tints=((206, 218, 232), (168, 184, 206), (128, 146, 174), (96, 112, 140)),
            highlight=(252, 253, 255),
            mist=(238, 243, 250),
            tree_colours=((18, 46, 40), (28, 60, 56), (40, 52, 66)),
            seal=(180, 36, 40),
            mount=(150, 162, 176),
            stroke_texture=0.35,
            stroke_length=0.03,
            dry_brush=0.5,
            dot_size=0.004,
            dot_density=0.7,
            dot_aspect=3.0,
            wash_softness=0.55,
            edge_roughness=0.4,
            outline=0.3,
            layers=4,
            peak_height=0.38,
            peak_sharpness=0.85,
            gorge=0.3,
            mist_bands=2,
            light=0.85,
            portrait_share=0.6,
        ),
    )
}

DEMO_STYLE = "zeng_xiaohu"


def style_by_name(name: str) -> PainterStyle:
    try:
        return STYLES[name]
    except KeyError:
        raise KeyError(f"unknown painter style {name!r}; known: {', '.join(STYLES)}") from None


def _rng(style: PainterStyle, seed: int, purpose: str) -> np.random.Generator:
    """Independent, stable streams per (style, seed, purpose): Python's hash() is salted per process."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([seed, zlib.crc32(style.name.encode()), zlib.crc32(purpose.encode())])


def _smooth_noise(
    rng: np.random.Generator, height: int, width: int, cells_y: int, cells_x: int
) -> np.ndarray:
    """Roughly unit-variance noise, smooth over cells of height/cells_y x width/cells_x pixels."""
    cells_y, cells_x = max(1, cells_y), max(1, cells_x)
    grid = rng.standard_normal((cells_y + 2, cells_x + 2)).astype(np.float32)
    field = Image.fromarray(grid).resize(
        (width, height), Image.Resampling.BICUBIC, box=(1, 1, cells_x + 1, cells_y + 1)
    )
    return np.asarray(field)


def _smooth_curve(rng: np.random.Generator, x: np.ndarray, octaves: int, persistence: float) -> np.ndarray:
    """1-D fractal noise on x in [0, 1] (smoothstep interpolation between random knots)."""
    total = np.zeros_like(x)
    for octave in range(octaves):
        knots = 2 ** (octave + 1) + 1
        values = rng.standard_normal(knots + 1)
        pos = x * (knots - 1)
        left = np.clip(pos.astype(int), 0, knots - 1)
        frac = pos - left
        frac = frac * frac * (3 - 2 * frac)
        total += persistence**octave * (values[left] * (1 - frac) + values[left + 1] * frac)
    return total


def _lerp_colour(colours: Sequence[RGB], t: float) -> np.ndarray:
    stops = np.asarray(colours, dtype=np.float32)
    if len(stops) == 1:
        return stops[0]
    pos = t * (len(stops) - 1)
    left = min(int(pos), len(stops) - 2)
    return stops[left] + (stops[left + 1] - stops[left]) * (pos - left)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass
class _Layer:
    """What the full-resolution strokes and dots need to know about one mountain layer."""

    ridge: np.ndarray  # ridge y (fraction of height) at each working-grid column
    slope: np.ndarray  # d(profile)/dx at each working-grid column, for stroke direction
    visible: np.ndarray  # working grid: how much of this layer shows once nearer layers cover it
    near_ridge: np.ndarray  # working grid: 1 at the ridge, falling off below it
    shade: np.ndarray  # working grid: 1 on faces turned from the light
    depth: float  # 0 far .. 1 near


def _baseline(depth: float) -> float:
    """Where a layer's foot sits, as a fraction of the height: far layers high, near ones low."""
    return 0.36 + 0.58 * depth**0.85


def _ridge_profile(
    style: PainterStyle, rng: np.random.Generator, x: np.ndarray, depth: float, gorge_x: float
):
    """Mountain height (0..~1) along x for one layer: a few peaks, roughness, a carved gorge."""
    exponent = 2.0 - 1.3 * style.peak_sharpness  # 2: rounded bumps, <1: pointed peaks
    centres = list(rng.uniform(0.0, 1.0, rng.integers(2, 5)))
    gorge = style.gorge if depth >= 0.3 else 0.0
    if gorge:  # cliffs flank the gorge in the nearer layers
        spread = rng.uniform(0.1, 0.22, 2) * (0.7 + 0.6 * depth)
        centres += [gorge_x - spread[0], gorge_x + spread[1]]
    profile = np.zeros_like(x)
    for centre in centres:
        width, height = rng.uniform(0.08, 0.28), rng.uniform(0.45, 1.0)
        profile = np.maximum(profile, height * np.exp(-(np.abs((x - centre) / width) ** exponent)))
    profile += 0.18 * style.edge_roughness * _smooth_curve(rng, x, octaves=6, persistence=0.62)
    profile += 0.08  # low hills everywhere, so no layer has holes
    if gorge:
        profile *= 1 - gorge * np.exp(-(((x - gorge_x) / (0.035 + 0.05 * depth)) ** 2))
    return np.clip(profile, 0.0, None)


def _paint_fields(style: PainterStyle, rng: np.random.Generator, height: int, width: int):
    """Washes, light and mist at working resolution: (canvas HxWx3, mist alpha HxW, layers)."""
    y = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
    x = (np.arange(width, dtype=np.float32) + 0.5) / width
    columns = np.arange(width)[None, :]
    short = min(height, width)
    ink = np.asarray(style.ink, np.float32)
    highlight = np.asarray(style.highlight, np.float32)

    paper = np.asarray(style.paper, np.float32)
    canvas = paper + (np.asarray(style.sky, np.float32) - paper) * ((1 - y) ** 2)[..., None]
    canvas = np.broadcast_to(canvas, (height, width, 3)).copy()

    gorge_x = float(rng.uniform(0.38, 0.62))
    count = style.layers
    layers: list[_Layer] = []
    alphas: list[np.ndarray] = []
    for index in range(count):
        depth = index / (count - 1) if count > 1 else 1.0
        baseline = _baseline(depth)
        amplitude = style.peak_height * (0.45 + 0.7 * depth) * rng.uniform(0.85, 1.15)
        profile = _ridge_profile(style, rng, x, depth, gorge_x)
        ridge = baseline - amplitude * profile
        below = y - ridge[None, :]

        edge = (0.6 + 3.0 * style.wash_softness) / height
        alpha = np.clip(below / edge + 0.5, 0.0, 1.0)
        if index < count - 1:
            # the foot of every layer but the nearest dissolves into mist, unevenly along x
            foot = 0.05 + 0.12 * style.wash_softness
            wobble = 0.04 * _smooth_curve(rng, x, octaves=4, persistence=0.6)
            alpha = alpha * (1 - _smoothstep(0.0, 1.0, (y - baseline - wobble[None, :] + foot) / (2 * foot)))

        # Light from the left: faces below a ridge rising to the right are lit. Warping the column
        # with the distance below the ridge makes the light/shadow boundaries run down in branches.
        slope = np.gradient(profile, x)
        steepness = slope * amplitude / (np.std(slope * amplitude) + 1e-6)
        warp = _smooth_noise(rng, height, width, 3, 4)
        reach = np.clip(below, 0.0, 0.3) * height
        warped = np.clip(columns + reach * (0.6 * warp + 0.3), 0, width - 1).astype(int)
        facets = _smooth_noise(rng, height, width, max(2, height // 30), max(2, width // 20))
        lit = 1 / (1 + np.exp(-3.0 * (steepness[warped] + 0.45 * facets)))

        fade = (0.04 + 0.22 * style.wash_softness) * (0.6 + 0.8 * depth)
        near_ridge = np.exp(-np.clip(below, 0.0, None) / fade)
        tint = _lerp_colour(style.mountain_tints, depth)
        shadow = tint + (ink - tint) * 0.35 * style.light
        colour = shadow + (highlight - shadow) * (lit * style.light * (1 - near_ridge))[..., None]
        colour += (ink - colour) * ((0.25 + 0.6 * depth) * near_ridge)[..., None]
        mottle = _smooth_noise(rng, height, width, max(2, short // 24), max(2, short // 24))
        colour *= (1 + 0.07 * style.wash_softness * mottle)[..., None]

        canvas += (colour - canvas) * alpha[..., None]
        alphas.append(alpha)
        layers.append(_Layer(ridge, slope, alpha, near_ridge, 1 - lit, depth))

    cover = np.zeros((height, width), np.float32)
    for layer, alpha in zip(reversed(layers), reversed(alphas)):
        layer.visible = alpha * (1 - cover)
        cover += alpha * (1 - cover)

    mist = np.zeros((height, width), np.float32)
    feet = [_baseline(i / (count - 1)) for i in range(count - 1)] or [_baseline(0.5)]
    for _ in range(style.mist_bands):
        centre = float(rng.choice(feet)) + rng.uniform(-0.06, 0.03)
        spread = rng.uniform(0.025, 0.05)
        wisps = _smooth_noise(rng, height, width, max(2, height // 25), max(2, width // 110))
        band = np.exp(-(((y - centre) / spread) ** 2)) * np.clip(0.55 + 0.5 * wisps, 0.0, 1.0)
        mist = np.maximum(mist, 0.85 * band)
    return np.clip(canvas, 0, 255), mist, layers


def _sample_points(rng: np.random.Generator, weight: np.ndarray, count: int) -> np.ndarray:
    """`count` (x, y) points in [0, 1]^2 drawn with probability proportional to a grid of weights."""
    flat = weight.ravel().astype(np.float64)
    total = flat.sum()
    if count <= 0 or total <= 0:
        return np.zeros((0, 2))
    cells = rng.choice(flat.size, size=count, p=flat / total)
    rows, cols = np.divmod(cells, weight.shape[1])
    jitter = rng.uniform(0, 1, (count, 2))
    return np.stack(
        [(cols + jitter[:, 0]) / weight.shape[1], (rows + jitter[:, 1]) / weight.shape[0]], axis=1
    )


def _draw_strokes(style: PainterStyle, rng: np.random.Generator, mask: ImageDraw.ImageDraw, layers, size):
    """Texture strokes (axe-cut cun) down the shaded slopes; dry brush breaks them into bristles."""
    width, height = size
    short = min(size)
    total = int(round(1400 * style.stroke_texture))
    bristles = 4
    for layer in layers:
        weight = layer.visible * (0.15 + layer.near_ridge) * (0.2 + layer.shade)
        count = int(total * (0.3 + layer.depth) / len(layers))
        points = _sample_points(rng, weight, count)
        columns = np.clip((points[:, 0] * len(layer.slope)).astype(int), 0, len(layer.slope) - 1)
        lean = np.clip(-0.25 * layer.slope[columns], -1.5, 1.5) + rng.normal(0, 0.3, count)
        lengths = style.stroke_length * short * rng.uniform(0.4, 1.2, count)
        shades = 255 * rng.uniform(0.4, 0.85, count) * (0.35 + 0.65 * layer.depth)
        spans = np.stack(
            [
                rng.uniform(0, 0.5 * style.dry_brush, (count, bristles)),
                1 - rng.uniform(0, 0.6 * style.dry_brush, (count, bristles)),
            ],
            axis=-1,
        )
        for (px, py), tilt, length, shade, span in zip(points, lean, lengths, shades, spans):
            along = np.array([tilt, 1.0]) / math.hypot(tilt, 1.0)
            across = np.array([-along[1], along[0]])
            stroke_width = max(2.0, 0.16 * length)
            line_width = max(1, int(round(stroke_width / bristles * (1.6 - style.dry_brush))))
            start = np.array([px * width, py * height])
            for offset, (first, last) in zip(np.linspace(-0.5, 0.5, bristles), span):
                base = start + across * offset * stroke_width
                mask.line(
                    [tuple(base + along * length * first), tuple(base + along * length * last)],
                    fill=int(shade),
                    width=line_width,
                )


def _draw_outlines(style: PainterStyle, rng: np.random.Generator, mask: ImageDraw.ImageDraw, layers, size):
    """Contour lines along the visible parts of each ridge."""
    if style.outline <= 0:
        return
    width, height = size
    xs = np.arange(0, width + 3, 3, dtype=np.float64)
    for layer in layers:
        grid_h, grid_w = layer.visible.shape
        ridge = np.interp(xs / width, (np.arange(grid_w) + 0.5) / grid_w, layer.ridge)
        tremble = rng.standard_normal(len(xs)).cumsum() / 6 * 0.004 * min(size) * style.edge_roughness
        ys = ridge * height + tremble
        rows = np.clip((ridge * grid_h).astype(int) + 1, 0, grid_h - 1)
        shown = layer.visible[rows, np.clip((xs / width * grid_w).astype(int), 0, grid_w - 1)] > 0.5
        line_width = max(1, int(round(style.outline * min(size) * 0.0035 * (0.5 + layer.depth))))
        shade = int(255 * min(1.0, 0.5 + 0.5 * style.outline) * (0.6 + 0.4 * layer.depth))
        # one polyline per visible run of the ridge
        breaks = np.flatnonzero(np.diff(shown.astype(np.int8))) + 1
        for run_x, run_y, keep in zip(np.split(xs, breaks), np.split(ys, breaks), np.split(shown, breaks)):
            if keep[0] and len(run_x) > 1:
                mask.line(list(zip(run_x, run_y)), fill=shade, width=line_width, joint="curve")


def _draw_trees(style: PainterStyle, rng: np.random.Generator, draw: ImageDraw.ImageDraw, layers, size):
    """Clusters of coloured dots on the slopes below the ridges of the nearer layers."""
    width, height = size
    radius = style.dot_size * min(size)
    near = [layer for layer in layers if layer.depth >= 0.3] or layers[-1:]
    clusters = 150 * style.dot_density
    share = sum(0.4 + layer.depth for layer in near)
    palette = np.asarray(style.tree_colours, np.float32)
    for layer in near:
        centres = _sample_points(
            rng, layer.visible * np.sqrt(layer.near_ridge), int(clusters * (0.4 + layer.depth) / share)
        )
        for cx, cy in centres:
            colour = palette[rng.integers(len(palette))]
            dots = int(rng.integers(6, 22))
            offsets = rng.normal(0, 1, (dots, 2)) * radius * rng.uniform(2.5, 5.0) * np.array([1.0, 0.6])
            radii = radius * rng.uniform(0.6, 1.4, dots) * (0.6 + 0.6 * layer.depth)
            fills = np.clip(colour + rng.normal(0, 12, (dots, 3)), 0, 255).astype(int)
            for (ox, oy), r, fill in zip(offsets, radii, fills):
                px, py = cx * width + ox, cy * height + oy
                ry = r * style.dot_aspect
                draw.ellipse([px - r, py - ry, px + r, py + ry], fill=tuple(fill.tolist()))


def paint(style: PainterStyle, width: int, height: int, seed: int) -> Image.Image:
    """The bare painting (RGB, width x height); the same arguments give the same bytes."""
    if width < 16 or height < 16:
        raise ValueError(f"painting must be at least 16x16 pixels, got {width}x{height}")
    rng = _rng(style, seed, "paint")
    scale = min(1.0, WORK_LONG_SIDE / max(width, height))
    canvas, mist, layers = _paint_fields(
        style, rng, max(16, round(height * scale)), max(16, round(width * scale))
    )

    size = (width, height)
    image = Image.fromarray(canvas.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    strokes = Image.new("L", size, 0)
    stroke_draw = ImageDraw.Draw(strokes)
    _draw_strokes(style, rng, stroke_draw, layers, size)
    _draw_outlines(style, rng, stroke_draw, layers, size)
    image = Image.composite(Image.new("RGB", size, style.ink), image, strokes)
    _draw_trees(style, rng, ImageDraw.Draw(image), layers, size)
    mist_mask = Image.fromarray((mist * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    return Image.composite(Image.new("RGB", size, style.mist), image, mist_mask)


def _draw_inscription(style: PainterStyle, rng: np.random.Generator, draw: ImageDraw.ImageDraw, size):
    """A vertical column of glyph-like marks near a top corner of the painting, a seal below it."""
    width, height = size
    cell = max(6, int(0.035 * min(size)))
    on_right = bool(rng.integers(2))
    column_x = width - 2.2 * cell if on_right else 1.2 * cell
    y = 1.2 * cell
    pen = max(1, cell // 9)
    for _ in range(int(rng.integers(6, 13))):
        for _stroke in range(int(rng.integers(3, 8))):
            x0, y0 = rng.uniform(0.1, 0.9, 2) * cell
            kind = rng.random()
            if kind < 0.3:  # horizontal bar
                x1, y1 = rng.uniform(0.1, 0.9) * cell, y0
            elif kind < 0.6:  # vertical bar
                x1, y1 = x0, rng.uniform(0.1, 0.9) * cell
            else:  # slanted sweep
                x1, y1 = x0 + rng.uniform(-0.4, 0.4) * cell, y0 + rng.uniform(0.1, 0.5) * cell
            draw.line([(column_x + x0, y + y0), (column_x + x1, y + y1)], fill=style.ink, width=pen)
        y += 1.15 * cell
    seal = int(1.1 * cell)
    left, top = int(column_x), int(y + 0.4 * cell)
    draw.rectangle([left, top, left + seal, top + seal], fill=style.seal)
    for _ in range(int(rng.integers(5, 9))):  # carved characters: paper-coloured lines in the red
        x0, y0, x1, y1 = rng.uniform(0.15, 0.85, 4) * seal
        end = (x1, y0) if rng.random() < 0.5 else (x0, y1)
        draw.line(
            [(left + x0, top + y0), (left + end[0], top + end[1])], fill=style.paper, width=max(1, seal // 10)
        )


def mount_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the painting inside a scan of width x height: hanging scrolls
    (portrait) have deeper silk above and below; landscape mounts have even margins."""
    short, long = min(width, height), max(width, height)
    side = round(MOUNT_SIDE * short)
    top, bottom = (round(MOUNT_TOP * long), round(MOUNT_BOTTOM * long)) if height >= width else (side, side)
    return side, top, width - side, height - bottom


def _light_and_paper(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Multiplicative field (HxW): the camera's uneven light times the paper's blotches, fibres and grain."""
    yy = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    tilt = rng.uniform(-0.05, 0.05, 2).astype(np.float32)
    field = 1.0 - 0.05 * (xx * xx + yy * yy) + tilt[0] * xx + tilt[1] * yy
    field += 0.025 * _smooth_noise(rng, height, width, 4, 3)
    fibres = _smooth_noise(rng, height // 2, width // 2, height // 6, width // 40)
    field += 0.018 * np.asarray(Image.fromarray(fibres).resize((width, height), Image.Resampling.BILINEAR))
    field += 0.02 * _smooth_noise(rng, height, width, height // 2, width // 2)
    return field


def scan(style: PainterStyle, width: int, height: int, seed: int) -> Image.Image:
    """A photographed hanging scroll (RGB, width x height): the painting on toned, fibrous paper
    inside a silk mount, with an inscription column, a red seal and uneven light."""
    rng = _rng(style, seed, "scan")
    left, top, right, bottom = mount_box(width, height)
    painting = paint(style, right - left, bottom - top, seed)
    _draw_inscription(style, rng, ImageDraw.Draw(painting), painting.size)

    scroll = Image.new("RGB", (width, height), style.mount)
    edge = max(2, round(MOUNT_EDGE * min(width, height)))
    trim = tuple(int(v * 0.8) for v in style.mount)
    ImageDraw.Draw(scroll).rectangle(
        [left - edge, top - edge, right + edge - 1, bottom + edge - 1], fill=trim
    )
    scroll.paste(painting, (left, top))

    # Multiply in 8 bits (PIL, fast): the field is scaled into 0..255, then a per-channel lookup
    # table scales back and adds the warm cast of the photographer's lamp.
    field = _light_and_paper(rng, width, height)
    peak = float(field.max())
    factor = Image.fromarray(np.clip(field * (255.0 / peak), 0, 255).astype(np.uint8))
    lit = ImageChops.multiply(scroll, Image.merge("RGB", (factor, factor, factor)))
    warmth = (1.0, 0.99, 0.965)
    return lit.point([min(255, round(v * peak * gain)) for gain in warmth for v in range(256)])


def generic_corpus(
    count: int, size: int | tuple[int, int], seed: int, exclude: Sequence[str] = (DEMO_STYLE,)
) -> Iterator[tuple[str, Image.Image]]:
    """`count` bare paintings from the styles other than `exclude`, cycling styles, as (style, image).

    `size` is (width, height), or an int for squares. Paintings i and j never share a seed.
    """
    names = [name for name in STYLES if name not in set(exclude)]
    if not names:
        raise ValueError("generic_corpus: every style is excluded")
    width, height = (size, size) if isinstance(size, int) else size
    for index in range(count):
        name = names[index % len(names)]
        yield name, paint(STYLES[name], width, height, seed * 100_003 + index)


# --- synthetic painters for validating style metrics -----------------------------------------------

PALETTE_FIELDS = ("paper", "sky", "ink", "mountain_tints", "highlight", "mist", "tree_colours", "seal", "mount")


def palette_variants(painter: str = DEMO_STYLE) -> dict[str, PainterStyle]:
    """Every other style painted in `painter`'s palette: same colours, other brushwork and
    composition. A style metric must tell these from the painter by how they are painted."""
    palette = {name: getattr(STYLES[painter], name) for name in PALETTE_FIELDS}
    return {f"{name}_in_{painter}_palette": replace(style, name=f"{name}_in_{painter}_palette", **palette)
            for name, style in STYLES.items() if name != painter}


def rotate_hue(image: Image.Image, steps: int) -> Image.Image:
    """`image` with every hue turned by `steps` of 256 (HSV): the same painting in other colours."""
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + steps) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def painting_crops(style: PainterStyle, paintings: int, seed: int, crop: int = 128, long_side: int = 768,
                   per_painting: int = 3) -> Iterator[tuple[int, Image.Image]]:
    """`per_painting` square crops (crop x crop px) of each of `paintings` paintings, as
    (painting index, image): windows of 60-100% of the painting's short side at random places,
    downsampled as the demo's crops are for training, so strokes and dots are as fine."""
    rng = np.random.default_rng([seed, zlib.crc32(style.name.encode())])
    for index in range(paintings):
        portrait = rng.random() < style.portrait_share
        short = long_side * 2 // 3
        width, height = (short, long_side) if portrait else (long_side, short)
        painting = paint(style, width, height, seed * 1_000 + index)
        for _ in range(per_painting):
            side = int(short * rng.uniform(0.6, 1.0))
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            yield index, painting.resize((crop, crop), Image.Resampling.LANCZOS,
                                          box=(left, top, left + side, top + side))

