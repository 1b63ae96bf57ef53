"""Generation split across processes: a stage (`evaluate` or `augment`) run with one process and
with N (`accelerate launch --num_processes N`), on the same inputs. Prints wall time, images per
second over the whole run, and how far the N-process scores are from the one-process scores (an
image depends only on its prompt and seed, so they agree up to float rounding of batch shapes);
writes JSON.

Needs the stage's inputs in --data-dir (as `dvc repro` leaves data/). Hydra overrides follow `--`:

    python benchmarks/processes.py --stage evaluate --processes 2 --data-dir data --json p.json -- model.device=cuda tracking.enabled=false
    python benchmarks/processes.py --stage augment --processes 2 --data-dir data -- augment.round=0 tracking.enabled=false
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from artmaster.processes import launch_command


def stage_output(stage: str, data_dir: Path) -> Path:
    return data_dir / "evaluate" if stage == "evaluate" else data_dir / "augment" / "round_0"


def scores(stage: str, output: Path) -> dict[str, float]:
    """Every image's style score, keyed by image."""
    if stage == "evaluate":
        with (output / "scores.csv").open() as rows:
            return {row["image"]: float(row["style_score"]) for row in csv.DictReader(rows)}
    found = {}
    for line in (output / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        found[f"{record['sample_id']}-original"] = record["style_before"]
        if record["style_after"] is not None:
            found[f"{record['sample_id']}-refined"] = record["style_after"]
    return found


def run_stage(stage: str, processes: int, data_dir: Path, overrides: list[str]) -> dict:
    module = f"artmaster.{stage}"
    start = launch_command(module, processes) if processes > 1 else [sys.executable, "-m", module]
    command = [*start, f"paths.data_dir={data_dir}", *overrides]
    output = stage_output(stage, data_dir)
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    wall = time.perf_counter() - started
    found = scores(stage, output)
    kept = output.with_name(f"{output.name}.{processes}proc")
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(output, kept)
    return {"processes": processes, "wall_s": round(wall, 2), "images": len(found),
            "images_per_s": round(len(found) / wall, 3), "scores": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("evaluate", "augment"), default="evaluate")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the stage (after --)")
    args = parser.parse_args()

    import torch

    runs = [run_stage(args.stage, count, args.data_dir.resolve(), args.overrides) for count in (1, args.processes)]
    one, split = runs
    if one["scores"].keys() != split["scores"].keys():
        raise SystemExit(f"the runs scored different images: {sorted(one['scores'].keys() ^ split['scores'].keys())}")
    difference = max(abs(one["scores"][k] - split["scores"][k]) for k in one["scores"])
    device = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
              else f"CPU, {os.cpu_count()} cores")
    print(f"\n{args.stage} on {device}, overrides {' '.join(args.overrides)}")
    print("| processes | images | wall (s, incl. start-up) | images/s | speed-up |")
    print("|---|---|---|---|---|")
    for entry in runs:
        print(f"| {entry['processes']} | {entry['images']} | {entry['wall_s']} | {entry['images_per_s']} | "
              f"{one['wall_s'] / entry['wall_s']:.2f}x |")
    print(f"largest style-score difference between the runs: {difference:.2e}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "stage": args.stage, "device": device,
            "overrides": args.overrides, "max_score_difference": difference,
            "runs": [{k: v for k, v in entry.items() if k != "scores"} for entry in runs],
        }, indent=2))


if __name__ == "__main__":
    main()
