"""A generated corpus of awkward scan files, and what `ingest` must make of each.

`build_bad_scans(folder)` writes the corpus and returns {source path: Expected}. Images are small
(a few hundred px), so tests run ingest with `data.ingest.min_side=MIN_SIDE`.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageCms

from artmaster.demo_scans import STORE_FOR_ORIENTATION, write_tiff16
from artmaster.painter import STYLES, paint

MIN_SIDE = 128
MARKER = (220, 20, 20)  # a red patch painted in the top-left corner of pictures whose layout is checked


@dataclass(frozen=True)
class Expected:
    status: str  # accepted | rejected | duplicate
    reason_code: str = ""
    size: tuple[int, int] | None = None  # (width, height) of the normalised scan, when it matters


def painting(index: int, width: int = 240, height: int = 320) -> Image.Image:
    """A distinct small painting per index (styles and seeds differ)."""
    style = list(STYLES.values())[index % len(STYLES)]
    return paint(style, width, height, seed=1000 + index)


def with_marker(image: Image.Image) -> Image.Image:
    marked = image.copy()
    marked.paste(MARKER, (0, 0, marked.width // 4, marked.height // 4))
    return marked


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def write_png16_rgb(path: Path, rgb16: np.ndarray) -> None:
    """16-bit RGB PNG (PIL cannot write one): filter byte 0 before every big-endian row."""
    height, width, _ = rgb16.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    path.write_bytes(png_bytes(width, height, 16, 2, zlib.compress(raw)))


def swapped_primaries_profile() -> bytes:
    """An sRGB ICC profile with the red and blue colorants swapped: a red pixel tagged with it
    means blue, so a correct ICC -> sRGB conversion turns red into blue."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    entries = {bytes(data[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    data[red + 4 : red + 12], data[blue + 4 : blue + 12] = (
        data[blue + 4 : blue + 12],
        data[red + 4 : red + 12],
    )
    return bytes(data)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def shared_tracking_overrides(tmp_path_factory) -> list[str]:
    """Hydra overrides pointing MLflow at one store for the whole test session: creating a SQLite
    store costs seconds, so the modules that run stages share one."""
    base = tmp_path_factory.getbasetemp()
    return [f"tracking.uri=sqlite:///{base / 'mlflow.db'}", f"tracking.artifact_dir={base / 'mlartifacts'}"]


def build_bad_scans(folder: Path) -> dict[str, Expected]:
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}

    def put(name: str, data: bytes, outcome: Expected) -> None:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        expected[name] = outcome

    put("good.png", encoded(painting(0), "PNG"), Expected("accepted", size=(240, 320)))
    # sidecar with control characters and CRLF, read as one clean line
    (folder / "good.txt").write_bytes("Misty gorge\x07 at dawn\r\n 第二行\t end\n".encode())
    put("zero.jpg", b"", Expected("rejected", "empty"))
    jpeg = encoded(painting(1), "JPEG", quality=90)
    put("truncated.jpg", jpeg[: len(jpeg) // 2], Expected("rejected", "truncated"))
    png = encoded(painting(2), "PNG")
    put("truncated.png", png[: len(png) // 2], Expected("rejected", "truncated"))
    put("png_named.jpg", encoded(painting(3), "PNG"), Expected("accepted", size=(240, 320)))
    put("notes.jpg", b"These are my notes, not a picture.\n", Expected("rejected", "not_an_image"))
    put("orphan.txt", b"a text file with no scan beside it\n", Expected("rejected", "not_an_image"))
    put("list.csv", b"name,year\nscroll,1998\n", Expected("rejected", "not_an_image"))
    put("cmyk.jpg", encoded(painting(4).convert("CMYK"), "JPEG", quality=95), Expected("accepted"))
    (folder / "cmyk.txt").write_bytes(
        b"caption in latin-1: caf\xe9\n"
    )  # not UTF-8: sidecar rejected, scan kept
    gray16 = (np.linspace(0, 65535, 200 * 300).reshape(300, 200)).astype(np.uint16)
    put("gray16.png", encoded(Image.fromarray(gray16), "PNG"), Expected("accepted", size=(200, 300)))
    rgb16 = np.asarray(painting(5), dtype=np.uint16) * 257
    write_png16_rgb(folder / "rgb16.png", rgb16)
    expected["rgb16.png"] = Expected("accepted", size=(240, 320))
    write_tiff16(folder / "rgb16.tif", np.asarray(painting(6), dtype=np.uint16) * 257, compress_level=1)
    expected["rgb16.tif"] = Expected("accepted", size=(240, 320))

    palette = painting(7).quantize(64)
    pixels = np.asarray(palette).copy()
    pixels[:, : palette.width // 2] = 63  # left half: the transparent palette entry
    transparent = Image.fromarray(pixels, "P")
    transparent.putpalette(palette.getpalette())
    put(
        "palette_alpha.png",
        encoded(transparent, "PNG", transparency=63),
        Expected("accepted", size=(240, 320)),
    )
    rgba = with_marker(painting(8)).convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, np.uint8)
    alpha[-rgba.height // 4 :] = 0  # bottom quarter fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    put("rgba.png", encoded(rgba, "PNG"), Expected("accepted", size=(240, 320)))
    put("gray.jpg", encoded(painting(9).convert("L"), "JPEG"), Expected("accepted", size=(240, 320)))

    # displayed 320x240 with the marker top-left; stored rotated, with EXIF orientation 6
    upright = with_marker(painting(10, 320, 240))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored = upright.transpose(STORE_FOR_ORIENTATION[6])
    put(
        "rotated.jpg",
        encoded(stored, "JPEG", quality=95, exif=exif.tobytes()),
        Expected("accepted", size=(320, 240)),
    )

    icc = with_marker(painting(11))
    put(
        "icc_swapped.png",
        encoded(icc, "PNG", icc_profile=swapped_primaries_profile()),
        Expected("accepted", size=(240, 320)),
    )

    twin = encoded(painting(12), "PNG")
    put("dup_a.png", twin, Expected("accepted"))
    put("dup_b.png", twin, Expected("duplicate", "duplicate"))
    original = painting(13)
    put("near_dup_orig.png", encoded(original, "PNG"), Expected("accepted"))
    put(
        "near_dup_reencoded.jpg",
        encoded(original, "JPEG", quality=60),
        Expected("duplicate", "near_duplicate"),
    )

    put("tiny.png", encoded(painting(14, 64, 48), "PNG"), Expected("rejected", "too_small"))
    put("banner.png", encoded(painting(15, 2000, 130), "PNG"), Expected("rejected", "extreme_aspect"))
    put("山水 卷轴/画 一.png", encoded(painting(16), "PNG"), Expected("accepted", size=(240, 320)))
    # a header declaring 100000 x 100000 RGB pixels (30 GB decoded) over a few bytes of data
    put(
        "gigantic.png",
        png_bytes(100_000, 100_000, 8, 2, zlib.compress(b"\0" * 1000)),
        Expected("rejected", "too_many_pixels"),
    )
    build_more_bad_scans(folder, put, expected)
    return expected


# Sidecar captions in awkward encodings: (scan name, sidecar bytes, the caption ingest reads or None
# when the sidecar is rejected). Each scan is a distinct painting, accepted.
SIDECARS = {
    "utf16_sidecar.png": ("山水 mist\x07 over the gorge\r\n".encode("utf-16"), "山水 mist over the gorge"),
    "gbk_sidecar.png": ("湘西峡谷 in mist".encode("gbk"), None),
    "utf16_no_bom_sidecar.png": ("Misty gorge".encode("utf-16-le"), None),
    "escapes_sidecar.png": (
        "\u202eevil\u202c Cliffs\x1b[31m in\x0c light\u200b\x7f".encode(),
        "evil Cliffs [31m in light",
    ),
}


def build_more_bad_scans(folder: Path, put, expected: dict[str, Expected]) -> None:
    """Kinds added for issue 7: several frames, links, permissions, handscrolls, sidecar encodings,
    a broken ICC profile and folder litter."""
    import os

    # animated GIF: the first frame is the scan (documented in artmaster.ingest)
    frames = [painting(index).quantize(64) for index in (17, 18, 19)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("animated.gif", buffer.getvalue(), Expected("accepted", size=(240, 320)))
    # a multi-page TIFF: its first page is the scan
    pages = [painting(20), painting(21)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    put("multipage.tif", buffer.getvalue(), Expected("accepted", size=(240, 320)))
    # an embedded ICC profile that is not one: ignored (noted), the pixels kept as they are
    put("bad_icc.png", encoded(painting(22), "PNG", icc_profile=b"not an ICC profile"), Expected("accepted"))
    # a handscroll of 10:1: accepted (data.ingest.max_aspect 12)
    put("handscroll.png", encoded(painting(23, 1400, 140), "PNG"), Expected("accepted", size=(1400, 140)))
    # unreadable (chmod 000); as root every file stays readable, so there it is simply accepted
    put("unreadable.png", encoded(painting(24), "PNG"), Expected("accepted"))
    (folder / "unreadable.png").chmod(0)
    if not os.access(folder / "unreadable.png", os.R_OK):
        expected["unreadable.png"] = Expected("rejected", "unreadable")
    # links: two pointing at each other, one to nothing, and a folder link back up the tree
    os.symlink("loop_b.png", folder / "loop_a.png")
    os.symlink("loop_a.png", folder / "loop_b.png")
    expected["loop_a.png"] = expected["loop_b.png"] = Expected("rejected", "symlink_loop")
    os.symlink("no_such_scan.png", folder / "broken_link.png")
    expected["broken_link.png"] = Expected("rejected", "broken_link")
    os.symlink("..", folder / "山水 卷轴" / "up")
    expected["山水 卷轴/up"] = Expected("rejected", "symlink_loop")
    # folder litter from a file manager
    put(".DS_Store", b"\0\0\0\1Bud1" + bytes(64), Expected("rejected", "not_an_image"))
    # sidecars in other encodings, with control and direction characters
    for index, (name, (data, _)) in enumerate(sorted(SIDECARS.items()), start=25):
        put(name, encoded(painting(index), "PNG"), Expected("accepted", size=(240, 320)))
        (folder / name).with_suffix(".txt").write_bytes(data)
