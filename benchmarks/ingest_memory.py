"""Peak memory of ingesting the largest scan `ingest` accepts, for each pixel mode PIL decodes into.

For each mode it writes one square file just under `data.ingest.max_image_pixels` (flat paper with
a gradient patch: the memory depends on the size and the mode, not on the picture), then ingests it
in a fresh process with `ingest.ingest_file`, as the stage does, and prints that process's peak RSS
while ingesting it (VmHWM, Linux), the rise over its RSS before the file (Python, numpy, PIL and the
config loaded) and the rise per decoded byte (`ingest.decoded_bytes`). The RGB JPEG row shows the
reduced decode (JPEG draft) that JPEGs get. Writes JSON.

    python benchmarks/ingest_memory.py                          # the largest accepted scans (~200 MP)
    python benchmarks/ingest_memory.py --megapixels 20 --modes 'I;16' RGB --json mem.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

# mode -> (file format, save options) of the test scan
SCANS = {
    "1": ("PNG", {"compress_level": 1}),
    "L": ("PNG", {"compress_level": 1}),
    "LA": ("PNG", {"compress_level": 1}),
    "P": ("PNG", {"compress_level": 1}),
    "RGB": ("PNG", {"compress_level": 1}),
    "RGBA": ("PNG", {"compress_level": 1}),
    "CMYK": ("TIFF", {"compression": "tiff_adobe_deflate"}),
    "I;16": ("PNG", {"compress_level": 1}),
    "I": ("TIFF", {"compression": "tiff_adobe_deflate"}),
    "RGB JPEG": ("JPEG", {"quality": 90}),
}


def write_scan(mode: str, side: int, folder: Path) -> Path:
    """A side x side scan in `mode` (mode "RGB JPEG": an RGB JPEG)."""
    pil_mode = mode.split()[0]
    fmt, options = SCANS[mode]
    image = Image.new(pil_mode, (side, side), {"I;16": 40000, "I": 40000, "1": 1}.get(pil_mode, 200))
    patch = Image.linear_gradient("L").resize((min(side, 1024),) * 2)
    image.paste(patch.convert(pil_mode) if pil_mode != "I;16" else patch.convert("I").convert("I;16"), (0, 0))
    path = folder / f"scan_{mode.replace(';', '').replace(' ', '_')}.{fmt.lower()}"
    image.save(path, fmt, **options)
    return path


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the process started or `reset_peak`) of this process (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux 4.0+; ru_maxrss cannot be reset, and after a
    fork it already counts the parent's memory)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(path: Path) -> None:
    """Ingest one file in this (fresh) process; print one JSON line."""
    from artmaster.config import compose
    from artmaster.ingest import Deduplicator, decompression_guard, ingest_file

    settings = compose().data.ingest
    before = memory_mib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as images, decompression_guard(settings.max_image_pixels):
        row, _ = ingest_file(path, path.name, None, settings, Deduplicator(0), Path(images), path.parent)
    print(json.dumps({"baseline_mb": before, "peak_mb": memory_mib("VmHWM"),
                      "seconds": time.perf_counter() - started, "status": row["status"],
                      "reason": row["reason"], "mode": row["mode"], "size": row["declared_size"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=None,
                        help="scan size (default: just under data.ingest.max_image_pixels)")
    parser.add_argument("--modes", nargs="+", default=list(SCANS), choices=list(SCANS))
    parser.add_argument("--json", default="ingest_memory.json", help="where to write the result")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    from artmaster.config import compose
    from artmaster.ingest import decoded_bytes

    pixels = args.megapixels * 1e6 if args.megapixels else compose().data.ingest.max_image_pixels
    side = math.isqrt(int(pixels))
    rows = []
    print(f"{side}x{side} scans ({side * side / 1e6:.1f} MP), one fresh process each")
    print(f"{'mode':<9} {'file MiB':>8} {'decoded MiB':>11} {'peak RSS MiB':>12} {'rise MiB':>8} "
          f"{'rise/decoded':>12} {'s':>6}  outcome")
    with tempfile.TemporaryDirectory() as folder:
        for mode in args.modes:
            path = write_scan(mode, side, Path(folder))
            done = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{mode}: the ingest process failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            decoded = decoded_bytes(mode.split()[0], (side, side)) / 2**20
            rise = result["peak_mb"] - result["baseline_mb"]
            row = {"mode": mode, "pil_mode": result["mode"], "side": side, "file_mb": path.stat().st_size / 2**20,
                   "decoded_mb": decoded, "rise_per_decoded_byte": rise / decoded, "rise_mb": rise, **result}
            rows.append(row)
            print(f"{mode:<9} {row['file_mb']:>8.1f} {decoded:>11.0f} {result['peak_mb']:>12.0f} {rise:>8.0f} "
                  f"{rise / decoded:>12.2f} {result['seconds']:>6.1f}  {result['status']} {result['reason']}")
            path.unlink()
    Path(args.json).write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                                           "pillow": Image.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
