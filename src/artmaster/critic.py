"""Critics for ArtAug: which regions of a generated image drift from the painter, and what to paint
there instead.

One interface, `critique(image, prompt) -> list[Edit]`, each Edit a box in image pixels, a local
prompt for the refiner and a reason. Config group `critic` (conf/critic/*.yaml), by `critic.name`:
- `style` (offline default): the image is cut into grid cells at a few scales; each cell's style
  features (artmaster.metrics, the features `artmaster score` uses) are compared with the painter's
  reference tiles, and up to `max_edits` cells that deviate most become edits. The local prompt
  names what the deviating feature block should look like (palette, ink texture, tonal range,
  brushwork) plus the most frequent words of the painter's captions.
- `vlm`: a local image-understanding model (transformers AutoProcessor +
  AutoModelForImageTextToText, Qwen2-VL-style grounding) asked, with a description of the
  painter's style, to mark regions to repaint. `parse_edits` reads its answer in either grounding
  format (`critic.box_format`): Qwen2-VL's `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` in 0-1000
  normalised coordinates, or Qwen2.5-VL's JSON `bbox_2d` in pixels of the image it was shown.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from omegaconf import DictConfig
from PIL import Image

from artmaster.config import Settings
from artmaster.imagestats import box_iou
from artmaster.metrics import StyleFeatureExtractor, StyleModel
from artmaster.vlm import VlmSettings, load_image_text_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Edit:
    """A region to repaint: box = (x1, y1, x2, y2) in the image's pixels."""

    box: tuple[int, int, int, int]
    local_prompt: str
    reason: str

    def as_dict(self) -> dict:
        return {**asdict(self), "box": list(self.box)}


class Critic(Protocol):
    def critique(self, image: Image.Image, prompt: str) -> list[Edit]: ...


# --- style critic ------------------------------------------------------------------------------


def caption_vocabulary(captions: Iterable[str], count: int, ignore: Iterable[str]) -> list[str]:
    """The `count` most frequent words of the captions (ties alphabetical), without `ignore`."""
    ignored = {str(word).lower() for word in ignore}
    words = Counter(
        word for caption in captions for word in re.findall(r"[a-z][a-z'-]*", caption.lower()) if word not in ignored
    )
    return [word for word, _ in sorted(words.items(), key=lambda item: (-item[1], item[0]))[:count]]


def grid_boxes(size: tuple[int, int], grids: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Cells of an n x n grid over the image for each n in `grids`, in pixels."""
    width, height = size
    boxes = []
    for cells in grids:
        xs = [round(width * i / cells) for i in range(cells + 1)]
        ys = [round(height * i / cells) for i in range(cells + 1)]
        boxes += [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(cells) for c in range(cells)]
    return boxes


@dataclass(frozen=True)
class StyleCriticSettings(Settings):
    trigger: str
    grids: tuple[int, ...]
    max_edits: int
    min_deviation: float
    max_overlap: float
    local_prompt: str
    vocabulary_words: int
    phrases: dict[str, str]  # feature block -> what its local prompt says
    stopwords: tuple[str, ...]


class StyleCritic:
    """Marks the grid cells whose style statistics deviate most from the painter's works."""

    def __init__(self, settings: StyleCriticSettings, extractor: StyleFeatureExtractor, model: StyleModel,
                 captions: Sequence[str]):
        self.settings = settings
        self.extractor = extractor
        self.model = model
        self.phrases = settings.phrases
        missing = set(model.reference.tile_blocks) - set(self.phrases)
        if missing:
            raise ValueError(f"critic.phrases has no phrase for feature block(s) {sorted(missing)}")
        ignore = [*settings.stopwords, *settings.trigger.split()]
        self.vocabulary = caption_vocabulary(captions, settings.vocabulary_words, ignore)
        if any(cells < 1 for cells in settings.grids):
            raise ValueError(f"critic.grids must be positive cell counts, got {list(settings.grids)}")

    def local_prompt(self, block: str) -> str:
        phrase = self.phrases[block]
        words = [word for word in self.vocabulary if word not in phrase.split()]
        return self.settings.local_prompt.format(
            trigger=self.settings.trigger, phrase=phrase, vocabulary=" ".join(words)
        ).strip(" ,")

    def critique(self, image: Image.Image, prompt: str) -> list[Edit]:
        settings = self.settings
        scored = []
        for box in grid_boxes(image.size, settings.grids):
            region = self.model.score_region(self.extractor.region_features(image, box))
            scored.append((-region.style_score, box, region))
        scored.sort(key=lambda item: -item[0])
        edits: list[Edit] = []
        chosen: list[tuple[int, int, int, int]] = []
        for deviation, box, region in scored:
            if len(edits) >= settings.max_edits or deviation < settings.min_deviation:
                break
            if any(box_iou(box, other) > settings.max_overlap for other in chosen):
                continue
            block = region.worst_block
            chosen.append(box)
            edits.append(
                Edit(
                    box=box,
                    local_prompt=self.local_prompt(block),
                    reason=(
                        f"{block} deviates most ({region.deviation[block]:.2f}x the painter's typical "
                        f"distance); region distance {deviation:.2f}x typical"
                    ),
                )
            )
        return edits


# --- box parsing (vlm critic) ------------------------------------------------------------------

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_QWEN2VL_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>\s*)?"
    rf"<\|box_start\|>\s*\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*<\|box_end\|>",
    re.DOTALL,
)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
BOX_FORMATS = ("qwen2vl", "qwen25vl")


@dataclass(frozen=True)
class BoxLimits:
    """Which parsed boxes are usable: area as a fraction of the image."""

    min_area: float
    max_area: float
    max_edits: int


def _qwen2vl_items(text: str) -> list[tuple[list[float], str, str]]:
    items = []
    for match in _QWEN2VL_BOX.finditer(text):
        coords = [float(match.group(i)) for i in range(2, 6)]
        items.append((coords, (match.group("label") or "").strip(), ""))
    return items


def _json_objects(text: str) -> list[dict]:
    body = re.sub(r"```(?:json)?", "", text).strip()
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return [parsed]
    if isinstance(parsed, list):
        return [item for item in parsed if isinstance(item, dict)]
    # Truncated or chatty answers: read each flat {...} on its own.
    objects = []
    for candidate in _JSON_OBJECT.findall(body):
        try:
            objects.append(json.loads(candidate))
        except json.JSONDecodeError:
            log.info("critic: unreadable JSON object in the answer: %s", candidate[:200])
    return objects


def _qwen25vl_items(text: str, label_keys: Sequence[str]) -> list[tuple[list[float], str, str]]:
    items = []
    for obj in _json_objects(text):
        bbox = obj.get("bbox_2d")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            log.info("critic: no usable bbox_2d in %s", json.dumps(obj)[:200])
            continue
        label = next((str(obj[key]).strip() for key in label_keys if str(obj.get(key) or "").strip()), "")
        items.append(([float(v) for v in bbox], label, str(obj.get("reason") or "").strip()))
    return items


def parse_edits(
    text: str, box_format: str, image_size: tuple[int, int], coordinate_size: tuple[float, float],
    limits: BoxLimits, label_keys: Sequence[str] = ("prompt", "label"), local_prompt: str = "{label}",
) -> list[Edit]:
    """Edits from a grounding model's answer.

    `coordinate_size` = (width, height) of the space the boxes are written in: (1000, 1000) for
    Qwen2-VL's normalised boxes, the processed input size for Qwen2.5-VL's pixel boxes. Boxes are
    scaled to `image_size` and clamped to it; degenerate ones (no area), ones without a label, tiny
    ones (area fraction < min_area) and nearly-whole-image ones (> max_area) are dropped."""
    if box_format == "qwen2vl":
        items = _qwen2vl_items(text)
    elif box_format == "qwen25vl":
        items = _qwen25vl_items(text, label_keys)
    else:
        raise ValueError(f"critic.box_format={box_format!r} is not one of {', '.join(BOX_FORMATS)}")
    width, height = image_size
    scale_x, scale_y = width / coordinate_size[0], height / coordinate_size[1]
    edits = []
    for (x1, y1, x2, y2), label, reason in items:
        box = (
            round(min(max(x1 * scale_x, 0), width)), round(min(max(y1 * scale_y, 0), height)),
            round(min(max(x2 * scale_x, 0), width)), round(min(max(y2 * scale_y, 0), height)),
        )
        area = max(0, box[2] - box[0]) * max(0, box[3] - box[1]) / (width * height)
        why_not = (
            "degenerate" if box[2] <= box[0] or box[3] <= box[1]
            else "no local prompt" if not label
            else f"tiny ({area:.3f} of the image)" if area < limits.min_area
            else f"nearly the whole image ({area:.3f})" if area > limits.max_area
            else ""
        )
        if why_not:
            log.info("critic: dropped box %s (%s): %s", [x1, y1, x2, y2], label[:60], why_not)
            continue
        edits.append(
            Edit(box=box, local_prompt=local_prompt.format(label=label).strip(" ,"),
                 reason=reason or f"critic marked {label!r}")
        )
    return edits[: limits.max_edits]


# --- vlm critic --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VlmCriticSettings(VlmSettings):
    trigger: str
    max_new_tokens: int
    box_format: str
    normalised_range: float
    label_keys: tuple[str, ...]
    max_edits: int
    min_area: float
    max_area: float
    local_prompt: str
    painter_description: str
    instructions: dict[str, str]  # box format -> the request


class VlmCritic:
    """A local grounding model proposes (box, local prompt) pairs for the painter's style."""

    def __init__(self, settings: VlmCriticSettings):
        if settings.box_format not in BOX_FORMATS:
            raise ValueError(f"critic.box_format={settings.box_format!r} is not one of {', '.join(BOX_FORMATS)}")
        self.settings = settings
        self.processor, self.model, self.device = load_image_text_model(
            settings, "critic", "a grounding model (e.g. Qwen2-VL-7B-Instruct)"
        )
        self.limits = BoxLimits(settings.min_area, settings.max_area, settings.max_edits)

    def _request(self, prompt: str) -> str:
        settings = self.settings
        instruction = settings.instructions[settings.box_format].format(
            painter=settings.painter_description, prompt=prompt, max_edits=settings.max_edits
        )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _coordinate_size(self, image: Image.Image, inputs) -> tuple[float, float]:
        if self.settings.box_format == "qwen2vl":
            return self.settings.normalised_range, self.settings.normalised_range
        # Qwen2.5-VL writes pixels of the resized image it saw: grid (t, h, w) x patch size.
        grid = inputs.get("image_grid_thw")
        patch = getattr(self.processor.image_processor, "patch_size", None)
        if grid is None or patch is None:
            return float(image.width), float(image.height)
        return float(grid[0][2] * patch), float(grid[0][1] * patch)

    def critique(self, image: Image.Image, prompt: str) -> list[Edit]:
        import torch

        image = image.convert("RGB")
        inputs = self.processor(text=[self._request(prompt)], images=[image], return_tensors="pt").to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False)
        # Keep special tokens: Qwen2-VL's boxes are written with them.
        answer = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False)[0]
        log.debug("vlm critic answer: %s", answer)
        return parse_edits(
            answer, self.settings.box_format, image.size, self._coordinate_size(image, inputs), self.limits,
            label_keys=list(self.settings.label_keys),
            local_prompt=self.settings.local_prompt.replace("{trigger}", self.settings.trigger),
        )


def build_critic(
    section: DictConfig, *, extractor: StyleFeatureExtractor | None = None, model: StyleModel | None = None,
    captions: Sequence[str] = (),
) -> Critic:
    """The critic named by `critic.name`; `style` needs the painter's fitted style model."""
    if section.name == "style":
        if extractor is None or model is None:
            raise ValueError("the style critic needs the painter's feature extractor and fitted StyleModel")
        return StyleCritic(StyleCriticSettings.from_config(section), extractor, model, captions)
    if section.name == "vlm":
        return VlmCritic(VlmCriticSettings.from_config(section))
    raise ValueError(f"critic.name={section.name!r} is not one of style, vlm")
