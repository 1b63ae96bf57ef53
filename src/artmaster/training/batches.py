"""The batch plan: every epoch's micro-batches, bucketed by image size, repeated, shuffled, and
shared between DDP processes; the held-out validation crops; encodings made into device batches.

Every draw comes from a generator keyed by what it is for (`keyed_generator`), so the plan is a pure
function of the config and a resumed run needs only the count of micro-batches it has consumed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from artmaster import flux_math


def keyed_generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded with a hash of named parts (seed, "step", rank, step, micro-batch): each
    draw of the loop has its own stream, reproducible on resume whatever ran before it."""
    seed = int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


def epoch_batches(ids_by_size: dict[tuple[int, int], list[str]], repeats: int, batch_size: int,
                  generator: torch.Generator) -> list[list[str]]:
    """One epoch: each id `repeats` times, shuffled within its bucket, batched, batches shuffled."""
    batches = []
    for size in sorted(ids_by_size):
        ids = ids_by_size[size] * repeats
        order = torch.randperm(len(ids), generator=generator).tolist()
        shuffled = [ids[i] for i in order]
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def process_batches(ids_by_size: dict[tuple[int, int], list[str]], *, epochs: int, repeats: int, batch_size: int,
                    world_size: int, process_index: int, seed: int) -> list[list[str]]:
    """The micro-batches of one DDP process (`process_index` of `world_size`; a process, not a
    LoRA rank) over all epochs: every process gets the same count (DDP lockstep) and a disjoint
    share of each epoch's batches."""
    share = []
    for epoch in range(epochs):
        batches = epoch_batches(ids_by_size, repeats, batch_size, keyed_generator(seed, "epoch", epoch))
        per_process = len(batches) // world_size
        share += batches[process_index::world_size][:per_process]
    return share


def optimizer_steps(micro_batches: int, accumulation: int) -> int:
    steps = micro_batches // accumulation
    if steps < 1:
        raise ValueError(
            f"train: {micro_batches} micro-batches per rank make no optimizer step with "
            f"gradient_accumulation={accumulation}; add crops, repeats or epochs"
        )
    return steps


def held_out_ids(ids: list[str], validation: DictConfig, seed: int) -> set[str]:
    count = min(int(validation.num_samples), len(ids))
    order = torch.randperm(len(ids), generator=keyed_generator(seed, "validation-ids")).tolist()
    return {ids[i] for i in order[:count]}


def on_device(encodings: dict[str, dict[str, torch.Tensor]], device, model_dtype: torch.dtype) -> dict:
    """Every encoding on the training device once (no copies in the loop): VAE posteriors in fp32
    for the flow maths, text embeddings in the transformer's dtype."""
    return {
        sample_id: {name: t.to(device, torch.float32 if name.startswith("latent") else model_dtype)
                    for name, t in entry.items()}
        for sample_id, entry in encodings.items()
    }


@dataclass
class Batch:
    latent_mean: torch.Tensor  # (B, 16, h, w)
    latent_std: torch.Tensor
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_prompt_embeds: torch.Tensor  # (B, P)
    image_ids: torch.Tensor  # (h/2 * w/2, 3)
    txt_ids: torch.Tensor  # (L, 3)


def make_batch(encodings: dict[str, dict[str, torch.Tensor]], ids: list[str]) -> Batch:
    entries = [encodings[sample_id] for sample_id in ids]
    mean = torch.stack([e["latent_mean"] for e in entries])
    prompt_embeds = torch.stack([e["prompt_embeds"] for e in entries])
    return Batch(
        latent_mean=mean,
        latent_std=torch.stack([e["latent_std"] for e in entries]),
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=torch.stack([e["pooled_prompt_embeds"] for e in entries]),
        image_ids=flux_math.latent_image_ids(mean.shape[2], mean.shape[3], device=mean.device),
        txt_ids=flux_math.text_ids(prompt_embeds.shape[1], device=mean.device),
    )
