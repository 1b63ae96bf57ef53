"""Files the stages share: JSON lines, atomic writes and staged output folders, thumbnail sheets."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a broken line is an error naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """An empty sibling folder to write a stage's outputs into; it replaces `final` whole only
    when the block succeeds, so a killed or failed run never leaves half-written outputs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    staging.chmod(0o755)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        retired = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(final)


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    tmp.replace(path)


def thumbnail_sheet(items: list[tuple[str, Image.Image]], long_side: int, columns: int = 4) -> Image.Image:
    """Thumbnails on a grid, each labelled underneath: a picture to look at instead of a listing."""
    font = ImageFont.load_default(size=max(10, long_side // 16))
    label_height = max(14, long_side // 10)
    columns = max(1, min(columns, len(items)))
    rows = max(1, -(-len(items) // columns))
    sheet = Image.new(
        "RGB", (columns * (long_side + 8) + 8, rows * (long_side + label_height + 8) + 8), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for index, (label, image) in enumerate(items):
        thumb = image.convert("RGB")
        thumb.thumbnail((long_side, long_side), Image.Resampling.BOX)
        left = 8 + (index % columns) * (long_side + 8)
        top = 8 + (index // columns) * (long_side + label_height + 8)
        sheet.paste(thumb, (left + (long_side - thumb.width) // 2, top + (long_side - thumb.height) // 2))
        draw.text((left, top + long_side + 2), label, fill="black", font=font)
    return sheet
