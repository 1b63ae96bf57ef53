"""The composed default config (read-only, composed once) and the tiny transformer's velocity
on fixed random inputs: what the AdaLoRA and export tests compare models by."""

from __future__ import annotations

import functools

import torch

from artmaster.config import compose
from artmaster.flux_math import guidance_vector, latent_image_ids, predict_velocity, text_ids


@functools.cache
def composed():
    """The composed default conf/ (composing takes about a second; tests only read it)."""
    return compose()


def velocity(model, seed: int, batch: int = 2) -> torch.Tensor:
    """The model's velocity prediction for random inputs fixed by `seed` (16 image + 8 text tokens)."""
    arch = composed().model.architecture.transformer
    g = torch.Generator().manual_seed(seed)
    return predict_velocity(
        model,
        torch.randn(batch, 16, arch.in_channels, generator=g),
        torch.rand(batch, generator=g),
        prompt_embeds=torch.randn(batch, 8, arch.joint_attention_dim, generator=g),
        pooled_prompt_embeds=torch.randn(batch, arch.pooled_projection_dim, generator=g),
        image_ids=latent_image_ids(8, 8),
        txt_ids=text_ids(8),
        guidance=guidance_vector(1.0, batch),
    )
