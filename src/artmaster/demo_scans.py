"""Stage `demo_scans`: the embedded default data, a dozen photographed hanging scrolls in the demo
painter's style (artmaster.painter), written the way real scan folders arrive.

Mixed sizes (long side >= `data.demo.min_long_side`), portrait and landscape, mixed formats (JPEG,
PNG, 16-bit RGB TIFF), one JPEG stored rotated with an EXIF orientation tag, some scans in a
sub-folder with a unicode name and a few with sidecar captions (<same stem>.txt). Deterministic:
the same config gives the same files.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from omegaconf import DictConfig
from PIL import ExifTags, Image
from tqdm import tqdm

from artmaster.config import Settings, hydra_entry, stage_dir
from artmaster.files import staged_dir, thumbnail_sheet
from artmaster.painter import scan, style_by_name
from artmaster.tracking import log_summary, stage_run

SUFFIXES = {"jpeg": ".jpg", "png": ".png", "tiff16": ".tif"}
# The transpose that, followed by the one EXIF orientation n asks viewers for, gives the original.
STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class DemoScan:
    path: str  # relative to the output folder, posix separators
    fmt: str  # a key of SUFFIXES
    width: int  # as displayed (after EXIF transpose)
    height: int
    seed: int
    exif_orientation: int | None
    caption: str | None


@dataclass(frozen=True)
class DemoSettings(Settings):
    painter: str
    count: int
    seed: int
    min_long_side: int
    max_long_side: int
    aspect: tuple[float, float]
    formats: tuple[str, ...]
    jpeg_quality: int
    compress_level: int
    exif_orientation: int | None
    subfolder: str
    in_subfolder: int
    captions: tuple[str, ...] | None
    thumbnail_long_side: int


def plan(settings: DemoSettings) -> list[DemoScan]:
    """What the stage will write, decided from the config alone (cheap; tests read it)."""
    style = style_by_name(settings.painter)
    count = settings.count
    formats = list(settings.formats)
    unknown = sorted(set(formats) - set(SUFFIXES))
    if count < 1 or not formats or unknown:
        raise ValueError(
            f"data.demo: need count >= 1 and formats from {sorted(SUFFIXES)}; "
            f"got count={count}, unknown formats {unknown}"
        )
    if not 16 <= settings.min_long_side <= settings.max_long_side:
        raise ValueError(
            "data.demo: need 16 <= min_long_side <= max_long_side, "
            f"got {settings.min_long_side}, {settings.max_long_side}"
        )
    low, high = settings.aspect
    if not 1.0 <= low <= high:
        raise ValueError(f"data.demo.aspect: need 1 <= low <= high, got {list(settings.aspect)}")
    if settings.exif_orientation is not None and settings.exif_orientation not in STORE_FOR_ORIENTATION:
        raise ValueError(f"data.demo.exif_orientation: must be 2..8 or null, got {settings.exif_orientation}")

    rng = np.random.default_rng(settings.seed)
    portraits = (
        min(max(round(count * style.portrait_share), 1), count - 1)
        if count > 1
        else round(style.portrait_share)
    )
    portrait = np.arange(count) < portraits
    rng.shuffle(portrait)
    captions = list(settings.captions or [])
    first_subfolder = count - settings.in_subfolder
    exif_pending = settings.exif_orientation is not None
    scans = []
    for index in range(count):
        long = int(rng.integers(settings.min_long_side, settings.max_long_side + 1))
        short = max(16, round(long / rng.uniform(low, high)))
        width, height = (short, long) if portrait[index] else (long, short)
        fmt = formats[index % len(formats)]
        exif = None
        if fmt == "jpeg" and exif_pending:
            exif, exif_pending = settings.exif_orientation, False
        name = f"{settings.painter}_{index + 1:02d}{SUFFIXES[fmt]}"
        path = PurePosixPath(settings.subfolder, name) if index >= first_subfolder else PurePosixPath(name)
        caption = captions[index] if index < len(captions) else None
        scans.append(
            DemoScan(str(path), fmt, width, height, settings.seed * 1000 + index, exif, caption)
        )
    return scans


def write_tiff16(path: Path, rgb: np.ndarray, compress_level: int, rows_per_strip: int = 64) -> None:
    """Write an (H, W, 3) uint16 array as a baseline RGB TIFF, 16 bits per sample, Adobe-deflate
    strips with horizontal differencing (PIL cannot write 16-bit RGB)."""
    if rgb.dtype != np.uint16 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_tiff16: need an (H, W, 3) uint16 array, got {rgb.dtype} {rgb.shape}")
    height, width, _ = rgb.shape
    differenced = rgb.copy()
    differenced[:, 1:] -= rgb[:, :-1]  # TIFF predictor 2; uint16 arithmetic wraps as the spec wants
    strips = [
        zlib.compress(differenced[top : top + rows_per_strip].astype("<u2").tobytes(), compress_level)
        for top in range(0, height, rows_per_strip)
    ]
    offsets, position = [], 8
    for strip in strips:
        offsets.append(position)
        position += len(strip)
    bits_at = position
    counts_at = bits_at + 6
    offsets_at = counts_at + 4 * len(strips)
    ifd_at = offsets_at + 4 * len(strips)
    short, long = 3, 4
    entries = [
        (256, long, 1, width),
        (257, long, 1, height),
        (258, short, 3, bits_at),
        (259, short, 1, 8),  # Adobe deflate
        (262, short, 1, 2),  # RGB
        (273, long, len(strips), offsets_at if len(strips) > 1 else offsets[0]),
        (277, short, 1, 3),
        (278, long, 1, rows_per_strip),
        (279, long, len(strips), counts_at if len(strips) > 1 else len(strips[0])),
        (284, short, 1, 1),  # interleaved samples
        (317, short, 1, 2),  # horizontal differencing
    ]
    ifd = (
        struct.pack("<H", len(entries))
        + b"".join(struct.pack("<HHII", *entry) for entry in entries)
        + b"\0\0\0\0"
    )
    with open(path, "wb") as out:
        out.write(b"II" + struct.pack("<HI", 42, ifd_at))
        out.writelines(strips)
        out.write(struct.pack("<3H", 16, 16, 16))
        out.write(struct.pack(f"<{len(strips)}I", *(len(strip) for strip in strips)))
        out.write(struct.pack(f"<{len(strips)}I", *offsets))
        out.write(ifd)


def write_scan(image: Image.Image, path: Path, item: DemoScan, settings: DemoSettings) -> None:
    if item.fmt == "jpeg":
        options = {"quality": settings.jpeg_quality}
        if item.exif_orientation is not None:
            image = image.transpose(STORE_FOR_ORIENTATION[item.exif_orientation])
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = item.exif_orientation
            options["exif"] = exif.tobytes()
        image.save(path, "JPEG", **options)
    elif item.fmt == "png":
        image.save(path, "PNG", compress_level=settings.compress_level)
    else:
        write_tiff16(path, np.asarray(image, dtype=np.uint16) * 257, settings.compress_level)


def run(cfg: DictConfig) -> dict:
    """Paint the demo scans into data/demo_scans (replacing the folder whole)."""
    settings = DemoSettings.from_config(cfg.data.demo)
    style = style_by_name(settings.painter)
    items = plan(settings)
    out_dir = stage_dir(cfg, "demo_scans")
    with stage_run(cfg, "demo_scans", sections=("data",)) as tracker, staged_dir(out_dir) as staging:
        thumbs = []
        for item in tqdm(items, desc="demo_scans", unit="scan"):
            image = scan(style, item.width, item.height, item.seed)
            target = staging / item.path
            target.parent.mkdir(parents=True, exist_ok=True)
            write_scan(image, target, item, settings)
            if item.caption is not None:
                target.with_suffix(".txt").write_text(item.caption + "\n", encoding="utf-8")
            thumb = image.copy()
            thumb.thumbnail((settings.thumbnail_long_side,) * 2, Image.Resampling.BOX)
            thumbs.append((f"{PurePosixPath(item.path).name} {item.width}x{item.height}", thumb))
        log_summary({"scans": len(items)},
                    details={"megapixels": sum(item.width * item.height for item in items) / 1e6,
                             "sidecar_captions": sum(item.caption is not None for item in items)},
                    note=f"Painted {len(items)} scans of the demo painter `{style.name}` into `{out_dir}`.")
        tracker.log_image(
            thumbnail_sheet(thumbs, settings.thumbnail_long_side),
            artifact_file="pictures/demo_scans.png",
        )
    print(f"demo_scans: wrote {len(items)} scans of style {style.name} to {out_dir}")
    return {"dir": str(out_dir), "scans": [item.path for item in items]}


main = hydra_entry(run, uses_torch=False)
