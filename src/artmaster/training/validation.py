"""Validation loss on held crops at fixed noise levels with fixed noise (comparable across steps and
runs), and the fixed sample images rendered while training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from artmaster import flux_math
from artmaster.files import labelled_grid
from artmaster.generate import generate_images
from artmaster.training.batches import Batch, keyed_generator, make_batch
from artmaster.training.settings import SampleSettings
from artmaster.training.state import FlowSettings


@dataclass
class ValidationSet:
    """Held samples at fixed noise levels with fixed noise: comparable across steps and runs."""

    batches: list[Batch]
    tokens: list[torch.Tensor]
    noise: list[torch.Tensor]
    sigmas: torch.Tensor


def validation_set(encodings, ids: list[str], sigmas: list[float], seed: int, flow: FlowSettings,
                   device) -> ValidationSet:
    sigma_tensor = torch.tensor(sigmas, dtype=torch.float32, device=device)
    batches, tokens, noise = [], [], []
    for sample_id in ids:
        batch = make_batch(encodings, [sample_id] * len(sigmas))
        latents = (batch.latent_mean - flow.vae_shift) * flow.vae_scale  # posterior mean: no sampling noise
        packed = flux_math.pack_latents(latents)
        generator = keyed_generator(seed, "validation", sample_id, device=device)
        batches.append(batch)
        tokens.append(packed)
        noise.append(torch.randn(packed.shape, generator=generator, device=device, dtype=packed.dtype))
    return ValidationSet(batches, tokens, noise, sigma_tensor)


@torch.no_grad()
def validation_loss(model, vset: ValidationSet, flow: FlowSettings) -> torch.Tensor:
    losses = []
    for batch, tokens, noise in zip(vset.batches, vset.tokens, vset.noise):
        count = len(tokens)
        guidance = None if flow.guidance is None else flux_math.guidance_vector(flow.guidance, count, tokens.device)
        prediction = flux_math.predict_velocity(
            model, flux_math.noisy_latents(tokens, noise, vset.sigmas).to(flow.model_dtype), vset.sigmas,
            prompt_embeds=batch.prompt_embeds, pooled_prompt_embeds=batch.pooled_prompt_embeds,
            image_ids=batch.image_ids, txt_ids=batch.txt_ids, guidance=guidance,
        )
        losses.append(F.mse_loss(prediction.float(), flux_math.velocity_target(tokens, noise).float()))
    return torch.stack(losses).mean()


def render_samples(pipe, prompt_encodings, settings: SampleSettings, max_sequence_length: int,
                   device) -> list[tuple[str, int, Image.Image]]:
    """One image per (prompt, seed) at fixed settings, from the cached prompt embeddings, painted
    the way `artmaster generate` paints (the same starting noise for a seed), `settings.batch_size`
    images per call."""
    dtype = pipe.transformer.dtype
    cache = {(prompt, max_sequence_length): (entry["prompt_embeds"][None].to(device, dtype),
                                              entry["pooled_prompt_embeds"][None].to(device, dtype))
             for prompt, entry in prompt_encodings.items()}
    pairs = [(prompt, seed) for prompt in settings.prompts for seed in settings.seeds]
    images = generate_images(
        pipe, [prompt for prompt, _ in pairs], [seed for _, seed in pairs],
        height=settings.height, width=settings.width, steps=settings.steps, guidance=settings.guidance,
        max_sequence_length=max_sequence_length, batch_size=settings.batch_size, embedding_cache=cache,
    )
    return [(prompt, seed, image) for (prompt, seed), image in zip(pairs, images)]


def sample_grid(samples: list[tuple[str, int, Image.Image]], step: int) -> Image.Image:
    """Rows = prompts (their text on the left), columns = seeds, titled with the step."""
    prompts = list(dict.fromkeys(prompt for prompt, _, _ in samples))
    seeds = list(dict.fromkeys(seed for _, seed, _ in samples))
    rows = [(prompt, [image for p, _, image in samples if p == prompt]) for prompt in prompts]
    return labelled_grid(rows, [f"seed {seed}" for seed in seeds], title=f"samples at step {step}")
