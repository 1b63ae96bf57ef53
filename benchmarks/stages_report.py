"""The per-stage table of benchmarks/stages_gpu.sh: wall time, exit code and peak GPU memory of
each stage, as the stage's metrics.json reports it (what its tensors held) and as nvidia-smi saw the
GPU while it ran (the allocator's reserve and the CUDA context too); for train and retrain also the
loop's pauses (validation and samples, checkpoints), so a stage's wall time splits into start-up,
steps, pauses and export.

    python benchmarks/stages_report.py WORK/times.tsv OUT WORK/smi.csv
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path


def stage_rows(times: Path) -> list[dict]:
    rows = []
    for line in times.read_text(encoding="utf-8").splitlines():
        stage, code, begin, end = line.split("\t")
        rows.append({"stage": stage, "rc": int(code), "begin": float(begin), "end": float(end)})
    return rows


def smi_samples(path: Path) -> list[tuple[float, float]]:
    """(unix time, MiB used) from `nvidia-smi --query-gpu=timestamp,memory.used,... --format=csv,noheader,nounits`."""
    samples = []
    if not path.is_file():
        return samples
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = [field.strip() for field in line.split(",")]
        try:
            stamp = datetime.datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").astimezone()
            samples.append((stamp.timestamp(), float(fields[1])))
        except (ValueError, IndexError):
            continue  # a line cut by the kill at the end
    return samples


def summarise(rows: list[dict], out: Path, samples: list[tuple[float, float]]) -> list[dict]:
    for row in rows:
        row["seconds"] = round(row["end"] - row["begin"], 1)
        metrics = out / f"{row['stage']}-metrics.json"
        values = json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else {}
        row["peak_gpu_memory_gb"] = values.get("peak_gpu_memory_gb")
        steady = values.get("steady_steps_per_second")
        row["steady_steps_per_second"] = round(steady, 2) if steady is not None else None
        for pause in ("evaluation_seconds", "checkpoint_seconds"):  # the training loop's (train, retrain)
            row[pause] = round(values[pause], 1) if pause in values else None
        seen = [mib for stamp, mib in samples if row["begin"] <= stamp <= row["end"]]
        row["nvidia_smi_peak_gb"] = round(max(seen) * 2**20 / 1e9, 1) if seen else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("times", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("smi", type=Path)
    args = parser.parse_args()
    rows = summarise(stage_rows(args.times), args.out, smi_samples(args.smi))
    print("| stage | rc | wall (s) | peak allocated (GB, metrics.json) | peak seen by nvidia-smi (GB) | steady steps/s "
          "| validation + samples (s) | checkpoints (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["stage"], row["rc"], row["seconds"], row["peak_gpu_memory_gb"], row["nvidia_smi_peak_gb"],
                 row["steady_steps_per_second"], row["evaluation_seconds"], row["checkpoint_seconds"]]
        print("| " + " | ".join("-" if cell is None else str(cell) for cell in cells) + " |")
    (args.out / "stages.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
