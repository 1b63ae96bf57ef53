"""The plain LoRA's description: its model card (README.md), the recipe and metrics its
safetensors header carries, and the base model's name. Shared by the stages that export a LoRA
(train, retrain); a library module, so neither reaches into the other for it."""

from __future__ import annotations

import re
from collections import defaultdict

from omegaconf import DictConfig, OmegaConf

# metrics that differ from run to run of the same recipe (and from machine to machine): MLflow and
# metrics.json hold them, the exported LoRA never (its bytes stay a function of the recipe, so DVC
# sees nothing new downstream)
TIMINGS = ("steps_per_second", "steady_steps_per_second", "wall_seconds", "evaluation_seconds",
           "checkpoint_seconds", "peak_gpu_memory_gb")


def lora_metrics(metrics: dict) -> dict:
    """The metrics a LoRA's header and model card carry: every number but the timings."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in TIMINGS}


def model_card(cfg: DictConfig, base_model: str, ranks: dict[str, int], metrics: dict, files: dict[str, str],
               note: str = "") -> str:
    """README.md of the plain LoRA: what it is, how to load it, the recipe, ranks and metrics;
    `note` (retrain) says how it was made beyond the train stage."""
    settings = cfg.train
    trigger = str(settings.trigger)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for module, rank in ranks.items():
        by_kind[_layer_kind(module)].append(rank)
    recipe = yaml_block(training_recipe(cfg))
    rank_lines = "\n".join(f"| {kind} | {len(values)} | {min(values)} | {sum(values) / len(values):.2f} "
                           f"| {max(values)} |"
                           for kind, values in sorted(by_kind.items()))
    metric_lines = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                             for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"""---
base_model: {base_model}
library_name: diffusers
tags: [flux, lora, adalora, text-to-image, artmaster]
instance_prompt: {trigger}
---
# ArtMaster AdaLoRA adapter ({trigger})

A LoRA for **{base_model}** trained by ArtMaster's `train` stage with AdaLoRA (per-module ranks
chosen during training) and folded exactly into plain LoRA: every module has its own rank and
`alpha = rank`, so every loader applies scale 1.
{f"{chr(10)}{note}{chr(10)}" if note else ""}
**Trigger phrase:** `{trigger}` (start prompts with it).

## Files: which tool takes which
- `{files.get("diffusers", "pytorch_lora_weights.safetensors")}`: diffusers format (`transformer.*` keys):
  `FluxPipeline.load_lora_weights("<this folder>")`, and `artmaster generate --adapter <this folder>`.
- `{files.get("kohya", "(not written)")}`: kohya / ComfyUI format (`lora_unet_*` keys, BFL layer
  names, `alpha` = rank): ComfyUI's LoRA loader, kohya sd-scripts and Forge on FLUX.1-dev, and
  `artmaster generate --adapter <this file>` on any model size (its converter reads the layer widths
  from the model). diffusers' own kohya converter loads it only on FLUX.1-dev-sized models (it
  hard-codes FLUX.1-dev's layer widths): with diffusers on the tiny demo model, load the diffusers file.

## Ranks
{len(ranks)} modules, {sum(ranks.values())} ranks in total (AdaLoRA init_r {settings.adalora.init_r},
target_r {settings.adalora.target_r}).

| layer | modules | min | mean | max |
|---|---|---|---|---|
{rank_lines}

## Metrics
| metric | value |
|---|---|
{metric_lines}

## Recipe
```yaml
{recipe}```
"""


def _layer_kind(module: str) -> str:
    """transformer_blocks.3.attn.to_q -> "double attn.to_q";
    single_transformer_blocks.0.proj_mlp -> "single proj_mlp"."""
    match = re.fullmatch(r"(single_)?transformer_blocks\.\d+\.(.+)", module)
    if match is None:
        return module
    return f"{'single' if match.group(1) else 'double'} {match.group(2)}"


def yaml_block(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def base_model_name(model_cfg: DictConfig) -> str:
    """`repo_id@revision` of the base model, or its profile and local folder."""
    if model_cfg.repo_id:
        return f"{model_cfg.repo_id}@{model_cfg.revision}" if model_cfg.revision else str(model_cfg.repo_id)
    return f"{model_cfg.profile} ({model_cfg.path})"


def training_recipe(cfg: DictConfig) -> dict:
    """The train settings that made the adapter (not how it was watched: samples, validation,
    checkpoints, resume), as the LoRA's header and model card record them."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    return {k: v for k, v in train.items() if k not in ("samples", "validation", "checkpoint", "resume")}
