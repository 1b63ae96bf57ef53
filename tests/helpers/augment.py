"""The augment stage's test fixture data: painted crops with captions, a tiny base pipeline and a
LoRA (what the stages before augment leave), and a short augment config."""

from __future__ import annotations

import json
from pathlib import Path

from artmaster.painter import STYLES, paint

from helpers.tiny_upstream import write_base_and_lora

CROPS = 5
FAST = (
    "augment.count=3",
    "augment.generation.image_scale=0.125",  # 512 px bucket -> 64 px
    "augment.generation.steps=3",
    "critic.min_deviation=0.0",              # the random model deviates everywhere: always edit
)


def write_upstream(data: Path) -> Path:
    """data/ as the stages before augment leave it: crops, captions, base pipeline, LoRA."""
    rows, captions = [], []
    for i in range(CROPS):
        crop_id = f"s{i}-512x512-00"
        path = data / "crop" / "512x512" / f"{crop_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        paint(STYLES["zeng_xiaohu"], 128, 128, seed=i).save(path)
        rows.append({"crop_id": crop_id, "scan_id": f"s{i}", "path": f"512x512/{crop_id}.png", "width": 512, "height": 512})
        captions.append({"crop_id": crop_id, "caption": "zxh style, ink-wash mountains, mist, emerald dotted trees", "source": "template"})
    (data / "crop" / "crops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "caption").mkdir()
    (data / "caption" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    write_base_and_lora(data)
    return data
