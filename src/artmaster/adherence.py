"""Prompt adherence: CLIP score of each image against its content prompt, with a local CLIP model
(`evaluate.adherence.clip_path`, a transformers CLIPModel + processor folder with safetensors
weights); "not available" without one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from artmaster.config import Settings

log = logging.getLogger(__name__)

NOT_AVAILABLE = "not available"


@dataclass(frozen=True)
class AdherenceSettings(Settings):
    clip_path: str | None
    batch_size: int


class ClipScorer:
    """CLIP score = 100 x max(cosine(image, text), 0) with a local transformers CLIPModel."""

    def __init__(self, folder: Path, batch_size: int):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()
        self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        self.batch_size = batch_size

    @classmethod
    def load(cls, settings: AdherenceSettings) -> tuple[ClipScorer | None, str]:
        """(scorer, status): status is "clip (<folder>)" or "not available: <why>"."""
        path = settings.clip_path
        if not path:
            return None, f"{NOT_AVAILABLE}: evaluate.adherence.clip_path is not set"
        folder = Path(path)
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            return None, f"{NOT_AVAILABLE}: no CLIP weights (*.safetensors) in {folder}"
        try:
            return cls(folder, settings.batch_size), f"clip ({folder})"
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            log.warning("evaluate: CLIP model in %s could not be loaded: %s", folder, error)
            return None, f"{NOT_AVAILABLE}: could not load {folder} ({error})"

    @torch.no_grad()
    def score(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        values = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(text=texts[start : start + self.batch_size],
                                    images=images[start : start + self.batch_size],
                                    return_tensors="pt", padding=True, truncation=True)
            image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                attention_mask=inputs.get("attention_mask"))
            image, text = (_embedding(t) for t in (image, text))
            cosine = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=1)
            values.append((100.0 * cosine.clamp(min=0)).numpy())
        return np.concatenate(values).astype(np.float64)


def _embedding(output) -> torch.Tensor:
    """transformers returns a tensor, or (newer versions) an output object holding the pooled one."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"unexpected CLIP output {type(output).__name__}")
