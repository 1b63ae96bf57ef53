"""Refiners for ArtAug: repaint the regions a critic marked, from the same seed as the original.

Config group `refine` (conf/refine/*.yaml), selected by `refine.name`:
- `regional` (ArtAug's refinement): a full regeneration from the original's seed in which, at every
  denoising step, the transformer's prediction is the region-weighted mean
  `(eps(P) + sum_i m_i * eps(P_i)) / (1 + sum_i m_i)` of the global prompt P and each edit's local
  prompt P_i, with m_i the edit's blurred box mask on FLUX's packed token grid. With no edits it is
  exactly `FluxPipeline.__call__`.
- `inpaint`: diffusers' FluxInpaintPipeline on the same components repaints each box with its local
  prompt; every pixel outside the boxes is pasted back from the original, so it is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from diffusers import FluxInpaintPipeline, FluxPipeline
from omegaconf import DictConfig
from PIL import Image
from scipy import ndimage

from artmaster.config import Settings
from artmaster.critic import Edit
from artmaster.flux_math import resolution_shift_mu, unpack_latents
from artmaster.generate import noise_generator


class Refiner(Protocol):
    def refine(
        self, original: Image.Image, prompt: str, seed: int, edits: Sequence[Edit], *,
        height: int, width: int, steps: int, guidance: float, max_sequence_length: int,
    ) -> Image.Image: ...


# --- the regional merge ------------------------------------------------------------------------


def merge_regional_predictions(
    global_pred: torch.Tensor, local_preds: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """ArtAug's region-weighted prediction `(g + sum_i m_i l_i) / (1 + sum_i m_i)`.

    global_pred (1, T, C) for the global prompt, local_preds (n, T, C) for the n local prompts,
    masks (n, T) in [0, 1] per packed token. A zero mask leaves the global prediction; a mask of
    ones with one local prompt gives the mean of the two."""
    if local_preds.shape[0] != masks.shape[0]:
        raise ValueError(f"{local_preds.shape[0]} local predictions but {masks.shape[0]} masks")
    if local_preds.shape[0] == 0:
        return global_pred
    weights = masks.to(global_pred.dtype)[..., None]
    merged = global_pred + (weights * local_preds).sum(dim=0, keepdim=True)
    return merged / (1.0 + weights.sum(dim=0, keepdim=True))


def token_grid_shape(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """(rows, columns) of FLUX's packed tokens: one token per 2x2 latent patch."""
    patch = vae_scale_factor * 2
    return height // patch, width // patch


def token_grid_masks(
    boxes: Sequence[Sequence[float]], height: int, width: int, vae_scale_factor: int, blur_sigma: float
) -> torch.Tensor:
    """(n, rows * columns) masks of the boxes on the packed token grid, row-major like the tokens.

    Each box (x1, y1, x2, y2 in image pixels) is drawn at pixel resolution, blurred by a Gaussian of
    `blur_sigma` px (edges extend outward, so a box touching the border stays whole there) and
    averaged over each token's patch of pixels."""
    rows, columns = token_grid_shape(height, width, vae_scale_factor)
    patch = vae_scale_factor * 2
    masks = np.zeros((len(boxes), rows * patch, columns * patch), dtype=np.float32)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[max(0, round(y1)) : max(0, round(y2)), max(0, round(x1)) : max(0, round(x2))] = 1.0
        if blur_sigma > 0:
            mask[:] = ndimage.gaussian_filter(mask, blur_sigma, mode="nearest")
    per_token = masks.reshape(len(boxes), rows, patch, columns, patch).mean(axis=(2, 4))
    return torch.from_numpy(per_token.reshape(len(boxes), rows * columns))


# --- regional refiner --------------------------------------------------------------------------


@torch.no_grad()
def regional_latents(
    pipe: FluxPipeline, prompt: str, local_prompts: Sequence[str], masks: torch.Tensor, seed: int, *,
    height: int, width: int, steps: int, guidance: float, max_sequence_length: int, batch_size: int,
    progress: bool = False,
) -> torch.Tensor:
    """Packed latents of a regional generation; the denoising loop of `FluxPipeline.__call__`
    (same noise, sigmas, shift and scheduler) with the prediction merged over the prompts.

    The 1 + n prompt passes of a step go through the transformer `batch_size` at a time."""
    device = pipe._execution_device
    prompts = [prompt, *local_prompts]
    prompt_embeds, pooled_embeds, text_ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    latents, image_ids = pipe.prepare_latents(
        1, pipe.transformer.config.in_channels // 4, height, width, prompt_embeds.dtype, device,
        noise_generator(seed),
    )
    masks = masks.to(device)
    scheduler = pipe.scheduler
    mu = resolution_shift_mu(
        latents.shape[1],
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    scheduler.set_begin_index(0)
    guidance_value = None
    if pipe.transformer.config.guidance_embeds:
        guidance_value = torch.full([1], guidance, device=device, dtype=torch.float32)
    for t in pipe.progress_bar(scheduler.timesteps) if progress else scheduler.timesteps:
        predictions = []
        for start in range(0, len(prompts), batch_size):
            part = slice(start, min(start + batch_size, len(prompts)))
            count = part.stop - part.start
            predictions.append(
                pipe.transformer(
                    hidden_states=latents.expand(count, -1, -1),
                    timestep=t.expand(count).to(latents.dtype) / 1000,
                    guidance=None if guidance_value is None else guidance_value.expand(count),
                    pooled_projections=pooled_embeds[part],
                    encoder_hidden_states=prompt_embeds[part],
                    txt_ids=text_ids,
                    img_ids=image_ids,
                    joint_attention_kwargs={},
                    return_dict=False,
                )[0]
            )
        prediction = torch.cat(predictions)
        merged = merge_regional_predictions(prediction[:1], prediction[1:], masks)
        latents = scheduler.step(merged, t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode_latents(pipe: FluxPipeline, latents: torch.Tensor, height: int, width: int) -> Image.Image:
    """Packed latents -> PIL image, as `FluxPipeline.__call__` decodes them."""
    latent_height = 2 * (height // (pipe.vae_scale_factor * 2))
    latent_width = 2 * (width // (pipe.vae_scale_factor * 2))
    spatial = unpack_latents(latents, latent_height, latent_width)
    spatial = spatial / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    decoded = pipe.vae.decode(spatial.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


@dataclass(frozen=True)
class RegionalSettings(Settings):
    mask_blur: float
    batch_size: int


class RegionalRefiner:
    """ArtAug's same-seed regional regeneration (see module docstring)."""

    def __init__(self, pipe: FluxPipeline, settings: RegionalSettings):
        self.pipe = pipe
        self.mask_blur = settings.mask_blur
        self.batch_size = settings.batch_size
        if self.batch_size < 1:
            raise ValueError(f"refine.batch_size must be >= 1, got {self.batch_size}")

    def refine(self, original, prompt, seed, edits, *, height, width, steps, guidance, max_sequence_length):
        masks = token_grid_masks(
            [edit.box for edit in edits], height, width, self.pipe.vae_scale_factor,
            self.mask_blur * min(height, width),
        )
        latents = regional_latents(
            self.pipe, prompt, [edit.local_prompt for edit in edits], masks, seed,
            height=height, width=width, steps=steps, guidance=guidance,
            max_sequence_length=max_sequence_length, batch_size=self.batch_size,
        )
        return decode_latents(self.pipe, latents, height, width)


# --- inpaint refiner ---------------------------------------------------------------------------


def feathered_box_alpha(box: Sequence[float], size: tuple[int, int], feather_px: float) -> np.ndarray:
    """(H, W) float32 blend weight: 0 outside the box, rising linearly over `feather_px` from each
    box edge to 1 inside (so the repaint blends in while the outside stays bit-exact)."""
    width, height = size
    x1, y1, x2, y2 = (round(v) for v in box)
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    horizontal = np.minimum(xs - x1, x2 - xs)
    vertical = np.minimum(ys - y1, y2 - ys)
    inside = np.minimum(vertical[:, None], horizontal[None, :])
    if feather_px <= 0:
        return (inside > 0).astype(np.float32)
    return np.clip(inside / feather_px, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class InpaintSettings(Settings):
    strength: float
    feather: float


class InpaintRefiner:
    """Repaint each edit's box with its local prompt (FluxInpaintPipeline on the same components)."""

    def __init__(self, pipe: FluxPipeline, settings: InpaintSettings):
        self.pipe = FluxInpaintPipeline(**pipe.components)
        self.pipe.set_progress_bar_config(disable=True)
        self.strength = settings.strength
        self.feather = settings.feather
        if not 0 < self.strength <= 1:
            raise ValueError(f"refine.strength must be in (0, 1], got {self.strength}")

    def refine(self, original, prompt, seed, edits, *, height, width, steps, guidance, max_sequence_length):
        image = original.convert("RGB")
        for edit in edits:
            box_mask = Image.new("L", image.size, 0)
            box_mask.paste(255, tuple(round(v) for v in edit.box))
            repainted = self.pipe(
                prompt=edit.local_prompt, image=image, mask_image=box_mask, height=height, width=width,
                strength=self.strength, num_inference_steps=steps, guidance_scale=guidance,
                generator=noise_generator(seed), max_sequence_length=max_sequence_length,
            ).images[0]
            if repainted.size != image.size:
                repainted = repainted.resize(image.size, Image.Resampling.LANCZOS)
            alpha = feathered_box_alpha(edit.box, image.size, self.feather * min(image.size))[..., None]
            before = np.asarray(image, dtype=np.float32)
            after = np.asarray(repainted, dtype=np.float32)
            blended = before * (1 - alpha) + after * alpha
            image = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
        return image


# name -> the refiner and the settings it reads from the `refine` section
REFINERS = {"regional": (RegionalRefiner, RegionalSettings), "inpaint": (InpaintRefiner, InpaintSettings)}


def build_refiner(pipe: FluxPipeline, section: DictConfig) -> Refiner:
    """The refiner named by `refine.name` (conf/refine/<name>.yaml), on `pipe`'s components."""
    name = str(section.name)
    if name not in REFINERS:
        raise ValueError(f"refine.name={name!r} is not one of {', '.join(REFINERS)}")
    refiner, settings = REFINERS[name]
    return refiner(pipe, settings.from_config(section))
