"""The base pipeline and a LoRA as the `base` and `train` stages leave them, on the tiny model:
the inputs the generating stages (augment, evaluate) load."""

from __future__ import annotations

from pathlib import Path

import torch

from artmaster.config import compose
from artmaster.models import build_random_pipeline


def write_base_and_lora(data: Path) -> None:
    """data/base/pipeline (random tiny weights) and data/train/lora (a random rank-4 LoRA on the
    attention projections: non-zero, so adapter and base paint differently)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = build_random_pipeline(compose([]).model)
    pipe.save_pretrained(data / "base" / "pipeline")
    torch.manual_seed(0)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    FluxPipeline.save_lora_weights(data / "train" / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
