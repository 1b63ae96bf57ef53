"""Stage `caption`: one caption per crop, from the captioner chosen by `caption.backend`.

- `template` (offline default): the trigger phrase, then content, palette, tone and composition
  words measured on the crop (artmaster.caption_words), then the scan's sidecar text. Deterministic.
- `vlm`: a local transformers image-text-to-text model (AutoProcessor +
  AutoModelForImageTextToText), greedy decoding; the trigger phrase is prepended.

A user-edited overrides file (`caption.overrides_file`, crop_id -> caption) wins over both.
Writes data/caption/captions.jsonl (crop_id, caption, source), summary.json, caption_sheet.png.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from artmaster.config import ConfigError, Settings, hydra_entry, project_root, stage_dir
from artmaster.files import read_jsonl, staged_dir, write_jsonl
from artmaster.caption_words import describe
from artmaster.tracking import Tracker, log_summary, stage_run
from artmaster.vlm import VlmSettings, load_image_text_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SheetSettings(Settings):
    max_crops: int
    columns: int
    tile: int
    text_lines: int
    font_size: int


@dataclass(frozen=True)
class VlmCaptionSettings(VlmSettings):
    prompt: str
    max_new_tokens: int


@dataclass(frozen=True)
class CaptionSettings(Settings):
    """The `caption` section but its `template`, which caption_words.describe reads as written
    (base's generic corpus is captioned with it too)."""

    backend: str
    trigger: str
    separator: str
    include_sidecar: bool
    sidecar_max_chars: int
    overrides_file: str | None
    sheet: SheetSettings
    vlm: VlmCaptionSettings | None = None  # the vlm backend's model


@dataclass(frozen=True)
class CaptionContext:
    crop_id: str
    scan_id: str
    sidecar_text: str = ""


class Captioner(Protocol):
    source: str  # recorded in captions.jsonl: template | vlm

    def caption(self, image: Image.Image, context: CaptionContext) -> str: ...


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def finish_caption(settings: CaptionSettings, body: list[str], context: CaptionContext) -> str:
    """Trigger phrase + body phrases (+ sidecar text), joined by the configured separator."""
    parts = [settings.trigger, *body]
    if settings.include_sidecar and context.sidecar_text:
        parts.append(_one_line(context.sidecar_text)[: settings.sidecar_max_chars].strip())
    return settings.separator.join(_one_line(part) for part in parts if part and part.strip())


# --- template ----------------------------------------------------------------------------------


class TemplateCaptioner:
    source = "template"

    def __init__(self, settings: CaptionSettings, template: DictConfig):
        self.settings = settings
        self.template = template

    def caption(self, image: Image.Image, context: CaptionContext) -> str:
        return finish_caption(self.settings, describe(image, self.template), context)


# --- vlm ---------------------------------------------------------------------------------------


class VLMCaptioner:
    """A local image-text-to-text model; its answer becomes the caption body."""

    source = "vlm"

    def __init__(self, settings: CaptionSettings):
        self.processor, self.model, self.device = load_image_text_model(
            settings.vlm, "caption.vlm", "an image-text-to-text model (e.g. Qwen2-VL-2B-Instruct)"
        )
        self.settings = settings

    def _prompt_text(self) -> str:
        prompt = self.settings.vlm.prompt
        if getattr(self.processor, "chat_template", None) is None:
            return prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def caption(self, image: Image.Image, context: CaptionContext) -> str:
        import torch

        inputs = self.processor(images=[image.convert("RGB")], text=[self._prompt_text()], return_tensors="pt")
        # floating inputs (pixel values) in the model's dtype, token ids untouched
        inputs = inputs.to(self.device).to(self.model.dtype)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=self.settings.vlm.max_new_tokens, do_sample=False
            )
        if not self.model.config.is_encoder_decoder:
            output = output[:, inputs["input_ids"].shape[1] :]
        answer = self.processor.batch_decode(output, skip_special_tokens=True)[0]
        return finish_caption(self.settings, [answer], context)


def make_captioner(settings: CaptionSettings, template: DictConfig) -> Captioner:
    """The `caption.backend` captioner (`template`: the section the template backend describes with)."""
    if settings.backend == "template":
        return TemplateCaptioner(settings, template)
    if settings.backend == "vlm":
        return VLMCaptioner(settings)
    raise ValueError(f"caption.backend={settings.backend!r}: choose one of template, vlm")


# --- overrides ---------------------------------------------------------------------------------


def overrides_path(settings: CaptionSettings) -> Path | None:
    if not settings.overrides_file:
        return None
    path = Path(settings.overrides_file)
    return path if path.is_absolute() else project_root() / path


class OverridesError(ConfigError):
    """The caption overrides file cannot be used (one line naming the file and the problem)."""


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
    log.warning("caption: %s", message)


def load_overrides(path: Path | None) -> dict[str, str]:
    """crop_id -> caption from a user-edited YAML mapping; a missing file means none (said once),
    a file outside the project is read with a warning, and a file that is not a mapping of
    non-empty strings (bad YAML, a python tag, a number) is an OverridesError naming it."""
    if path is None:
        return {}
    if not path.exists():
        _warn(f"caption.overrides_file {path} does not exist: no caption overrides are applied")
        return {}
    if not path.resolve().is_relative_to(project_root().resolve()):
        _warn(f"caption.overrides_file {path} is outside the project ({project_root()}); reading it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:  # safe_load refuses python tags: a ConstructorError
        place = getattr(error, "problem_mark", None)
        where = f"{path}:{place.line + 1}" if place is not None else str(path)
        what = " ".join(str(getattr(error, "problem", None) or error).split())
        raise OverridesError(f"{where}: not valid caption overrides YAML ({what}); fix or empty the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OverridesError(f"{path}: expected a mapping of crop_id: caption, got {type(data).__name__}")
    overrides = {}
    for crop_id, text in data.items():
        if not isinstance(text, str) or not text.strip():
            raise OverridesError(f"{path}: the override for {crop_id!r} must be a non-empty string, "
                                 f"got {type(text).__name__} {text!r}"[:300])
        overrides[str(crop_id)] = _one_line(text)
    return overrides


# --- picture -----------------------------------------------------------------------------------


def draw_caption_sheet(items: list[tuple[Image.Image, str, str]], sheet: SheetSettings) -> Image.Image:
    """Crops (fitted into tile x tile) with their source and wrapped caption underneath."""
    items = items[: sheet.max_crops]
    columns = max(1, min(sheet.columns, len(items)))
    rows = max(1, math.ceil(len(items) / columns))
    font = ImageFont.load_default(size=sheet.font_size)
    line_height = sheet.font_size + 3
    text_height = (sheet.text_lines + 1) * line_height + 4
    canvas = Image.new("RGB", (columns * sheet.tile, rows * (sheet.tile + text_height)), "white")
    draw = ImageDraw.Draw(canvas)
    wrap_chars = max(10, int(sheet.tile / (0.55 * sheet.font_size)))
    for index, (image, source, text) in enumerate(items):
        x = (index % columns) * sheet.tile
        y = (index // columns) * (sheet.tile + text_height)
        thumb = image.copy()
        thumb.thumbnail((sheet.tile, sheet.tile), Image.Resampling.LANCZOS)
        canvas.paste(thumb, (x + (sheet.tile - thumb.width) // 2, y + (sheet.tile - thumb.height) // 2))
        lines = textwrap.wrap(text, wrap_chars, max_lines=sheet.text_lines, placeholder=" ...")
        draw.text((x + 4, y + sheet.tile + 2), f"[{source}]", fill="#888888", font=font)
        for number, line in enumerate(lines, start=1):
            draw.text((x + 4, y + sheet.tile + 2 + number * line_height), line, fill="black", font=font)
    return canvas


# --- stage -------------------------------------------------------------------------------------


def sidecar_texts(cfg: DictConfig) -> dict[str, str]:
    """scan id -> sidecar text from the ingest manifest (empty when there is no manifest)."""
    manifest = stage_dir(cfg, "ingest") / "manifest.jsonl"
    if not manifest.is_file():
        log.warning("caption: %s not found; captions get no sidecar text", manifest)
        return {}
    return {
        str(row["id"]): row.get("sidecar_text") or ""
        for row in read_jsonl(manifest)
        if row.get("status") == "accepted"
    }


def caption_crops(crops: list[dict], crop_dir: Path, captioner: Captioner | None, overrides: dict[str, str],
                  sidecars: dict[str, str], sheet_crops: int) -> tuple[list[dict], list[dict], list[tuple]]:
    """(captions.jsonl rows, unreadable crops, the first `sheet_crops` (image, source, caption) for
    the sheet): each crop's override if it has one, else the captioner's caption."""
    rows, failed, sheet_items = [], [], []
    for crop in tqdm(crops, desc="caption", unit="crop"):
        crop_id = str(crop["crop_id"])
        path = crop_dir / crop["path"]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            log.error("caption: skipping %s: %s", path, error)
            # paths as data/crop's manifest gives them: no output depends on where the workspace is
            failed.append({"crop_id": crop_id, "path": str(crop["path"]),
                           "error": str(error).replace(str(path), str(crop["path"]))})
            continue
        if crop_id in overrides:
            text, source = overrides[crop_id], "override"
        else:
            context = CaptionContext(crop_id, str(crop["scan_id"]), sidecars.get(str(crop["scan_id"]), ""))
            text, source = captioner.caption(image, context), captioner.source
        rows.append({"crop_id": crop_id, "caption": text, "source": source})
        if len(sheet_items) < sheet_crops:
            sheet_items.append((image, source, text))
    return rows, failed, sheet_items


def _log(tracker: Tracker, rows: list[dict], summary: dict, staging: Path) -> None:
    log_summary(
        {"captions": len(rows)},
        details={
            "failed_crops": len(summary["failed"]),
            "unknown_override_ids": len(summary["unknown_override_ids"]),
            **{f"captions from {source}": count for source, count in summary["by_source"].items()},
        },
    )
    tracker.log_table(
        data={
            "crop_id": [r["crop_id"] for r in rows],
            "source": [r["source"] for r in rows],
            "caption": [r["caption"] for r in rows],
        },
        artifact_file="captions_table.json",
    )
    tracker.log_picture(staging / "caption_sheet.png")
    tracker.log_artifact(staging / "summary.json")


def run(cfg: DictConfig) -> dict:
    """Caption every crop of data/crop with `caption.backend`; the overrides file wins."""
    settings = CaptionSettings.from_config(cfg.caption)
    crop_dir = stage_dir(cfg, "crop")
    crops = read_jsonl(crop_dir / "crops.jsonl", within={"path": crop_dir})  # no path out of data/crop
    if not crops:
        raise ValueError(f"{crop_dir / 'crops.jsonl'}: no crops to caption")
    sidecars = sidecar_texts(cfg)
    overrides_file = overrides_path(settings)
    overrides = load_overrides(overrides_file)
    unknown = sorted(set(overrides) - {str(row["crop_id"]) for row in crops})
    for crop_id in unknown:
        _warn(f"{overrides_file}: override for unknown crop id {crop_id!r} (no such crop; ignored)")

    out_dir = stage_dir(cfg, "caption")
    with stage_run(cfg, "caption", sections=("caption",)) as tracker, staged_dir(out_dir) as staging:
        # only load a model when some crop still needs a generated caption
        needs_model = any(str(row["crop_id"]) not in overrides for row in crops)
        captioner = make_captioner(settings, cfg.caption.template) if needs_model else None
        rows, failed, sheet_items = caption_crops(crops, crop_dir, captioner, overrides, sidecars,
                                                  settings.sheet.max_crops)
        if not rows:
            raise RuntimeError(f"caption: no crop could be read ({'; '.join(f['path'] for f in failed)})")

        write_jsonl(staging / "captions.jsonl", rows)
        by_source = {source: sum(r["source"] == source for r in rows) for source in ("template", "vlm", "override")}
        summary = {
            "captions": len(rows),
            "by_source": by_source,
            "backend": settings.backend,
            "overrides_file": settings.overrides_file or None,  # as configured, never made absolute
            "unknown_override_ids": unknown,
            "failed": failed,
        }
        (staging / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        draw_caption_sheet(sheet_items, settings.sheet).save(staging / "caption_sheet.png")

        _log(tracker, rows, summary, staging)

    print(
        f"caption: {len(rows)} crops captioned ("
        + ", ".join(f"{source}: {count}" for source, count in by_source.items())
        + ")"
        + (f"; {len(unknown)} unknown override ids in {overrides_file}" if unknown else "")
        + (f"; {len(failed)} unreadable" if failed else "")
    )
    return {"out_dir": str(out_dir), **summary}


# only the vlm backend runs torch; the template captioner is numpy and pillow
main = hydra_entry(run, uses_torch=lambda cfg: cfg.caption.backend != "template")
