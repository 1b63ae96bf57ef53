"""Tool `artmaster generate`: images from the base model, alone or with an adapter.

    artmaster generate "a prompt" [--adapter DIR] [--count N] [--seed S] [--steps K] [--out grid.png]
                       [hydra overrides, e.g. model=flux_dev base.generate.guidance=3.5]

Settings default from `base.generate`. The adapter is a diffusers-format LoRA folder (what the
train stage writes to data/train/lora/) or a single LoRA .safetensors file: diffusers keys, or the
kohya / ComfyUI file of that folder (converted exactly for any model size).
`generate_images` is the one generation loop: the base, evaluate and augment stages reuse it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from artmaster.config import compose
from artmaster.files import image_grid, save_image_atomic

# prompt -> (T5 sequence embeddings (1, L, D), CLIP pooled embedding (1, P)), at one sequence length
EmbeddingCache = dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]


def encode_prompts(pipe, prompts: Sequence[str], max_sequence_length: int,
                   cache: EmbeddingCache | None = None) -> EmbeddingCache:
    """Text embeddings of each distinct prompt, computed once and kept in `cache`.

    A LoRA on the transformer leaves the text encoders unchanged, so callers that compare the base
    model with adapters on the same prompts can share one cache between them.
    """
    from artmaster.models import prompt_embeddings, truncation_reported

    cache = {} if cache is None else cache
    new = [prompt for prompt in dict.fromkeys(prompts) if (prompt, max_sequence_length) not in cache]
    with truncation_reported(pipe, new, max_sequence_length, "text encoders"):
        for prompt in new:
            cache[(prompt, max_sequence_length)] = prompt_embeddings(pipe, prompt, max_sequence_length)
    return cache


def load_adapter(pipe, adapter: str | Path, fuse: bool = False) -> None:
    """Load a LoRA (folder or .safetensors) into the pipeline's transformer; with `fuse` fold it
    into the base weights (W + BA, rounded once to the weights' dtype) and drop the LoRA layers,
    so each denoising step runs the bare model: 418 fewer LoRA branches per step at FLUX.1-dev
    size. A fused adapter cannot be switched off again without reloading the pipeline.

    A kohya / ComfyUI file (`lora_unet_*` keys) goes through our exact converter, which takes the
    layer widths from this model (diffusers' own converter assumes FLUX.1-dev's)."""
    from artmaster.adalora import diffusers_state_dict, is_kohya_file, read_kohya
    from artmaster.models import quiet_loggers

    # our LoRAs adapt the transformer only: diffusers' "No LoRA keys associated to CLIPTextModel" is noise
    with quiet_loggers("diffusers.loaders.lora_base"):
        if is_kohya_file(adapter):
            widths = {name: module.out_features for name, module in pipe.transformer.named_modules()
                      if isinstance(module, torch.nn.Linear)}
            # read by safetensors (read_kohya), handed over as tensors
            pipe.load_lora_weights(diffusers_state_dict(read_kohya(adapter, widths)), use_safetensors=True)
        else:
            pipe.load_lora_weights(str(adapter), use_safetensors=True)  # safetensors only: never a pickle
    if fuse:
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, removes the peft layers


@contextmanager
def adapter_applied(pipe, adapter: str | Path | None, fold: bool = False) -> Iterator[None]:
    """Inside the `with`, the pipeline's transformer with `adapter` (a diffusers LoRA folder; None:
    the base model); after it, the base model exactly as before. Loaded as LoRA layers, or with
    `fold` folded into the weights as `load_adapter(fuse=True)` does (the adapted layers' exact
    weights are kept on the CPU and put back): one pass of the bare model per step, and compiled
    blocks keep one graph (unfolded, each module's own rank is a new shape for torch.compile)."""
    if adapter is None:
        yield
        return
    load_adapter(pipe, adapter)
    if not fold:
        try:
            yield
        finally:
            pipe.unload_lora_weights()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    originals = {name: module.get_base_layer().weight.detach().to("cpu", copy=True)
                 for name, module in pipe.transformer.named_modules() if isinstance(module, BaseTunerLayer)}
    try:
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, removes the LoRA layers
        yield
    finally:
        pipe.unload_lora_weights()  # a no-op unless fusing failed half-way
        with torch.no_grad():
            for name, weight in originals.items():
                pipe.transformer.get_submodule(name).weight.copy_(weight)


def noise_generator(seed: int) -> torch.Generator:
    """The generator of the starting noise of the image of `seed`: on the CPU, so an image depends
    only on its prompt and seed, and a refinement (artmaster.refine) starts from the same noise as
    its original on any device."""
    return torch.Generator("cpu").manual_seed(int(seed))


def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], *, height: int, width: int,
                    steps: int, guidance: float, max_sequence_length: int, batch_size: int = 4,
                    embedding_cache: EmbeddingCache | None = None) -> list[Image.Image]:
    """One image per (prompts[i], seeds[i]), in order.

    Each image's starting noise comes from its own CPU generator seeded with its seed, so an image
    depends only on its prompt and seed (not on batching or device): the same prompt and seed give
    paired images from the base model and from an adapter.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate_images: {len(prompts)} prompts but {len(seeds)} seeds (one seed per image)")
    if batch_size < 1:
        raise ValueError(f"generate_images: batch_size must be >= 1, got {batch_size}")
    cache = encode_prompts(pipe, prompts, max_sequence_length, embedding_cache)
    pipe.set_progress_bar_config(disable=True)  # one bar over batches instead of one per batch
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) < 2):
        batch_prompts = prompts[start : start + batch_size]
        batch_seeds = seeds[start : start + batch_size]
        embeds = torch.cat([cache[(p, max_sequence_length)][0] for p in batch_prompts])
        pooled = torch.cat([cache[(p, max_sequence_length)][1] for p in batch_prompts])
        with torch.no_grad():
            result = pipe(
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[noise_generator(seed) for seed in batch_seeds],
                max_sequence_length=max_sequence_length,
                output_type="pil",
            )
        images.extend(result.images)
    return images


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"artmaster {command}",
        description="Generate images from the base model, or the base model with a LoRA adapter. "
        "Unset options default from the `base.generate` config; trailing Hydra overrides "
        "(model=flux_dev, base.generate.guidance=3.5, ...) change the configuration.",
    )
    parser.add_argument("prompt")
    parser.add_argument("--adapter", type=Path, help="LoRA folder (e.g. data/train/lora) or .safetensors file")
    parser.add_argument("--count", type=int, help="number of images (seeds S, S+1, ...)")
    parser.add_argument("--seed", type=int, help="seed of the first image")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--out", type=Path, help="grid PNG; single images go to a folder of the same stem")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    return parser


def cli(command: str, argv: list[str]) -> int:
    """`artmaster generate`: write a grid of `count` images for one prompt, and each image alone."""
    args = _parser(command).parse_intermixed_args(argv)
    cfg = compose(args.overrides)
    settings = cfg.base.generate
    count = settings.count if args.count is None else args.count
    first_seed = settings.seed if args.seed is None else args.seed
    out = Path(settings.out if args.out is None else args.out)
    if count < 1:
        print(f"artmaster {command}: --count must be at least 1, got {count}", file=sys.stderr)
        return 2
    if args.adapter is not None and not args.adapter.exists():
        print(f"artmaster {command}: adapter {args.adapter} does not exist (expected a LoRA folder "
              "such as data/train/lora, or a .safetensors file)", file=sys.stderr)
        return 2

    from artmaster.models import load_pipeline

    try:
        pipe = load_pipeline(cfg.model)
    except (FileNotFoundError, OSError, ValueError) as error:
        print(f"artmaster {command}: cannot load the base model: {error}", file=sys.stderr)
        return 1
    if args.adapter is not None:
        load_adapter(pipe, args.adapter, fuse=bool(cfg.model.get("fuse_lora", False)))
    seeds = [first_seed + offset for offset in range(count)]
    images = generate_images(
        pipe, [args.prompt] * count, seeds,
        height=settings.height, width=settings.width,
        steps=settings.steps if args.steps is None else args.steps,
        guidance=settings.guidance,
        max_sequence_length=cfg.model.max_sequence_length,
        batch_size=settings.batch_size,
    )
    singles = out.with_suffix("")
    for seed, image in zip(seeds, images):
        save_image_atomic(image, singles / f"seed{seed:05d}.png")
    save_image_atomic(image_grid(images, settings.columns, [f"seed {seed}" for seed in seeds]), out)
    print(f"generate: {count} image(s) for {args.prompt!r} "
          f"({'adapter ' + str(args.adapter) if args.adapter else 'base model'}) -> {out} and {singles}/")
    return 0
