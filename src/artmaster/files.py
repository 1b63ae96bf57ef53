"""Files the stages share: JSON lines, atomic writes and staged output folders, thumbnail sheets."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image, ImageDraw, ImageFont


class UnsafePath(ValueError):
    """A path read from a manifest, caption or overrides file that would leave its folder."""


def inside(root: Path, relative: str | os.PathLike, where: str = "") -> Path:
    """`root / relative`, refused (UnsafePath naming `where`, e.g. "crops.jsonl:3") unless
    `relative` stays inside `root`: relative, not empty, no `..` part, no drive, no NUL byte.

    The check is on the text, not on resolved links, so a folder DVC checks out as symlinks or
    hardlinks into its cache still passes, while `../../etc/passwd` or `/etc/passwd` never does.
    """
    text = os.fspath(relative)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    posix = PurePosixPath(text.replace("\\", "/"))
    if (
        not text.strip()
        or "\0" in text
        or posix.is_absolute()
        or PureWindowsPath(text).drive
        or ".." in posix.parts
        or posix.parts in ((), (".",))
    ):
        prefix = f"{where}: " if where else ""
        raise UnsafePath(
            f"{prefix}path {text!r} is not a relative path inside {root} (absolute, empty or with '..'); refused"
        )
    return Path(root) / posix


def read_jsonl(path: Path, within: Mapping[str, Path] | None = None) -> list[dict]:
    """Rows of a JSON-lines file; a broken line is an error naming the file and line.

    `within` maps a field to the folder its value is a path in (e.g. {"path": crop_dir}): a row
    whose value would leave that folder is an UnsafePath error naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        for key, root in (within or {}).items():
            if isinstance(row, dict) and row.get(key) is not None:
                inside(root, str(row[key]), where=f"{path}:{number}: field {key!r}")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """An empty sibling folder to write a stage's outputs into; it replaces `final` whole only
    when the block succeeds, so a killed or failed run never leaves half-written outputs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
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


@contextmanager
def replace_together(folder: Path, names: tuple[str, ...]) -> Iterator[Path]:
    """An empty folder to write the entries `names` of `folder` into (files or folders), for a
    stage whose folder also holds state that stays (caches, checkpoints). When the block succeeds
    they replace the previous ones together: all the old ones out first, then the new ones in,
    `names[-1]` (the file that says a run finished, e.g. metrics.json) last; when it fails the old
    ones stay whole. A kill inside the swap (a few renames) leaves some missing, never a mix."""
    anchor = folder / "outputs"  # the staging and retired folders are named after it
    remove_abandoned(anchor)
    staging = Path(tempfile.mkdtemp(prefix=f".{anchor.name}.tmp-{os.getpid()}-", dir=folder))
    try:
        yield staging
        absent = [name for name in names if not (staging / name).exists()]
        if absent:
            raise FileNotFoundError(f"{staging}: {', '.join(absent)} not written")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = folder / f".{anchor.name}.old-{os.getpid()}"
    retired.mkdir(exist_ok=True)
    for name in names:
        if (folder / name).exists() or (folder / name).is_symlink():
            (folder / name).rename(retired / name)
    for name in names:
        (staging / name).rename(folder / name)
    shutil.rmtree(retired, ignore_errors=True)
    staging.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_abandoned(final: Path) -> list[Path]:
    """Delete the staging and retired folders that a killed run (SIGKILL, power loss) left next
    to `final` (`.<name>.tmp-<pid>-*`, `.<name>.old-<pid>`), when that process is gone. They were
    never `final` itself, so nothing DVC tracks is touched; a live run's folders are left alone."""
    removed = []
    for path in final.parent.glob(f".{final.name}.*-*"):
        kind, _, rest = path.name[len(final.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to the disk: after a power cut
    a renamed-into-place folder then holds what was written, not empty or torn files."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(path)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to the disk."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def remove_folder(folder: Path) -> None:
    """Delete a folder and everything in it; when it is a symbolic link or a mount point (a user
    putting checkpoints on another disk), only its contents go and the link or mount stays."""
    if not folder.is_symlink() and not os.path.ismount(folder):
        shutil.rmtree(folder)
        return
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def sort_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file with its header's keys sorted. safetensors writes the metadata in
    hash-map order, which changes from run to run: the same tensors and metadata would otherwise
    give different bytes, and DVC would see a new output (and re-run what follows) every time."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        body = handle.read()
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + body)


@contextmanager
def atomic_path(path: Path, per_process: bool = False) -> Iterator[Path]:
    """A temporary sibling of `path` for any writer to fill (bytes, PIL, safetensors, matplotlib).
    When the block succeeds the file is flushed to the disk and renamed onto `path`; when it fails
    the temporary is removed. `path` is the old file or the new one, never half of one.

    The temporary is `.<name>.tmp`: one a killed run left is overwritten and renamed away by the
    next write of the same file, so nothing stale stays in an output folder DVC persists.
    `per_process` names it `.<name>.<pid>.tmp`, for a file several processes may write at the
    same time (a cache shared by every run of the user)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if per_process else f".{path.name}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str, per_process: bool = False) -> None:
    """Write a file whole or not at all (`atomic_path`): a temporary sibling, flushed to disk, then renamed."""
    with atomic_path(path, per_process) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def save_image_atomic(image: Image.Image, path: Path) -> None:
    """A PNG written whole or not at all (`atomic_path`): a killed run never leaves a truncated picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


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


def image_grid(images: Sequence[Image.Image], columns: int, labels: Sequence[str] | None = None,
               label_height: int = 14, gap: int = 2) -> Image.Image:
    """Images in rows of `columns` (cells sized to the largest image), each with an optional label."""
    if not images:
        raise ValueError("image_grid: no images")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"image_grid: {len(images)} images but {len(labels)} labels")
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images) + (label_height if labels is not None else 0)
    grid = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        left, top = (index % columns) * (cell_w + gap), (index // columns) * (cell_h + gap)
        grid.paste(image.convert("RGB"), (left, top))
        if labels is not None:
            draw.text((left + 2, top + image.height + 1), labels[index], fill="black")
    return grid


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], column_labels: list[str], title: str = "",
                  label_width: int = 190) -> Image.Image:
    """Images in rows, each row's text (e.g. its prompt) wrapped on the left, a label over each
    column (e.g. its seed) and an optional title: a grid that says what each picture is."""
    import textwrap

    font = ImageFont.load_default(size=12)
    cell_w = max(image.width for _, images in rows for image in images)
    cell_h = max(image.height for _, images in rows for image in images)
    gap, line_h = 4, 15
    header_h = line_h * (2 if title else 1) + gap
    columns = max(len(images) for _, images in rows)
    width = label_width + columns * (cell_w + gap)
    grid = Image.new("RGB", (width, header_h + len(rows) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for column, label in enumerate(column_labels):
        draw.text((label_width + column * (cell_w + gap) + 2, header_h - line_h - 2), label, fill="black", font=font)
    wrap = max(8, (label_width - 8) // 7)  # about 7 px per character at this font size
    for row, (text, images) in enumerate(rows):
        top = header_h + row * (cell_h + gap)
        for line, words in enumerate(textwrap.wrap(text, wrap)[: max(1, cell_h // line_h)]):
            draw.text((4, top + 2 + line * line_h), words, fill="black", font=font)
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB"), (label_width + column * (cell_w + gap), top))
    return grid


def captioned(image: Image.Image, text: str, min_width: int = 256) -> Image.Image:
    """The image with `text` wrapped underneath (on a canvas at least `min_width` wide, so a small
    sample keeps a readable caption): a logged picture that says what it shows."""
    import textwrap

    font = ImageFont.load_default(size=11)
    width = max(image.width, min_width)
    lines = textwrap.wrap(text, max(12, (width - 4) // 6))
    out = Image.new("RGB", (width, image.height + 13 * len(lines) + 4), "white")
    out.paste(image.convert("RGB"), ((width - image.width) // 2, 0))
    draw = ImageDraw.Draw(out)
    for index, line in enumerate(lines):
        draw.text((2, image.height + 2 + 13 * index), line, fill="black", font=font)
    return out
