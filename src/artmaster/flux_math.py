"""FLUX.1 rectified-flow training math as small named functions.

Layouts follow diffusers' FluxPipeline (tests compare against its helpers):
- VAE latents (B, 16, h, w) are packed into 2x2 patches: tokens (B, h/2 * w/2, 64).
- Image position ids are an (h/2 * w/2, 3) grid: channel 0 = 0, channel 1 = row, channel 2 = column;
  text position ids are zeros (L, 3).
- Noise level s in [0, 1]: x_s = (1 - s) z + s noise, the transformer predicts the velocity
  noise - z, and takes `timestep = s` (it multiplies by 1000 inside).
"""

from __future__ import annotations

import math

import torch


def vae_latents(mean: torch.Tensor, std: torch.Tensor, shift: float, scale: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample of the VAE posterior N(mean, std), shifted and scaled to the transformer's space."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps - shift) * scale


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each token is a 2x2 patch, row-major over patches."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"latent size {height}x{width} must be even to pack into 2x2 patches")
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    batch, _, packed_channels = tokens.shape
    channels = packed_channels // 4
    patches = tokens.view(batch, latent_height // 2, latent_width // 2, channels, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, latent_height, latent_width)


def latent_image_ids(latent_height: int, latent_width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column)."""
    rows, cols = latent_height // 2, latent_width // 2
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(L, 3) zeros: FLUX gives text tokens no spatial position."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def resolution_shift_mu(token_count: int, base_tokens: int = 256, max_tokens: int = 4096,
                        base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's shift parameter, linear in the packed token count (256 -> 0.5, 4096 -> 1.15)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (token_count - base_tokens)


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's exponential time shift: pushes noise levels up for larger images (mu > 0)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def sample_sigmas(batch_size: int, *, generator: torch.Generator | None = None, device=None,
                  logit_mean: float = 0.0, logit_std: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """Logit-normal noise levels sigmoid(N(mean, std)), shifted by `mu` when given."""
    normal = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), generator=generator, device=device)
    sigmas = torch.sigmoid(normal)
    return sigmas if mu is None else shift_sigmas(sigmas, mu)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) z + s noise, with one s per sample broadcast over the other dimensions."""
    s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_s / d s: what the transformer learns to predict."""
    return noise - latents


def guidance_vector(value: float, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX.1-dev's distilled-guidance input, one value per sample."""
    return torch.full((batch_size,), float(value), device=device, dtype=dtype)


def predict_velocity(transformer, noisy_tokens: torch.Tensor, sigmas: torch.Tensor, *,
                     prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                     image_ids: torch.Tensor, txt_ids: torch.Tensor,
                     guidance: torch.Tensor | None) -> torch.Tensor:
    """One FluxTransformer2DModel call on packed tokens; `guidance` is None for models without it."""
    return transformer(
        hidden_states=noisy_tokens,
        timestep=sigmas.to(noisy_tokens.dtype),
        guidance=guidance,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=txt_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
