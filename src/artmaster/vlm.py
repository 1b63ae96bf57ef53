"""Local image-text-to-text models (transformers AutoProcessor + AutoModelForImageTextToText), as
the `vlm` captioner and the `vlm` critic load them: from a local folder only, safetensors weights
only, remote code only when the user sets `trust_remote_code`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from artmaster.config import Settings


@dataclass(frozen=True)
class VlmSettings(Settings):
    """Where a local model lies and how it loads (`caption.vlm`; the `vlm` critic's section)."""

    model_path: str | None
    dtype: str
    device: str
    trust_remote_code: bool


def load_image_text_model(settings: VlmSettings, key: str, example: str):
    """(processor, model, device) from `settings.model_path`; `key` names the settings in errors
    (e.g. "caption.vlm") and `example` the kind of model to save there."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(settings.model_path) if settings.model_path else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(
            f"{key}.model_path={settings.model_path!r} is not a folder: save {example} with "
            f"save_pretrained to a local folder and set {key}.model_path to it"
        )
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (only safetensors are loaded)")
    if settings.dtype == "auto":
        dtype = "auto"
    elif isinstance(getattr(torch, settings.dtype, None), torch.dtype):
        dtype = getattr(torch, settings.dtype)
    else:
        raise ValueError(f"{key}.dtype={settings.dtype!r}: use auto, float32, bfloat16 or float16")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" else settings.device
    common = {"local_files_only": True, "trust_remote_code": settings.trust_remote_code}
    processor = AutoProcessor.from_pretrained(str(folder), **common)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, **common)
    return processor, model.to(device).eval(), device
