"""Optional learned style features (CLIP, DINO, CSD), loaded offline from a local folder.

A backend adds one `learned` block (an L2-normalised embedding per image) to the weight-free
features. Weights are read only from `style_metric.backend_paths.<name>`, a transformers
`save_pretrained` folder with safetensors weights; when it is not configured, missing or
unloadable, the backend is skipped with a logged message and scoring carries on without it.

- clip: `CLIPVisionModelWithProjection`, the projected image embedding.
- dino: `AutoModel` (DINO / DINOv2 ViT), the final-layer CLS token.
- csd: CSD style descriptors: a CLIP vision tower (`CLIPVisionModel`, pooled output) followed by
  CSD's style projection, stored next to it as `csd_style_head.safetensors` holding one
  (hidden_size, style_dim) matrix named `last_layer_style`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

log = logging.getLogger(__name__)

BACKENDS = ("clip", "dino", "csd")
CSD_HEAD_FILE = "csd_style_head.safetensors"
CSD_HEAD_KEY = "last_layer_style"


class BackendUnavailable(Exception):
    """The configured backend cannot be used here; the message says why."""


class LearnedBackend:
    """A frozen image encoder plus its preprocessing, embedding PIL images on CPU."""

    def __init__(self, name: str, model, processor, batch_size: int, head: torch.Tensor | None = None):
        self.name = name
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.head = head
        self.dim = int(self._encode([Image.new("RGB", (32, 32), "white")]).shape[1])

    def _encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt")
        with torch.inference_mode():
            output = self.model(pixel_values=inputs["pixel_values"])
        if self.name == "clip":
            return output.image_embeds
        if self.name == "csd":
            return output.pooler_output @ self.head
        return output.last_hidden_state[:, 0]

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n images) -> (n, dim) float64 rows of unit length."""
        chunks = [self._encode(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        if not chunks:
            return np.zeros((0, self.dim))
        embedding = torch.cat(chunks).double()
        return torch.nn.functional.normalize(embedding, dim=1).numpy()


def _open(name: str, folder: Path, batch_size: int) -> LearnedBackend:
    from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel, CLIPVisionModelWithProjection

    if not folder.is_dir():
        raise BackendUnavailable(f"folder {folder} not found")
    if not any(folder.glob("*.safetensors")):
        raise BackendUnavailable(f"no *.safetensors weights in {folder} (only safetensors are loaded)")
    model_class = {"clip": CLIPVisionModelWithProjection, "dino": AutoModel, "csd": CLIPVisionModel}[name]
    head = None
    if name == "csd":
        from safetensors.torch import load_file

        head_file = folder / CSD_HEAD_FILE
        if not head_file.is_file():
            raise BackendUnavailable(f"CSD style head {head_file} not found")
        tensors = load_file(str(head_file))
        if CSD_HEAD_KEY not in tensors:
            raise BackendUnavailable(f"{head_file} holds no tensor named {CSD_HEAD_KEY!r}")
        head = tensors[CSD_HEAD_KEY].float()
    try:
        model = model_class.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        return LearnedBackend(name, model, processor, batch_size, head)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BackendUnavailable(f"could not load {folder}: {err}") from err


def load_backend(metrics: DictConfig | Mapping) -> LearnedBackend | None:
    """The backend named by `metrics.backend`, or None (with a logged reason) when it is `none`
    or its weights are not available locally. An unknown name is a configuration error."""
    name = str(metrics["backend"]).lower()
    if name == "none":
        return None
    if name not in BACKENDS:
        raise ValueError(f"style_metric.backend={name!r} is not one of none, {', '.join(BACKENDS)}")
    path = metrics["backend_paths"][name]
    try:
        if not path:
            raise BackendUnavailable(f"style_metric.backend_paths.{name} is not set")
        return _open(name, Path(path), int(metrics["backend_batch_size"]))
    except BackendUnavailable as reason:
        log.warning("style backend %r skipped: %s; using the weight-free features only", name, reason)
        return None
