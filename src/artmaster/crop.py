"""Stage `crop`: subject-aware crops of every accepted scan into the training buckets.

Per scan, on a reduced analysis copy: find the painting inside its mounting border (straight
colour steps that run along most of the scan), map where the ink is (density against the local
paper, robust to uneven light), then slide windows of each bucket's aspect ratio at a few scales
over the painting and keep the best-scoring ones: they hold much of the subject, do not cut
through dense strokes at their edges, keep a balanced share of background, and overlap each other
at most `crop.max_iou`. Each window is cut from the full-resolution scan and downscaled with
Lanczos to exactly the bucket size.

Writes data/crop/<WxH>/<crop_id>.png, crops.jsonl, contact_sheet.png and summary.json. Every row
of crops.jsonl has a `split`: `heldout` for the crops of the `data.holdout.scans` scans kept out of
training as the evaluate stage's style reference, `train` for the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from tqdm import tqdm

from artmaster.config import hydra_entry, stage_dir
from artmaster.dataset import HELDOUT, TRAIN
from artmaster.files import read_jsonl, staged_dir, write_jsonl
from artmaster.imagestats import (
    box_iou,
    box_sums,
    integral_image,
    ink_density,
    reduced,
    rgb_to_lab,
    to_float_rgb,
)
from artmaster.tracking import Tracker, log_summary, stage_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bucket:
    key: str
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass
class CropChoice:
    bucket: Bucket
    scale: float
    box: tuple[int, int, int, int]  # [left, top, right, bottom) in scan pixels
    score: float


@dataclass
class ScanAnalysis:
    """What the window search needs, at analysis resolution over the painting region."""

    scan_size: tuple[int, int]
    painting: tuple[int, int, int, int]  # in scan pixels, already inset
    origin: tuple[int, int]  # the region's top-left corner in analysis pixels
    factor: tuple[float, float]  # analysis pixels per scan pixel (x, y)
    density: np.ndarray
    saliency: np.ndarray
    thumbnail: Image.Image = field(repr=False)


def enabled_buckets(settings: DictConfig) -> list[Bucket]:
    buckets = [
        Bucket(str(key), int(spec.width), int(spec.height))
        for key, spec in settings.buckets.items()
        if spec.enabled
    ]
    if not buckets:
        raise ValueError("crop.buckets: no bucket is enabled; enable at least one")
    return buckets


# --- the painting inside its mounting border -------------------------------------------------


def _steps(lab: np.ndarray, offset: int, axis: int) -> np.ndarray:
    """Colour step (CIE delta E) at every pixel between its neighbours `offset` px before and
    after it along `axis`; the first and last `offset` lines along that axis are left out."""
    before = [slice(None)] * 2
    after = [slice(None)] * 2
    before[axis], after[axis] = slice(None, -2 * offset), slice(2 * offset, None)
    return np.linalg.norm(lab[tuple(after)] - lab[tuple(before)], axis=2)


def _painting_span(cross: np.ndarray, along: np.ndarray, border: DictConfig, gap: int | None = None) -> tuple[int, int]:
    """[start, end) of the painting along one axis (axis 1 of both arrays).

    `cross[:, i]`: steps across line i + offset; `along[:, i]`: steps along line i. A line is an
    edge when a step crosses it along at least `edge_support` of its length, and busy when more
    than `max_busy` of its length has steps along it (ink). Walking in from each side, the mount
    is quiet lines and edges; the painting's edge is the innermost edge before the first busy
    line, so straight mist bands and horizons deeper inside never count. The mount's edges lie
    close together: an edge more than `gap` lines inside the previous one is the painting's own
    (a handscroll's long horizon or sky line, where the quiet lines run deep) and ends the walk.
    """
    offset, length = border.step_offset, along.shape[1]
    strength = np.zeros(length, dtype=np.float32)
    strength[offset : length - offset] = np.quantile(cross, 1.0 - border.edge_support, axis=0)
    edge = strength >= border.min_step
    quiet = (along >= border.min_step).mean(axis=0) <= border.max_busy
    zone = int(border.max_border * length)

    def innermost_edge(walk: range) -> int | None:
        found = None
        for line in walk:
            if edge[line]:
                if found is not None and gap is not None and abs(line - found) > gap:
                    break
                found = line
            elif not quiet[line]:
                break
        return found

    first = innermost_edge(range(zone))
    last = innermost_edge(range(length - 1, length - 1 - zone, -1))
    # an edge at e lights lines e - offset .. e + offset - 1: stepping past the innermost one
    # lands `offset` px inside the painting on both sides
    return (0 if first is None else first + 1), (length if last is None else last)


def detect_painting(lab: np.ndarray, border: DictConfig) -> tuple[int, int, int, int]:
    """[left, top, right, bottom) of the painting in the pixels of `lab` (border dropped)."""
    offset = border.step_offset
    if min(lab.shape[:2]) <= 4 * offset:
        raise ValueError(f"image of {lab.shape[1]}x{lab.shape[0]} analysis px is too small to analyse")
    across_columns = _steps(lab, offset, axis=1)  # (H, W - 2 offset)
    across_rows = _steps(lab, offset, axis=0)  # (H - 2 offset, W)
    max_gap = border.get("max_gap")
    gap = None if max_gap is None else max(2 * offset, round(float(max_gap) * min(lab.shape[:2])))
    left, right = _painting_span(across_columns, across_rows, border, gap)
    top, bottom = _painting_span(across_rows.T, across_columns.T, border, gap)
    if right - left < 4 * offset or bottom - top < 4 * offset:
        raise ValueError("no painting found inside the mounting border (its edges cross)")
    return left, top, right, bottom


def analyse(scan: Image.Image, settings: DictConfig) -> ScanAnalysis:
    # an elongated scan (a handscroll) keeps a short side of analysis_long_side / 2 px
    aspect = max(scan.size) / min(scan.size)
    small = reduced(scan, round(settings.analysis_long_side * max(1.0, aspect / 2)))
    lab = rgb_to_lab(to_float_rgb(small))
    fx, fy = small.width / scan.width, small.height / scan.height
    left, top, right, bottom = detect_painting(lab, settings.border)
    # analysis -> scan pixels, rounding inwards, then the safety inset
    box = [math.ceil(left / fx), math.ceil(top / fy), math.floor(right / fx), math.floor(bottom / fy)]
    inset = math.ceil(settings.border.inset * min(box[2] - box[0], box[3] - box[1]))
    painting = (box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset)
    origin = (math.ceil(painting[0] * fx), math.ceil(painting[1] * fy))
    end = (math.floor(painting[2] * fx), math.floor(painting[3] * fy))
    region = lab[origin[1] : end[1], origin[0] : end[0]]
    density = ink_density(region, **settings.ink.density)
    sigma = settings.ink.subject_sigma * min(region.shape[:2])
    saliency = ndimage.gaussian_filter(density, sigma=sigma, mode="nearest")
    return ScanAnalysis(scan.size, painting, origin, (fx, fy), density, saliency, small)


# --- windows -----------------------------------------------------------------------------------


def candidate_windows(
    painting: tuple[int, int, int, int], bucket: Bucket, scale: float, settings: DictConfig
) -> np.ndarray:
    """(N, 4) windows of the bucket's aspect ratio at `scale` inside the painting, on a grid."""
    left, top, right, bottom = painting
    fit = min((right - left) / bucket.width, (bottom - top) / bucket.height)
    width = math.floor(scale * fit * bucket.width)
    height = min(round(width * bucket.height / bucket.width), bottom - top)
    if width < settings.min_source_scale * bucket.width or height < settings.min_source_scale * bucket.height:
        return np.empty((0, 4), dtype=np.int64)

    def positions(start: int, stop: int, size: int) -> np.ndarray:
        step = max(1, round(settings.stride * size))
        return np.unique(np.append(np.arange(start, stop - size + 1, step), stop - size))

    xs, ys = np.meshgrid(positions(left, right, width), positions(top, bottom, height))
    xs, ys = xs.ravel(), ys.ravel()
    return np.stack([xs, ys, xs + width, ys + height], axis=1).astype(np.int64)


def score_windows(windows: np.ndarray, analysis: ScanAnalysis, settings: DictConfig):
    """(scores, eligible) for scan-pixel windows, measured on the analysis maps."""
    density, saliency = analysis.density, analysis.saliency
    height, width = density.shape
    fx, fy = analysis.factor
    ox, oy = analysis.origin
    left = np.clip(np.round(windows[:, 0] * fx) - ox, 0, width - 1).astype(np.int64)
    top = np.clip(np.round(windows[:, 1] * fy) - oy, 0, height - 1).astype(np.int64)
    right = np.clip(np.round(windows[:, 2] * fx) - ox, left + 1, width).astype(np.int64)
    bottom = np.clip(np.round(windows[:, 3] * fy) - oy, top + 1, height).astype(np.int64)
    area = (right - left) * (bottom - top)

    ink, weights = settings.ink, settings.score
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    tables = {
        name: integral_image(values)
        for name, values in {
            "saliency": saliency,
            "density": density,
            "background": density < ink.background_below,
            "moment_x": density * (xs + 0.5),
            "moment_y": density * (ys + 0.5),
        }.items()
    }

    def inside(name, l, t, r, b):  # noqa: E741 - box edges
        return box_sums(tables[name], l, t, r, b)

    subject = inside("saliency", left, top, right, bottom) / max(float(saliency.sum()), 1e-9)
    background = inside("background", left, top, right, bottom) / area

    # ink along the four edges (a strip `edge_band` wide centred on each), and how much denser
    # that strip is than the wider `edge_context` strip around it: a positive contrast means
    # the edge slices through strokes rather than running along a gap between them
    short = np.minimum(right - left, bottom - top)
    edge_sum = np.zeros(len(windows))
    edge_area = np.zeros(len(windows))
    contrast = np.zeros(len(windows))
    for fraction_key, sign in (("edge_band", 1.0), ("edge_context", -1.0)):
        half = np.maximum(1, np.round(0.5 * weights[fraction_key] * short)).astype(np.int64)
        strips = [
            (left, top - half, right, top + half),
            (left, bottom - half, right, bottom + half),
            (left - half, top, left + half, bottom),
            (right - half, top, right + half, bottom),
        ]
        for strip_left, strip_top, strip_right, strip_bottom in strips:
            box = (
                np.clip(strip_left, 0, width),
                np.clip(strip_top, 0, height),
                np.clip(strip_right, 0, width),
                np.clip(strip_bottom, 0, height),
            )
            strip_area = np.maximum((box[2] - box[0]) * (box[3] - box[1]), 1)
            strip_sum = inside("density", *box)
            contrast += sign * strip_sum / strip_area / 4
            if sign > 0:
                edge_sum += strip_sum
                edge_area += strip_area
    edge = edge_sum / edge_area

    mass = inside("density", left, top, right, bottom)
    safe_mass = np.maximum(mass, 1e-9)
    centre_x = inside("moment_x", left, top, right, bottom) / safe_mass
    centre_y = inside("moment_y", left, top, right, bottom) / safe_mass
    half_diagonal = 0.5 * np.hypot(right - left, bottom - top)
    offset = np.where(
        mass > 1e-9,
        np.hypot(centre_x - (left + right) / 2, centre_y - (top + bottom) / 2) / half_diagonal,
        1.0,
    )

    scores = (
        weights.subject * subject
        - weights.edge * edge
        - weights.edge_contrast * contrast
        - weights.balance * np.abs(background - weights.target_background)
        - weights.centre * offset
    )
    eligible = (1.0 - background) >= settings.min_ink_fraction
    return scores, eligible


def choose_crops(analysis: ScanAnalysis, buckets: list[Bucket], settings: DictConfig) -> list[CropChoice]:
    """Greedy: per scale (as listed), per bucket, the best windows that keep overlap bounded.
    Buckets closest to the painting's own aspect ratio choose first (a hanging scroll's
    full-width crop is a portrait one). A painting more elongated than `long_scan_aspect` (a
    handscroll) holds several compositions along its length: `per_bucket_scale` and
    `max_per_scan` are multiplied by floor(its aspect ratio / long_scan_aspect)."""
    left, top, right, bottom = analysis.painting
    aspect = math.log((right - left) / (bottom - top))
    by_fit = sorted(buckets, key=lambda b: abs(math.log(b.width / b.height) - aspect))
    long_scan = float(settings.get("long_scan_aspect") or math.inf)
    lengths = max(1, math.floor(math.exp(abs(aspect)) / long_scan))
    per_bucket_scale, max_per_scan = settings.per_bucket_scale * lengths, settings.max_per_scan * lengths
    chosen: list[CropChoice] = []
    for scale in settings.scales:
        for bucket in by_fit:
            windows = candidate_windows(analysis.painting, bucket, float(scale), settings)
            if not len(windows):
                continue
            scores, eligible = score_windows(windows, analysis, settings)
            # best score first; ties broken by position so the choice is deterministic
            order = np.lexsort((windows[:, 0], windows[:, 1], -np.round(scores, 9)))
            taken = 0
            for index in order:
                if len(chosen) >= max_per_scan or taken >= per_bucket_scale:
                    break
                box = tuple(int(v) for v in windows[index])
                if not eligible[index] or any(box_iou(box, c.box) > settings.max_iou for c in chosen):
                    continue
                chosen.append(CropChoice(bucket, float(scale), box, float(scores[index])))
                taken += 1
    return chosen


def render_crop(scan: Image.Image, choice: CropChoice) -> Image.Image:
    """The window cut from the full-resolution scan, Lanczos-resampled to the bucket size."""
    size = (choice.bucket.width, choice.bucket.height)
    return scan.resize(size, Image.Resampling.LANCZOS, box=choice.box)


# --- contact sheet -----------------------------------------------------------------------------


@dataclass
class SheetEntry:
    scan_id: str
    analysis: ScanAnalysis
    crops: list[CropChoice]
    note: str = ""
    heldout: bool = False  # held out of training (data.holdout): framed and labelled on the sheet


def draw_contact_sheet(entries: list[SheetEntry], buckets: list[Bucket], sheet: DictConfig) -> Image.Image:
    """Every scan's thumbnail with its painting edge and crop boxes (colour per bucket, numbered)."""
    columns = max(1, min(sheet.columns, len(entries)))
    rows = max(1, math.ceil(len(entries) / columns))
    cell_height = sheet.tile + sheet.caption_height
    canvas = Image.new("RGB", (columns * sheet.tile, sheet.legend_height + rows * cell_height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, sheet.caption_height - 8))

    counts = {b.key: sum(c.bucket.key == b.key for e in entries for c in e.crops) for b in buckets}
    x = 6
    for bucket in buckets:
        colour = sheet.colours[bucket.key]
        draw.rectangle([x, 6, x + 16, sheet.legend_height - 6], fill=colour)
        label = f"{bucket.name}: {counts[bucket.key]}"
        draw.text((x + 22, sheet.legend_height // 2), label, fill="black", font=font, anchor="lm")
        x += 30 + int(draw.textlength(label, font=font))

    for index, entry in enumerate(entries):
        cell_x = (index % columns) * sheet.tile
        cell_y = sheet.legend_height + (index // columns) * cell_height
        scan_w, scan_h = entry.analysis.scan_size
        scale = min(sheet.tile / scan_w, sheet.tile / scan_h)
        thumb = entry.analysis.thumbnail.resize(
            (max(1, round(scan_w * scale)), max(1, round(scan_h * scale))), Image.Resampling.LANCZOS
        )
        px = cell_x + (sheet.tile - thumb.width) // 2
        py = cell_y + (sheet.tile - thumb.height) // 2
        canvas.paste(thumb, (px, py))

        def to_sheet(box, px=px, py=py, scale=scale):
            return [px + box[0] * scale, py + box[1] * scale, px + box[2] * scale, py + box[3] * scale]

        draw.rectangle(to_sheet(entry.analysis.painting), outline=sheet.painting_colour, width=1)
        numbers: dict[str, int] = {}
        for crop in entry.crops:
            colour = sheet.colours[crop.bucket.key]
            corners = to_sheet(crop.box)
            draw.rectangle(corners, outline=colour, width=sheet.line_width)
            number = numbers[crop.bucket.key] = numbers.get(crop.bucket.key, -1) + 1
            label = f"{number}"
            text_box = draw.textbbox((corners[0] + 3, corners[1] + 3), label, font=font)
            draw.rectangle(text_box, fill=colour)
            draw.text((corners[0] + 3, corners[1] + 3), label, fill="white", font=font)
        if entry.heldout:  # a frame around the cell: these crops are evaluate's reference, never trained on
            draw.rectangle([cell_x + 1, cell_y + 1, cell_x + sheet.tile - 2, cell_y + sheet.tile - 2],
                           outline=sheet.heldout_colour, width=sheet.line_width + 2)
        held = " HELD OUT" if entry.heldout else ""
        caption = f"{entry.scan_id}: {len(entry.crops)} crops{held} {entry.note}".strip()
        draw.text(
            (cell_x + sheet.tile // 2, cell_y + sheet.tile + sheet.caption_height // 2),
            caption,
            fill="black",
            font=font,
            anchor="mm",
        )
    return canvas


# --- held-out scans (the split's values and readers: artmaster.dataset) --------------------------


def heldout_scans(scan_ids: list[str], holdout: DictConfig) -> set[str]:
    """`holdout.scans` of `scan_ids` held out of training. Ids are ranked by a hash of
    (`holdout.seed`, id), so the choice does not depend on the order the scans are read in."""
    count, ids = int(holdout.scans), sorted(set(scan_ids))
    if count < 0:
        raise ValueError(f"data.holdout.scans must be >= 0, got {count}")
    if count and count >= len(ids):
        raise ValueError(
            f"data.holdout.scans={count} leaves no scan to train on: only {len(ids)} scan(s) gave crops"
        )
    rank = {i: hashlib.sha256(f"{holdout.seed}\0{i}".encode()).hexdigest() for i in ids}
    return set(sorted(ids, key=rank.__getitem__)[:count])


def accepted_scans(cfg: DictConfig) -> list[dict]:
    manifest = stage_dir(cfg, "ingest") / "manifest.jsonl"
    # a scan id names its image (images/<id>.png) and the crops' files: never a path out of the folder
    images = stage_dir(cfg, "ingest") / "images"
    rows = [row for row in read_jsonl(manifest, within={"id": images}) if row.get("status") == "accepted"]
    if not rows:
        raise ValueError(f"{manifest}: no accepted scan to crop")
    return rows


def write_crops(scan: Image.Image, scan_id: str, choices: list, folder: Path, compress_level: int) -> list[dict]:
    """Render a scan's chosen crops into folder/<bucket>/<crop_id>.png; their crops.jsonl rows
    (numbered per bucket: <scan_id>-<bucket>-00, -01, ...)."""
    rows, numbers = [], {}
    for choice in choices:
        number = numbers[choice.bucket.key] = numbers.get(choice.bucket.key, -1) + 1
        crop_id = f"{scan_id}-{choice.bucket.name}-{number:02d}"
        relative = f"{choice.bucket.name}/{crop_id}.png"
        render_crop(scan, choice).save(folder / relative, compress_level=compress_level)
        rows.append(
            {
                "crop_id": crop_id,
                "scan_id": scan_id,
                "bucket": choice.bucket.name,
                "width": choice.bucket.width,
                "height": choice.bucket.height,
                "box": list(choice.box),
                "path": relative,
                "scale": choice.scale,
                "score": round(choice.score, 6),
            }
        )
    return rows


def _log(tracker: Tracker, summary: dict, staging: Path) -> None:
    log_summary(
        {"crops": summary["crops"], "crops_heldout": summary["per_split"][HELDOUT]},
        details={
            "scans": summary["scans"],
            "failed_scans": len(summary["failed"]),
            "scans_without_crops": len(summary["scans_without_crops"]),
            "heldout_scans": len(summary["heldout_scans"]),
            **{f"crops {name}": count for name, count in summary["per_bucket"].items()},
        },
    )
    tracker.log_picture(staging / "contact_sheet.png")
    tracker.log_artifact(staging / "summary.json")


# --- stage -------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Crop every accepted scan of data/ingest into the enabled buckets of `crop.buckets`, and
    mark the crops of `data.holdout.scans` scans held out of training."""
    settings = cfg.crop
    buckets = enabled_buckets(settings)
    scans = accepted_scans(cfg)
    images_dir = stage_dir(cfg, "ingest") / "images"
    out_dir = stage_dir(cfg, "crop")

    with stage_run(cfg, "crop", sections=("crop", "data")) as tracker, staged_dir(out_dir) as staging:
        for bucket in buckets:
            (staging / bucket.name).mkdir()
        rows, entries, failed, paintings = [], [], [], {}
        for scan_row in tqdm(scans, desc="crop", unit="scan"):
            scan_id = str(scan_row["id"])
            path = images_dir / f"{scan_id}.png"
            try:
                with Image.open(path) as opened:
                    scan = opened.convert("RGB")
                analysis = analyse(scan, settings)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                log.error("crop: skipping %s: %s", path, error)
                failed.append({"scan_id": scan_id, "path": str(path), "error": str(error)})
                continue
            choices = choose_crops(analysis, buckets, settings)
            paintings[scan_id] = list(analysis.painting)
            note = "" if choices else "(painting smaller than every bucket or blank)"
            entries.append(SheetEntry(scan_id, analysis, choices, note))
            rows += write_crops(scan, scan_id, choices, staging, settings.png_compress_level)
        if not entries:
            reasons = "; ".join(f"{f['path']}: {f['error']}" for f in failed)
            raise RuntimeError(f"crop: no scan could be read ({reasons})")
        if not rows:
            raise RuntimeError(
                f"crop: no crop fits any of {len(entries)} scans: each painting is smaller than every "
                "enabled bucket (crop.buckets, crop.min_source_scale) or blank (crop.min_ink_fraction)"
            )

        heldout = heldout_scans([row["scan_id"] for row in rows], cfg.data.holdout)
        for row in rows:
            row["split"] = HELDOUT if row["scan_id"] in heldout else TRAIN
        for entry in entries:
            entry.heldout = entry.scan_id in heldout
        write_jsonl(staging / "crops.jsonl", rows)
        sheet = draw_contact_sheet(entries, buckets, settings.contact_sheet)
        sheet.save(staging / "contact_sheet.png", compress_level=settings.png_compress_level)
        per_bucket = {b.name: sum(r["bucket"] == b.name for r in rows) for b in buckets}
        summary = {
            "scans": len(entries),
            "crops": len(rows),
            "per_bucket": per_bucket,
            "scans_without_crops": [e.scan_id for e in entries if not e.crops],
            "heldout_scans": sorted(heldout),
            "per_split": {split: sum(r["split"] == split for r in rows) for split in (TRAIN, HELDOUT)},
            "failed": failed,
            "paintings": paintings,
        }
        (staging / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")

        _log(tracker, summary, staging)

    print(
        f"crop: {len(entries)} scans -> {len(rows)} crops "
        + ", ".join(f"{name}: {count}" for name, count in per_bucket.items())
        + f"; {summary['per_split'][HELDOUT]} crops of {len(heldout)} held-out scans"
        + (f"; {len(failed)} unreadable" if failed else "")
    )
    return {"out_dir": str(out_dir), **summary}


main = hydra_entry(run, uses_torch=False)
