"""Stage `ingest`: every file under `data.scans_dir`, decoded, normalised, de-duplicated.

Each file is decoded fully and normalised to 8-bit sRGB RGB: EXIF orientation applied; 16-bit,
palette, CMYK, grayscale and alpha (composited onto `alpha_background`) converted; an embedded
ICC profile converted to sRGB. Scans that are too small, too elongated, identical to an earlier
one (sha256 of the normalised pixels) or nearly so (perceptual hash) are set aside with a reason.
A header declaring more than `max_image_pixels` is refused before decoding; big JPEGs are decoded
reduced; 16-bit scans are converted to 8 bits a strip of rows at a time, so a scan's peak memory
stays close to its decoded size (benchmarks/ingest_memory.py). Of an animated GIF (or any file
with several frames) the first frame is the scan. Links inside the scans folder are followed
once; a link leaving it (`follow_links_outside`), a link loop, a broken link, an unreadable file
or folder, and what is not a regular file (a FIFO, a device) are rejected with the reason. A file
name that is not valid UTF-8 is recorded with \\x escapes. Sidecar captions are UTF-8 (or UTF-16
with a BOM), at most `sidecar_max_bytes` of them; another encoding rejects the sidecar alone.
Handscrolls (up to `max_aspect`, 12:1 by default) are accepted. The raw scans are only read,
never modified.

Writes data/ingest/images/<id>.png, manifest.jsonl (one row per file, see docs/architecture.md)
and summary.json; prints "ingest: N read, M accepted, K rejected: <reason counts>". Fails only
when the folder is missing or empty or no valid scan remains.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import io
import json
import os
import stat
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from artmaster.config import ConfigError, Settings, hydra_entry, stage_dir
from artmaster.files import staged_dir, thumbnail_sheet, write_jsonl
from artmaster.tracking import log_summary, stage_run

SRGB = ImageCms.createProfile("sRGB")
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# modes converted to RGB or RGBA by PIL directly (no colour management, no bit-depth scaling)
PLAIN_MODES = {
    "1": "L",
    "P": "RGB",
    "PA": "RGBA",
    "LA": "RGBA",
    "La": "RGBA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "YCbCr": "RGB",
    "HSV": "RGB",
}


class ScansFolderMissing(ConfigError, FileNotFoundError):
    """`data.scans_dir` is not a folder (the command prints the message as one line)."""


class NoValidScan(ConfigError):
    """Every file of the scans folder was rejected (one line; the reasons are printed above it)."""


class ScanRejected(Exception):
    """A file that is not a usable scan: `code` groups reasons in the summary, `message` explains."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@contextmanager
def decompression_guard(max_pixels: int) -> Iterator[None]:
    """PIL refuses headers declaring more than `max_pixels` pixels (its warning band included)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _stat_size(path: Path) -> int:
    """The file's size; ScanRejected for what is not a readable file (links going nowhere or in a
    loop, a folder reached twice through links)."""
    try:
        info = path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ScanRejected(
                "symlink_loop", f"symbolic link loop ({printable(path.name)} -> {printable(os.readlink(path))})"
            ) from None
        if path.is_symlink():
            raise ScanRejected(
                "broken_link", f"symbolic link to {printable(os.readlink(path))}, which does not exist"
            ) from None
        raise ScanRejected("unreadable", f"cannot read the file ({error.strerror or error})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ScanRejected(
            "symlink_loop", "a link to a folder already read (a symbolic link loop); its files are not read twice"
        )
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
                 stat.S_ISBLK: "a block device"}
        kind = next((name for test, name in kinds.items() if test(info.st_mode)), "a special file")
        raise ScanRejected("not_a_file", f"{kind}, not a regular file; not read")
    return info.st_size


@dataclass(frozen=True)
class IngestSettings(Settings):
    min_side: int
    max_aspect: float
    max_image_pixels: int
    max_decoded_mb: float
    max_long_side: int
    phash_max_distance: int
    alpha_background: tuple[int, int, int]
    rendering_intent: str
    sidecar_suffix: str
    sidecar_max_bytes: int
    follow_links_outside: bool
    png_compress_level: int
    thumbnail_long_side: int


def _long_side_scale(width: int, height: int, settings: IngestSettings) -> float:
    """Downscale factor (<= 1) of a scan: to `max_long_side` on its long side, except that an
    elongated scan (a handscroll, more than 2:1) keeps a short side of `max_long_side / 2`, so its
    crops get the resolution a hanging scroll's get instead of being rejected as too small."""
    limit = settings.max_long_side
    return min(1.0, max(limit / max(width, height), limit / 2 / min(width, height)))


# first bytes of the formats a scan comes in: a file that starts like one but that PIL cannot open
# is a damaged image (bad CRC, broken header), not a file of unknown format
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}


def _unidentified(path: Path) -> ScanRejected:
    """Why PIL could not open a file: the format's own error when it starts like a known image."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    kind = next((name for signature, name in SIGNATURES.items() if head.startswith(signature)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is None:
        return ScanRejected("not_an_image", "not an image file PIL can decode (unknown format)")
    try:
        Image.OPEN[kind][0](str(path)).close()
        detail = "PIL cannot open it"
    except Exception as error:  # the format's own reason: bad checksum, broken header...
        detail = str(error)
    return ScanRejected("corrupt", f"a damaged {kind} file (it starts like one, but {detail})")


def decoded_bytes(mode: str, size: tuple[int, int]) -> int:
    """Bytes PIL holds for an image once decoded: 1 per pixel for 1, L and P, 2 for the 16-bit
    grayscale modes, 4 for every other mode (PIL pads RGB and two-band modes to 4)."""
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode in SIXTEEN_BIT_MODES else 4
    return size[0] * size[1] * per_pixel


def _check_decoded_size(image: Image.Image, settings: IngestSettings) -> None:
    """Refuse, before decoding, a scan whose pixels would take more than `max_decoded_mb`: the
    pixel guard alone ignores bit depth, and a scan's peak memory is a small multiple of this."""
    size = decoded_bytes(image.mode, image.size)
    if size > settings.max_decoded_mb * 1e6:
        raise ScanRejected(
            "too_large",
            f"refused without decoding: {image.width}x{image.height} {image.mode} takes {size / 1e6:.0f} MB decoded, "
            f"over data.ingest.max_decoded_mb={settings.max_decoded_mb:g}",
        )


def _open(path: Path, settings: IngestSettings, row: dict) -> Image.Image:
    """Open and fully decode one file (reduced for big JPEGs) noting its format, mode and declared
    size in the manifest row; ScanRejected if it cannot be. Of an animated or multi-page file
    (GIF, APNG, WebP, TIFF) the first frame is the scan, noted in the row's steps."""
    if _stat_size(path) == 0:
        raise ScanRejected("empty", "empty file (0 bytes)")
    try:
        image = Image.open(path)
    except PermissionError as error:
        raise ScanRejected(
            "unreadable", f"permission denied ({error.strerror}): make the file readable to ingest it"
        ) from None
    except UnidentifiedImageError:
        raise _unidentified(path) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ScanRejected(
            "too_many_pixels",
            f"refused without decoding: {error} (max_image_pixels={settings.max_image_pixels})",
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ScanRejected("corrupt", f"cannot read the image header: {error}") from None
    declared = image.size
    row.update(format=image.format, mode=image.mode, declared_size=list(declared))
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        row["steps"].append(f"first of {frames} frames used ({image.format} with several frames)")
    try:
        scale = _long_side_scale(*declared, settings)
        if image.format == "JPEG" and scale < 1:
            image.draft(None, (max(1, round(declared[0] * scale)), max(1, round(declared[1] * scale))))
            if image.size != declared:
                row["steps"].append(
                    f"JPEG decoded reduced from {declared[0]}x{declared[1]} to {image.width}x{image.height}"
                )
        _check_decoded_size(image, settings)
        image.load()
    except ScanRejected:
        image.close()
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        image.close()
        raise ScanRejected("too_many_pixels", f"refused: {error}") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError, zlib.error...
        image.close()
        code = "truncated" if "truncated" in str(error).lower() else "corrupt"
        raise ScanRejected(
            code, f"{image.format or 'image'} data cannot be decoded ({type(error).__name__}: {error})"
        ) from None
    return image


STRIP_PIXELS = 1 << 18  # pixels converted at a time: the conversion's extra memory is about 2 MB


def _strips(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixel values) of consecutive strips of rows, about STRIP_PIXELS each."""
    rows = max(1, STRIP_PIXELS // max(1, image.width))
    for top in range(0, image.height, rows):
        yield top, np.asarray(image.crop((0, top, image.width, min(image.height, top + rows))))


def _to_eight_bit(image: Image.Image, steps: list[str]) -> Image.Image:
    """16-bit and 32-bit integer grayscale -> L by their full range (PIL's convert would clip),
    a strip of rows at a time: no full-size wide-integer copy of a huge scan."""
    if image.mode not in SIXTEEN_BIT_MODES and image.mode != "I":
        return image
    wide = image.mode in SIXTEEN_BIT_MODES or any(strip.max(initial=0) > 255 for _, strip in _strips(image))
    bits = 16 if wide else 8
    steps.append(f"{bits}-bit grayscale -> 8-bit")
    eight = np.empty((image.height, image.width), np.uint8)
    for top, strip in _strips(image):
        shifted = strip >> (bits - 8)
        eight[top : top + len(strip)] = np.clip(shifted, 0, 255, out=shifted)
    converted = Image.fromarray(eight)
    converted.info = image.info
    return converted


def _colour_manage(image: Image.Image, settings: IngestSettings, steps: list[str]) -> Image.Image:
    """Embedded ICC profile -> sRGB (alpha kept aside); a broken profile is noted and ignored."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in {"RGB", "RGBA", "CMYK", "L"}:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        intent = ImageCms.Intent[settings.rendering_intent.upper()]
        alpha = image.getchannel("A") if image.mode == "RGBA" else None
        colour = image.convert("RGB") if alpha is not None else image
        converted = ImageCms.profileToProfile(colour, source, SRGB, renderingIntent=intent, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, KeyError) as error:
        steps.append(f"ICC profile ignored ({error})")
        return image
    steps.append(f"ICC profile '{ImageCms.getProfileDescription(source).strip()}' -> sRGB")
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def normalise(image: Image.Image, settings: IngestSettings, steps: list[str]) -> Image.Image:
    """Any decoded image -> 8-bit sRGB RGB, upright, at most `max_long_side` px on its long side."""
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        steps.append(f"EXIF orientation {orientation} applied")
    image = _to_eight_bit(image, steps)
    if image.mode in PLAIN_MODES:
        target = PLAIN_MODES[image.mode]
        if image.mode == "P" and "transparency" in image.info:
            target = "RGBA"
        steps.append(f"{image.mode} -> {target}")
        image = image.convert(target)
    if image.mode not in {"RGB", "RGBA", "CMYK", "L"}:
        raise ScanRejected("unsupported_mode", f"unsupported pixel mode {image.mode}")
    image = _colour_manage(image, settings, steps)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, tuple(int(v) for v in settings.alpha_background))
        background.paste(image, mask=image)  # its alpha band: no separate copy of it
        steps.append(f"alpha composited onto {settings.alpha_background}")
        image = background
    elif image.mode not in {"RGB", "L"}:
        steps.append(f"{image.mode} -> RGB")
        image = image.convert("RGB")
    scale = _long_side_scale(image.width, image.height, settings)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        steps.append(f"downscaled from {image.width}x{image.height} to {size[0]}x{size[1]}")
        image = image.resize(size, Image.Resampling.LANCZOS)
    if image.mode == "L":  # after downscaling: the same pixels (the channels are copies), a third of the memory
        steps.append("L -> RGB")
        image = image.convert("RGB")
    image.info = {}  # no stale ICC profile or EXIF travels into the normalised PNG
    return image


def _dct_matrix(size: int) -> np.ndarray:
    """Orthonormal DCT-II basis: row k is frequency k."""
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    basis = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2 / size)
    basis[0] /= np.sqrt(2)
    return basis


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: signs (against the median) of the 8x8 lowest DCT frequencies of a 32x32
    grayscale copy. Re-encoding or resizing flips few bits; different pictures about half."""
    gray = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT32 @ gray @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term would skew the median
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# invisible characters that reorder or hide text (bidi overrides, zero-width): removed from captions
HIDDEN = set("\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff")


def read_sidecar(path: Path, max_bytes: int, steps: list[str]) -> str | None:
    """A caption file as one clean line: UTF-8 (BOM allowed) or UTF-16 with its BOM, NFC, control
    and invisible direction characters removed; only its first `max_bytes` bytes are read (noted in
    `steps`). Any other encoding (GBK, Latin-1, UTF-16 without a BOM) is rejected with the reason;
    the scan itself is kept."""
    name = printable(path.name)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise ScanRejected("bad_sidecar", f"sidecar {name} cannot be read ({error.strerror or error})") from None
    whole = len(data) <= max_bytes
    if not whole:
        steps.append(f"sidecar {name} is longer than data.ingest.sidecar_max_bytes={max_bytes}: "
                     f"only its first {max_bytes} bytes are kept")
        data = data[:max_bytes]
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            codec = "utf-16"
        elif b"\0" in data:
            raise ScanRejected(
                "bad_sidecar",
                f"sidecar {name} holds NUL bytes (UTF-16 without a byte-order mark?); save it as UTF-8",
            )
        else:
            codec = "utf-8-sig"
        # a cut sidecar may end inside a character: that partial character is dropped
        text = codecs.getincrementaldecoder(codec)().decode(data, final=whole)
    except UnicodeDecodeError as error:
        raise ScanRejected(
            "bad_sidecar",
            f"sidecar {name} is not UTF-8 (byte {error.start}: {error.reason}; GBK or Latin-1?); "
            "save it as UTF-8",
        ) from None
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text if ch not in HIDDEN)
    return " ".join(text.split()) or None


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (which Python keeps as lone
    surrogates) written as \\xNN escapes, so the manifest and the messages can hold any name."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _inside(path: Path, real_root: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), real_root]) == real_root


def _outside_link(path: Path, what: str) -> ScanRejected:
    return ScanRejected(
        "outside_link",
        f"{what} is a symbolic link to {printable(os.path.realpath(path))}, outside the scans folder; not read "
        "(data.ingest.follow_links_outside=true reads it)",
    )


def _walk(root: Path, follow_outside: bool) -> tuple[list[Path], list[tuple[Path, ScanRejected]]]:
    """Every entry under root that is not a folder to descend into: files, and links that go
    nowhere, loop, or lead to a folder already read (ingest rejects those with the reason); and
    the folders not read, with the reason: unreadable ones, and links to folders outside root
    unless `follow_outside`. Linked folders are followed once each, so a link back up the tree
    cannot loop."""
    real_root = os.path.realpath(root)
    found, refused, seen = [], [], {real_root}

    def unreadable(error: OSError) -> None:
        refused.append((Path(error.filename), ScanRejected(
            "unreadable_folder",
            f"cannot list the folder ({error.strerror or error}): its files are not read; make it readable",
        )))

    for folder, dirs, names in os.walk(root, followlinks=True, onerror=unreadable):
        descend = []
        for name in sorted(dirs):
            path = Path(folder) / name
            real = os.path.realpath(path)
            if real in seen:
                found.append(path)
            elif not follow_outside and not _inside(path, real_root):
                refused.append((path, _outside_link(path, "the folder")))
            else:
                seen.add(real)
                descend.append(name)
        dirs[:] = descend
        found.extend(Path(folder) / name for name in names)
    return found, refused


def list_scans(root: Path, sidecar_suffix: str, follow_outside: bool = False) -> tuple[
        list[tuple[Path, Path | None]], list[tuple[Path, ScanRejected]]]:
    """(file, its sidecar or None) for every file under root, in a stable order, and the folders
    not read with the reason (see `_walk`). A .txt file is a sidecar when another file in its
    folder shares its stem; otherwise it is a candidate scan."""
    found, refused = _walk(root, follow_outside)
    files = sorted(found, key=lambda p: p.relative_to(root).as_posix())
    suffix = sidecar_suffix.lower()
    sidecars = {(p.parent, p.stem): p for p in files if p.suffix.lower() == suffix}
    stems_with_scans = {(p.parent, p.stem) for p in files if p.suffix.lower() != suffix}
    pairs = []
    for path in files:
        key = (path.parent, path.stem)
        if path.suffix.lower() == suffix and key in stems_with_scans:
            continue
        pairs.append((path, sidecars.get(key) if path.suffix.lower() != suffix else None))
    return pairs, refused


def _check_shape(width: int, height: int, settings: IngestSettings) -> None:
    aspect = max(width, height) / min(width, height)
    if aspect > settings.max_aspect:
        raise ScanRejected(
            "extreme_aspect",
            f"aspect ratio {aspect:.2f} ({width}x{height}) is over max_aspect={settings.max_aspect}",
        )
    if min(width, height) < settings.min_side:
        raise ScanRejected(
            "too_small",
            f"{width}x{height}: short side {min(width, height)} px is under min_side={settings.min_side}",
        )


def _empty_row(source: str) -> dict:
    return {
        "id": None, "source": source, "sha256": None, "phash": None, "width": None, "height": None,
        "status": "rejected", "reason": "", "reason_code": "", "sidecar_text": None, "sidecar_error": None,
        "format": None, "mode": None, "declared_size": None, "steps": [],
    }  # fmt: skip


class Deduplicator:
    """First seen wins: later scans with the same normalised pixels (sha256) are duplicates, those
    within `max_distance` perceptual-hash bits of a kept scan are near-duplicates."""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        self.by_digest: dict[str, str] = {}
        self.hashes: list[tuple[int, str]] = []

    def check(self, digest: str, phash: int) -> None:
        if digest in self.by_digest:
            raise ScanRejected("duplicate", f"same pixels as {self.by_digest[digest]}")
        for kept, source in self.hashes:
            distance = hamming(phash, kept)
            if distance <= self.max_distance:
                raise ScanRejected(
                    "near_duplicate",
                    f"near-duplicate of {source} (perceptual hash distance {distance}"
                    f" <= {self.max_distance})",
                )

    def keep(self, digest: str, phash: int, source: str) -> None:
        self.by_digest[digest] = source
        self.hashes.append((phash, source))


def ingest_file(
    path: Path, source: str, sidecar: Path | None, settings: IngestSettings, seen: Deduplicator, images_dir: Path,
    root: Path,
) -> tuple[dict, Image.Image | None]:
    """One manifest row for one file under `root`, and the normalised scan when it is accepted
    (written to images_dir/<id>.png). Never raises for a bad file: the row says what is wrong with it."""
    row = _empty_row(source)
    real_root = os.path.realpath(root)
    follow_outside = settings.follow_links_outside
    try:
        if not follow_outside and not _inside(path, real_root) and path.exists():
            raise _outside_link(path, "the file")
        with _open(path, settings, row) as raw:
            image = normalise(raw, settings, row["steps"])
        row.update(width=image.width, height=image.height)
        _check_shape(image.width, image.height, settings)
        digest = hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
        phash = perceptual_hash(image)
        row.update(sha256=digest, phash=f"{phash:016x}")
        try:
            seen.check(digest, phash)
        except ScanRejected as duplicate:
            row.update(status="duplicate", reason_code=duplicate.code, reason=duplicate.message)
            return row, None
    except ScanRejected as rejected:
        row.update(status="rejected", reason_code=rejected.code, reason=rejected.message)
        return row, None
    except Exception as error:  # one strange file never stops the others
        row.update(status="rejected", reason_code="error", reason=printable(f"{type(error).__name__}: {error}"))
        return row, None
    seen.keep(digest, phash, source)
    row.update(id=digest[:16], status="accepted")  # only accepted rows get an id: ids are unique
    image.save(images_dir / f"{row['id']}.png", "PNG", compress_level=settings.png_compress_level)
    if sidecar is not None:
        try:
            if not follow_outside and not _inside(sidecar, real_root):
                raise _outside_link(sidecar, f"sidecar {printable(sidecar.name)}")
            row["sidecar_text"] = read_sidecar(sidecar, settings.sidecar_max_bytes, row["steps"])
        except ScanRejected as rejected:
            row["sidecar_error"] = rejected.message
    return row, image


def summarise(root: Path, rows: list[dict]) -> dict:
    accepted = sum(row["status"] == "accepted" for row in rows)
    reasons = Counter(row["reason_code"] for row in rows if row["status"] != "accepted")
    detail = ", ".join(f"{n} {code}" for code, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    bad_sidecars = sum(row["sidecar_error"] is not None for row in rows)
    line = (
        f"ingest: {len(rows)} read, {accepted} accepted, {len(rows) - accepted} rejected: {detail or 'none'}"
    )
    return {
        "scans_dir": printable(str(root)),
        "read": len(rows),
        "accepted": accepted,
        "rejected": len(rows) - accepted,
        "duplicates": sum(row["status"] == "duplicate" for row in rows),
        "reasons": dict(sorted(reasons.items())),
        "sidecars": sum(row["sidecar_text"] is not None for row in rows),
        "sidecars_rejected": bad_sidecars,
        "line": line + (f"; {bad_sidecars} sidecar(s) rejected" if bad_sidecars else ""),
    }


def run(cfg: DictConfig) -> dict:
    """Ingest every file under data.scans_dir into data/ingest."""
    settings = IngestSettings.from_config(cfg.data.ingest)
    root = Path(cfg.data.scans_dir)
    if root.exists() and not root.is_dir():
        raise ScansFolderMissing(f"ingest: scans folder {root} is a file, not a folder (set data.scans_dir)")
    if not root.is_dir():
        raise ScansFolderMissing(f"ingest: scans folder {root} does not exist (set data.scans_dir)")
    pairs, refused = list_scans(root, settings.sidecar_suffix, settings.follow_links_outside)
    if not pairs and not refused:
        raise ConfigError(f"ingest: scans folder {root} holds no files (set data.scans_dir)")

    with stage_run(cfg, "ingest", sections=("data",)) as tracker, staged_dir(stage_dir(cfg, "ingest")) as staging:
        (staging / "images").mkdir()
        seen = Deduplicator(settings.phash_max_distance)
        rows, thumbs = [_refused_row(root, path, reason) for path, reason in refused], []
        with decompression_guard(settings.max_image_pixels):
            for path, sidecar in tqdm(pairs, desc="ingest", unit="file"):
                source = _source(root, path)
                row, image = ingest_file(path, source, sidecar, settings, seen, staging / "images", root)
                if source != path.relative_to(root).as_posix():
                    row["steps"].insert(0, "file name is not valid UTF-8: recorded with \\x escapes")
                rows.append(row)
                if image is not None:
                    image.thumbnail((settings.thumbnail_long_side,) * 2, Image.Resampling.BOX)
                    thumbs.append((printable(path.name), image))
        summary = summarise(root, rows)
        if not summary["accepted"]:
            _print_rejections(rows)
            reasons = "; ".join(f"{row['source']}: {row['reason']}" for row in rows[:3])
            more = f"; and {len(rows) - 3} more listed above" if len(rows) > 3 else ""
            raise NoValidScan(f"{summary['line']}; no valid scan in {root} ({reasons}{more})")
        write_jsonl(staging / "manifest.jsonl", rows)
        (staging / "summary.json").write_text(
            json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        counts = {key: summary[key] for key in ("read", "accepted", "rejected", "duplicates")}
        log_summary(counts, details={f"rejected: {code}": n for code, n in summary["reasons"].items()},
                    note=summary["line"])
        sheet = thumbnail_sheet(thumbs, settings.thumbnail_long_side)
        tracker.log_image(sheet, artifact_file="pictures/ingest_accepted.png")
        tracker.log_artifact(staging / "manifest.jsonl")
        tracker.log_artifact(staging / "summary.json")
    print(summary["line"])
    _print_rejections(rows)
    return summary


def _source(root: Path, path: Path) -> str:
    return printable(path.relative_to(root).as_posix())


def _refused_row(root: Path, path: Path, rejected: ScanRejected) -> dict:
    """The manifest row of a folder that was not read (unreadable, or a link leaving root)."""
    row = _empty_row(_source(root, path) + "/")
    row.update(reason_code=rejected.code, reason=rejected.message)
    return row


def _print_rejections(rows: list[dict]) -> None:
    for row in rows:
        if row["status"] != "accepted":
            print(f"  {row['status']}: {row['source']}: {row['reason']}")
        if row["sidecar_error"]:
            print(f"  sidecar rejected: {row['source']}: {row['sidecar_error']}")


main = hydra_entry(run, uses_torch=False)
