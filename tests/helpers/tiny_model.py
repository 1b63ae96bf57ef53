"""The composed default config (read-only, composed once), the tiny transformer's velocity on
fixed random inputs (what the AdaLoRA and export tests compare models by), and random inputs and
cached encodings shaped for it (what the speed-lever and FP8 tests train on)."""

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


def random_inputs(cfg, batch: int = 2, text: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batched random latents (16 channels, 8x8) and text embeddings for the tiny transformer."""
    arch = cfg.model.architecture.transformer
    g = torch.Generator().manual_seed(seed)
    return {
        "latent_mean": torch.randn(batch, 16, 8, 8, generator=g),
        "prompt_embeds": torch.randn(batch, text, arch.joint_attention_dim, generator=g),
        "pooled_prompt_embeds": torch.randn(batch, arch.pooled_projection_dim, generator=g),
    }


def random_encodings(cfg) -> dict:
    """Two samples, s0 and s1, shaped like the train stage's encoding cache."""
    x = random_inputs(cfg)
    return {f"s{i}": {"latent_mean": x["latent_mean"][i], "latent_std": torch.full((16, 8, 8), 0.05),
                      "prompt_embeds": x["prompt_embeds"][i], "pooled_prompt_embeds": x["pooled_prompt_embeds"][i]}
            for i in range(2)}
