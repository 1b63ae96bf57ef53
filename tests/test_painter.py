import time

import numpy as np
import pytest

from artmaster.painter import DEMO_STYLE, STYLES, generic_corpus, mount_box, paint, scan, style_by_name


def test_paint_and_scan_are_deterministic_for_a_seed():
    style = STYLES[DEMO_STYLE]
    assert paint(style, 150, 220, 7).tobytes() == paint(style, 150, 220, 7).tobytes()
    assert scan(style, 180, 260, 7).tobytes() == scan(style, 180, 260, 7).tobytes()
    assert paint(style, 150, 220, 7).tobytes() != paint(style, 150, 220, 8).tobytes()


@pytest.mark.parametrize("name", sorted(STYLES))
@pytest.mark.parametrize("size", [(120, 200), (260, 140)])
def test_every_style_paints_rgb_at_the_requested_size(name, size):
    for image in (paint(STYLES[name], *size, seed=1), scan(STYLES[name], *size, seed=1)):
        assert image.mode == "RGB" and image.size == size
        assert np.asarray(image).std() > 5  # something is painted, not a flat fill


def test_bad_arguments_are_refused_with_clear_errors():
    with pytest.raises(KeyError, match="unknown painter style 'picasso'.*zeng_xiaohu"):
        style_by_name("picasso")
    with pytest.raises(ValueError, match="at least 16x16"):
        paint(STYLES[DEMO_STYLE], 8, 100, 0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        paint(STYLES[DEMO_STYLE], 100, 100, -1)


def _colour_features(image):
    rgb = np.asarray(image, np.float32).reshape(-1, 3)
    return np.concatenate([rgb.mean(0), rgb.std(0)])


def _texture_features(image):
    """Histogram of 8-neighbour local binary patterns of the luminance."""
    gray = np.asarray(image.convert("L"), np.int16)
    centre = gray[1:-1, 1:-1]
    codes = np.zeros(centre.shape, np.int32)
    neighbours = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    for bit, (dy, dx) in enumerate(neighbours):
        neighbour = gray[1 + dy : gray.shape[0] - 1 + dy, 1 + dx : gray.shape[1] - 1 + dx]
        codes |= (neighbour >= centre + 2).astype(np.int32) << bit
    counts = np.bincount(codes.ravel(), minlength=256).astype(np.float64)
    return counts / counts.sum()


@pytest.mark.parametrize("features", [_colour_features, _texture_features], ids=["colour", "texture"])
def test_styles_differ_in_colour_and_in_texture(features):
    """Leave-one-out nearest neighbour over 4 seeds per style names every painting's style:
    colour statistics alone, and texture statistics alone, both separate the styles."""
    names, rows = [], []
    for name, style in STYLES.items():
        for seed in range(4):
            names.append(name)
            rows.append(features(paint(style, 120, 180, seed)))
    values = np.asarray(rows)
    values = (values - values.mean(0)) / (values.std(0) + 1e-9)
    distances = ((values[:, None] - values[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    predicted = np.asarray(names)[distances.argmin(1)]
    wrong = [(truth, guess) for truth, guess in zip(names, predicted) if truth != guess]
    assert not wrong


def _share(image, test) -> float:
    rgb = np.asarray(image, np.int32)
    return float(test(rgb[..., 0], rgb[..., 1], rgb[..., 2]).mean())


def test_demo_painter_dots_trees_in_emerald_and_ochre():
    emerald = lambda r, g, b: (g > r + 60) & (g > b + 20)  # noqa: E731
    ochre = lambda r, g, b: (r > 170) & (r > b + 100) & (g > b + 60)  # noqa: E731
    demo = paint(STYLES[DEMO_STYLE], 300, 450, 3)
    assert _share(demo, emerald) > 0.005 and _share(demo, ochre) > 0.005
    monochrome = paint(STYLES["dry_brush_monochrome"], 300, 450, 3)
    assert _share(monochrome, emerald) < 0.0005 and _share(monochrome, ochre) < 0.0005


@pytest.mark.parametrize("size", [(300, 480), (480, 300)])
def test_scan_has_a_silk_mount_around_the_painting(size):
    style = STYLES[DEMO_STYLE]
    image = np.asarray(scan(style, *size, seed=2), np.float32)
    left, top, right, bottom = mount_box(*size)
    assert 0 < left < right < size[0] and 0 < top < bottom < size[1]
    middle = size[1] // 2
    margin = image[middle - 10 : middle + 10, : left // 2].reshape(-1, 3).mean(0)
    assert np.abs(margin - np.asarray(style.mount)).max() < 30  # photographed: light and texture vary
    # the painting's inscription and seal: red pixels inside the painting only
    red = (image[..., 0] > 140) & (image[..., 1] < 80) & (image[..., 2] < 80)
    assert red[top:bottom, left:right].sum() > 10 and red.sum() == red[top:bottom, left:right].sum()


def test_generic_corpus_mixes_the_other_styles():
    items = list(generic_corpus(8, (96, 64), seed=3))
    assert len(items) == 8
    assert DEMO_STYLE not in {name for name, _ in items}
    assert {name for name, _ in items} == set(STYLES) - {DEMO_STYLE}
    assert all(image.size == (96, 64) for _, image in items)
    assert len({image.tobytes() for _, image in items}) == 8
    assert [image.tobytes() for _, image in generic_corpus(2, 48, seed=3)] == [
        image.tobytes() for _, image in generic_corpus(2, 48, seed=3)
    ]


def test_a_full_size_scan_paints_in_seconds():
    started = time.perf_counter()
    image = scan(STYLES[DEMO_STYLE], 2000, 3000, seed=0)
    elapsed = time.perf_counter() - started
    assert image.size == (2000, 3000)
    assert elapsed < 6.0, f"2000x3000 scan took {elapsed:.1f} s (about 1 s expected)"
