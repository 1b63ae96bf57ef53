"""Integrity of the training checkpoints: sealed when written, verified before a resume.

A checkpoint folder (`step-XXXXXX`) is staged, then renamed into place. Its `meta.json`, written
last, records the sha256 of every other file; everything is flushed to the disk before the rename
(a power cut could otherwise leave a renamed folder of empty or torn files), and the rename itself
after. Resuming verifies those hashes and falls back to the newest intact checkpoint, printing
which ones it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from artmaster.config import ConfigError
from artmaster.files import fsync_tree

META = "meta.json"


class CheckpointDamaged(ConfigError):
    """The checkpoint named by `train.resume=<folder>` fails its verification (one line)."""


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def seal(staging: Path, meta: dict) -> None:
    """Finish a checkpoint being staged: meta.json with the sha256 of every file written so far,
    then everything flushed to the disk (before the caller renames the folder into place)."""
    files = {path.relative_to(staging).as_posix(): file_sha256(path)
             for path in sorted(staging.rglob("*")) if path.is_file()}
    (staging / META).write_text(json.dumps({**meta, "files": files}, indent=2), encoding="utf-8")
    fsync_tree(staging)


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json; ValueError naming the file when it cannot be read."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path / META} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path / META} is not a JSON object")
    return meta


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (naming the file), or None when every file
    it recorded is there with its recorded sha256."""
    try:
        meta = read_meta(path)
    except ValueError as error:
        return str(error)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return f"{path / META} records no file hashes (written before checkpoints were sealed)"
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file_sha256(file) != expected:
            return f"{file} does not match the sha256 recorded when it was written (damaged on disk)"
    return None


def verified(path: Path, setting: str) -> Path:
    """`path` (given as `train.resume=<setting>`) when intact; CheckpointDamaged naming the problem."""
    trouble = problem(path)
    if trouble is not None:
        raise CheckpointDamaged(f"train.resume={setting}: {trouble}; resume from another checkpoint or "
                                "set train.resume=auto")
    return path


def newest_intact(candidates: list[Path], fingerprint: str) -> Path | None:
    """The newest of `candidates` (oldest first) written for `fingerprint` whose files verify;
    each damaged one is skipped with a line saying which and why."""
    for path in reversed(candidates):
        try:
            if read_meta(path).get("fingerprint") != fingerprint:
                continue  # another recipe: never resumable, removed by the caller
        except ValueError:
            pass  # unreadable meta.json: reported as damaged below
        trouble = problem(path)
        if trouble is None:
            return path
        print(f"train: skipping checkpoint {path.name}: {trouble}")
    return None
