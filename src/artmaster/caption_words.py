"""The template captioner's words for one image: content (mountains, peaks, gorge, mist from where
the ink sits), palette, tone and composition, measured with artmaster.imagestats and phrased by
`caption.template`. Used by the caption stage (`template` backend) and by the base stage, which
captions its generic corpus the same way; a library module, so base does not import a stage.
"""

from __future__ import annotations

import math

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from scipy import ndimage

from artmaster.imagestats import (
    ink_density,
    named_colour_fractions,
    paper_tint,
    reduced,
    rgb_to_lab,
    small_blob_count,
    to_float_rgb,
)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of True in a 1-D boolean array."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    changes = np.flatnonzero(np.diff(padded))
    return list(zip(changes[::2].tolist(), changes[1::2].tolist()))


def content_words(density: np.ndarray, present_above: float, content: DictConfig) -> list[str]:
    """Mountains, peaks, gorge and mist from where the ink sits (rows and columns of the map)."""
    words = []
    painted = density >= present_above
    rows = painted.mean(axis=1)
    inked = np.flatnonzero(rows >= content.ink_row)
    if painted.mean() >= content.mountains_min_ink:
        sky = rows[: max(1, round(content.sky_band * len(rows)))]
        if sky.mean() <= content.sky_max_ink and inked.size and inked.min() < len(rows) // 2:
            words.append(content.peaks_phrase)
        words.append(content.mountains_phrase)

    # a gorge: a pale valley in the middle third of the lower part, flanked by inked sides
    lower = density[round((1.0 - content.gorge_rows) * density.shape[0]) :]
    columns = ndimage.uniform_filter1d(
        lower.mean(axis=0), max(1, round(content.gorge_smooth * density.shape[1])), mode="nearest"
    )
    third = max(1, len(columns) // 3)
    sides = float(np.r_[columns[:third], columns[-third:]].mean())
    if sides >= content.gorge_min_side_ink and columns[third:-third].min() < content.gorge_ratio * sides:
        words.append(content.gorge_phrase)

    # mist: a band of rows much paler than the inked rows, with inked rows above and below it
    if inked.size:
        pale = rows <= content.mist_ratio * float(np.median(rows[inked]))
        min_rows = max(1, round(content.mist_min_rows * len(rows)))
        if any(
            end - start >= min_rows and inked.min() < start and inked.max() >= end
            for start, end in _runs(pale)
        ):
            words.append(content.mist_phrase)
    return words


def palette_words(lab: np.ndarray, palette: DictConfig, tint: np.ndarray) -> list[str]:
    """Named colours (up to `max_colours`, most abundant first), dotted or as washes; or
    monochrome. Colours are measured as departures from the paper's `tint`."""
    fractions, labels = named_colour_fractions(lab, dict(palette.prototypes), palette.min_chroma, tint)
    present = sorted(
        (name for name, share in fractions.items() if share >= palette.present_above),
        key=lambda name: (-fractions[name], name),
    )[: palette.max_colours]
    if not present:
        return [palette.monochrome_phrase]
    names = list(fractions)
    dots = sum(
        small_blob_count(labels == names.index(name), palette.dot_max_area) for name in present
    )
    phrase = palette.dotted_phrase if dots >= palette.dotted_min_dots else palette.wash_phrase
    return [phrase.format(colours=" and ".join(present))]


def tone_words(lightness: np.ndarray, tone: DictConfig) -> list[str]:
    words = []
    mean = float(lightness.mean())
    if mean >= tone.light_above:
        words.append(tone.light_phrase)
    elif mean <= tone.dark_below:
        words.append(tone.dark_phrase)
    if float(lightness.std()) >= tone.contrast_above:
        words.append(tone.contrast_phrase)
    return words


def composition_words(size: tuple[int, int], composition: DictConfig) -> list[str]:
    aspect = math.log(size[0] / size[1])
    if abs(aspect) < composition.square_tolerance:
        return [composition.square_phrase]
    return [composition.landscape_phrase if aspect > 0 else composition.portrait_phrase]


def describe(image: Image.Image, template: DictConfig) -> list[str]:
    """The template captioner's phrases for one image, in caption order."""
    lab = rgb_to_lab(to_float_rgb(reduced(image, template.analysis_long_side)))
    ink = template.ink
    density = ink_density(lab, **ink.density)
    return [
        *content_words(density, ink.present_above, template.content),
        *palette_words(lab, template.palette, paper_tint(lab, ink.density.paper_percentile)),
        *tone_words(lab[..., 0], template.tone),
        *composition_words(image.size, template.composition),
    ]
