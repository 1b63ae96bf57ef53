"""Stage `train`: AdaLoRA fine-tuning of the FLUX transformer on the painter's captioned crops.

Reads data/crop (crops.jsonl + PNGs), data/caption/captions.jsonl and the model profile (the tiny
profile from data/base/pipeline). Writes data/train/, or <sweep job dir>/train inside a Hydra
multirun so sweep points never share outputs:

  cache/             VAE posterior and text embeddings per crop (safetensors, content-hash keyed)
  checkpoints/       step-XXXXXX full resumable checkpoints (last `checkpoint.keep`)
  adapter/           the peft AdaLoRA folder
  lora/              plain LoRA (diffusers + kohya safetensors) with its README.md model card
  ranks.json, ranks.png, samples/, metrics.json, headline.json, loss.csv, val_loss.csv

The run, top to bottom: read crops and captions -> encode each once into the cache -> free the
encoders -> plan aspect-bucketed batches for every epoch -> wrap the transformer with AdaLoRA ->
AdamW + lr schedule -> resume from the last checkpoint -> loop over optimizer steps (forward and
backward per micro-batch, clip, step, schedule, rank allocation, EMA) with logging, validation,
samples and checkpoints every few steps -> export. `accelerate launch` runs the same loop as DDP.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import logging
import math
import random
import shutil
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from artmaster import checkpoints as sealing
from artmaster import flux_math, replicates
from artmaster.config import hydra_entry, params_hash, stage_dir
from artmaster.dataset import Example, load_examples
from artmaster.files import (atomic_path, captioned, fsync_dir, labelled_grid, remove_folder, replace_together,
                             sort_safetensors_header, staged_dir, write_atomic)
from artmaster.lora_card import base_model_name, lora_metrics, model_card, training_recipe
from artmaster.tracking import child_run, log_summary, stage_run

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
# train keys (dotted: inside a group) that change neither the math nor the data: a checkpoint stays
# resumable when only these differ. validation.num_samples and hold_out are not among them: they
# decide which crops are trained on, hence the plan and the step count.
RESUME_NEUTRAL_KEYS = ("checkpoint", "resume", "samples", "validation.every", "validation.sigmas", "log_every",
                       "cudagraphs")


def resume_identity(train_settings: dict) -> dict:
    """The train settings without RESUME_NEUTRAL_KEYS: what a resumable checkpoint must share."""
    kept = {key: dict(value) if isinstance(value, dict) else value for key, value in train_settings.items()}
    for key in RESUME_NEUTRAL_KEYS:
        group, _, name = key.partition(".")
        if not name:
            kept.pop(group, None)
        elif isinstance(kept.get(group), dict):
            kept[group].pop(name, None)
    return kept


# --- where outputs go ---------------------------------------------------------------------------


def output_dir(cfg: DictConfig) -> Path:
    """data/train, or the sweep job's own folder inside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir) / "train"
    return stage_dir(cfg, "train")


# --- cache: VAE posterior + text embeddings, once per crop and caption --------------------------


def encoder_fingerprint(model_cfg: DictConfig) -> str:
    """What the cached encodings depend on: the encoders' weights, dtype and text length.

    Local folders are fingerprinted by each encoder file's size and its first and last MiB, so a
    retrained tiny base model invalidates the cache without hashing gigabytes of T5 weights.
    """
    record = {
        "dtype": model_cfg.dtype,
        "max_sequence_length": model_cfg.max_sequence_length,
        "profile": model_cfg.profile,
        "repo_id": model_cfg.repo_id,
        "revision": model_cfg.revision,
    }
    if model_cfg.profile == "flux_dev_random":
        record["architecture"] = OmegaConf.to_container(model_cfg.architecture, resolve=True)
        record["seed"] = model_cfg.seed
    elif model_cfg.path:
        root = Path(model_cfg.path)
        files = {}
        for part in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            for path in sorted((root / part).rglob("*")):
                if path.is_file():
                    files[str(path.relative_to(root))] = _file_sample_hash(path)
        record["files"] = files
    return params_hash(record)


def _file_sample_hash(path: Path, chunk: int = 1 << 20) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(chunk))
        if size > chunk:
            handle.seek(max(chunk, size - chunk))
            digest.update(handle.read(chunk))
    return digest.hexdigest()[:16]


def load_pixels(example: Example) -> torch.Tensor:
    """(3, H, W) in [-1, 1] at the example's scaled size."""
    with Image.open(example.image_path) as opened:
        image = opened.convert("RGB")
    if image.size != example.size:
        image = image.resize(example.size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def sample_key(example: Example, pixels: torch.Tensor, fingerprint: str) -> str:
    digest = hashlib.sha256()
    for part in (example.sample_id, example.caption, fingerprint):
        digest.update(part.encode("utf-8") + b"\0")
    digest.update(pixels.numpy().tobytes())
    return digest.hexdigest()


def prompt_key(prompt: str, fingerprint: str) -> str:
    return hashlib.sha256(f"prompt\0{prompt}\0{fingerprint}".encode("utf-8")).hexdigest()


def encode_image(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of one image: mean and std, (16, H/8, W/8) each."""
    with torch.no_grad():
        posterior = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist
    return posterior.mean[0], posterior.std[0]


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_cached(path: Path, expected_id: str) -> dict[str, torch.Tensor] | None:
    """A cache entry, when it is this sample's and its tensors still hash to what was recorded
    when it was written; anything else (torn, foreign, a flipped bit) is recomputed, never trusted."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            recorded = handle.metadata() or {}
        if recorded.get("sample_id") != expected_id:
            return None
        tensors = load_file(str(path))
    except Exception as error:
        log.warning("train: ignoring unreadable cache file %s (%s); recomputing it", path, error)
        return None
    if recorded.get("sha256") != tensors_sha256(tensors):
        log.warning("train: cache file %s does not match the hash recorded when it was written (damaged on "
                    "disk, or written before entries were hashed); recomputing it", path)
        return None
    return tensors


def _write_cached(path: Path, tensors: dict[str, torch.Tensor], sample_id: str) -> None:
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata={"sample_id": sample_id, "sha256": tensors_sha256(plain)})
        sort_safetensors_header(tmp)


@dataclass
class Encoded:
    examples: list[Example]  # those that could be read and encoded
    samples: dict[str, dict[str, torch.Tensor]]  # sample id -> latent_mean, latent_std, prompt_embeds, pooled
    prompts: dict[str, dict[str, torch.Tensor]]  # sample prompt -> prompt_embeds, pooled_prompt_embeds
    sample_files: dict[str, str]  # sample id -> cache file name (its content hash)
    prompt_files: set[str]

    @property
    def files(self) -> set[str]:
        return set(self.sample_files.values()) | self.prompt_files


def build_cache(pipe, examples: list[Example], prompts: list[str], cache_dir: Path,
                model_cfg: DictConfig, show_progress: bool = True) -> Encoded:
    """Encodings for every example (by sample id) and every sample prompt (by prompt).

    Each entry is read from cache_dir when its content hash matches, else computed and written.
    A crop that cannot be encoded is reported and skipped.
    """
    from artmaster.models import prompt_embeddings

    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = encoder_fingerprint(model_cfg)
    max_len = int(model_cfg.max_sequence_length)
    kept, encodings, sample_files = [], {}, {}
    for example in tqdm(examples, desc="train: cache", unit="crop", disable=not show_progress):
        try:
            pixels = load_pixels(example)
        except OSError as error:
            log.error("train: skipping %s: %s", example.image_path, error)
            continue
        path = cache_dir / f"{sample_key(example, pixels, fingerprint)}.safetensors"
        entry = _read_cached(path, example.sample_id)
        if entry is None:
            mean, std = encode_image(pipe.vae, pixels)
            prompt_embeds, pooled = prompt_embeddings(pipe, [example.caption], max_len)
            entry = {"latent_mean": mean, "latent_std": std,
                     "prompt_embeds": prompt_embeds[0], "pooled_prompt_embeds": pooled[0]}
            _write_cached(path, entry, example.sample_id)
        encodings[example.sample_id] = entry
        kept.append(example)
        sample_files[example.sample_id] = path.name
    prompt_encodings, prompt_files = {}, set()
    for prompt in prompts:
        path = cache_dir / f"{prompt_key(prompt, fingerprint)}.safetensors"
        entry = _read_cached(path, prompt)
        if entry is None:
            prompt_embeds, pooled = prompt_embeddings(pipe, [prompt], max_len)
            entry = {"prompt_embeds": prompt_embeds[0], "pooled_prompt_embeds": pooled[0]}
            _write_cached(path, entry, prompt)
        prompt_encodings[prompt] = entry
        prompt_files.add(path.name)
    if not kept:
        raise ValueError(f"train: no crop could be encoded (see the errors above); cache {cache_dir}")
    return Encoded(kept, encodings, prompt_encodings, sample_files, prompt_files)


def prune_cache(cache_dir: Path, used: set[str]) -> None:
    """Drop encodings no longer referenced, so a persistent cache does not grow without bound."""
    for path in cache_dir.glob("*.safetensors"):
        if path.name not in used:
            path.unlink()


def free_encoders(pipe) -> None:
    """Training needs the transformer and, for samples, the VAE decoder: drop everything else."""
    pipe.text_encoder = None
    pipe.text_encoder_2 = None
    pipe.vae.encoder = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the batch plan: aspect buckets, repeats, epochs, ranks ------------------------------------


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


# --- batches and the training step ---------------------------------------------------------------


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


@dataclass(frozen=True)
class FlowSettings:
    vae_shift: float
    vae_scale: float
    guidance: float | None  # None for transformers without a guidance embedding
    logit_mean: float
    logit_std: float
    resolution_shift: bool
    orth_reg_weight: float
    model_dtype: torch.dtype  # the transformer's input dtype; the flow maths itself runs in fp32
    # compiled blocks: the transformer's inputs require grad, so the first double block, like every
    # later one, sees inputs that require grad and all share one graph (costs two tiny input-grad GEMMs)
    inputs_require_grad: bool = False


def flow_settings(cfg: DictConfig, transformer, vae_config, inputs_require_grad: bool = False) -> FlowSettings:
    flow = cfg.train.flow
    return FlowSettings(
        vae_shift=float(vae_config.shift_factor or 0.0),
        vae_scale=float(vae_config.scaling_factor),
        guidance=float(flow.guidance) if transformer.config.guidance_embeds else None,
        logit_mean=float(flow.logit_mean),
        logit_std=float(flow.logit_std),
        resolution_shift=bool(flow.resolution_shift),
        orth_reg_weight=float(cfg.train.adalora.orth_reg_weight),
        model_dtype=transformer.dtype,
        inputs_require_grad=inputs_require_grad,
    )


def flow_matching_loss(model, batch: Batch, flow: FlowSettings, generator: torch.Generator) -> torch.Tensor:
    """MSE between the predicted and the true velocity at a random noise level per sample."""
    latents = flux_math.vae_latents(batch.latent_mean, batch.latent_std, flow.vae_shift, flow.vae_scale, generator)
    tokens = flux_math.pack_latents(latents)
    noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    mu = flux_math.resolution_shift_mu(tokens.shape[1]) if flow.resolution_shift else None
    sigmas = flux_math.sample_sigmas(len(tokens), generator=generator, device=tokens.device,
                                     logit_mean=flow.logit_mean, logit_std=flow.logit_std, mu=mu)
    guidance = None if flow.guidance is None else flux_math.guidance_vector(flow.guidance, len(tokens), tokens.device)
    noisy = flux_math.noisy_latents(tokens, noise, sigmas).to(flow.model_dtype)
    prompt_embeds = batch.prompt_embeds
    if flow.inputs_require_grad and torch.is_grad_enabled():
        noisy, prompt_embeds = noisy.requires_grad_(), prompt_embeds.detach().requires_grad_()
    prediction = flux_math.predict_velocity(
        model, noisy, sigmas,
        prompt_embeds=prompt_embeds, pooled_prompt_embeds=batch.pooled_prompt_embeds,
        image_ids=batch.image_ids, txt_ids=batch.txt_ids, guidance=guidance,
    )
    return F.mse_loss(prediction.float(), flux_math.velocity_target(tokens, noise).float())


class AdapterEMA:
    """Exponential moving average of the trainable adapter tensors (fp32 shadow copies)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.shadow = [param.detach().float().clone() for param in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self):
        """Swap the averages in; singular values that AdaLoRA masked to zero stay zero."""
        live = [param.detach().clone() for param in self.params]
        with torch.no_grad():
            for name, param, average in zip(self.names, self.params, self.shadow):
                value = average * (param != 0) if ".lora_E." in name else average
                param.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, live):
                    param.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = [state[name].to(s.device, s.dtype) for name, s in zip(self.names, self.shadow)]


@dataclass
class TrainingState:
    """Everything one optimizer step touches."""

    accelerator: object
    model: torch.nn.Module  # the adapter model as prepared by accelerate (DDP-wrapped when distributed)
    adapter: torch.nn.Module  # the unwrapped peft model
    named_params: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: object
    allocator: object
    flow: FlowSettings
    max_grad_norm: float
    ema: AdapterEMA | None = None
    # add the orthogonal term's gradient straight into .grad once per step (adalora.add_orthogonal_gradient_)
    # instead of backpropagating it with the loss: the same gradient without ~1700 autograd nodes
    direct_orthogonal: bool = False
    cudagraphs: bool = False  # blocks compiled with CUDA graphs (train.cudagraphs): mark each new iteration
    compiled: bool = False  # blocks compiled for training (`compile_for_training`)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [param for _, param in self.named_params]


def build_training_state(cfg: DictConfig, transformer, vae_config, total_step: int, accelerator) -> TrainingState:
    """AdaLoRA around the transformer, fp32 adapter tensors, AdamW, lr schedule, allocator, EMA;
    on CUDA the levers of docs/performance.md (LoRA branch, compiled blocks, CUDA graphs)."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from artmaster import lora_branch
    from artmaster.adalora import FastRankAllocator, set_input_casting, wrap_with_adalora
    from artmaster.models import enable_checkpointing

    settings = cfg.train
    transformer.requires_grad_(False)
    if settings.gradient_checkpointing:  # non-reentrant: AdaLoRA needs every grad
        enable_checkpointing(transformer, float(settings.get("gradient_checkpointing_fraction", 1.0)))
    set_seed(int(cfg.seed))  # the adapter's initial values come from the global RNG
    adapter = wrap_with_adalora(transformer, settings.adalora, total_step)
    named_params = [(name, param) for name, param in adapter.named_parameters() if param.requires_grad]
    for _, param in named_params:
        param.data = param.data.float()  # bf16 base weights, fp32 adapter and optimizer state
    if accelerator.mixed_precision != "no":
        set_input_casting(adapter, False)  # autocast casts to bf16 anyway: skip peft's fp32 input copies
    optim = settings.optim
    on_cuda = all(param.is_cuda for _, param in named_params)
    lora_branch.configure(adapter, settings.get("lora_branch"), on_cuda)
    compiled, cudagraphs = compile_for_training(cfg, transformer, on_cuda)
    fused = on_cuda if optim.fused == "auto" else bool(optim.fused)
    optimizer = torch.optim.AdamW(
        [param for _, param in named_params], lr=float(optim.lr), betas=tuple(optim.betas),
        weight_decay=float(optim.weight_decay), eps=float(optim.eps), fused=fused,
    )
    scheduler = get_scheduler(
        settings.lr_schedule.name, optimizer,
        num_warmup_steps=round(float(settings.lr_schedule.warmup_fraction) * total_step),
        num_training_steps=total_step,
    )
    allocator = FastRankAllocator(adapter)
    model = accelerator.prepare(adapter)
    ema = AdapterEMA(named_params, float(settings.ema.decay)) if settings.ema.enabled else None
    max_norm = settings.optim.max_grad_norm
    return TrainingState(
        accelerator=accelerator, model=model, adapter=adapter, named_params=named_params,
        optimizer=optimizer, scheduler=scheduler, allocator=allocator,
        flow=flow_settings(cfg, transformer, vae_config, inputs_require_grad=compiled),
        max_grad_norm=float(max_norm) if max_norm else math.inf, ema=ema,
        direct_orthogonal=_direct_orthogonal(settings.adalora.get("orth_gradient", "autograd"), on_cuda),
        cudagraphs=cudagraphs, compiled=compiled,
    )


def compile_for_training(cfg: DictConfig, transformer, on_cuda: bool) -> tuple[bool, bool]:
    """On CUDA, `model.compile` or `train.cudagraphs`: the blocks compiled (regionally) for training,
    with CUDA graphs (mode reduce-overhead) when `train.cudagraphs`, one static graph per block class
    and bucket shape. Gradient checkpointing recomputes a block's forward inside the backward, a
    pattern not run with CUDA-graph replays yet: with it the blocks are compiled without graphs.
    Returns (compiled, cudagraphs)."""
    from artmaster.models import compile_blocks

    cudagraphs = bool(cfg.train.get("cudagraphs", False)) and on_cuda and not cfg.train.gradient_checkpointing
    setting = cfg.model.get("compile", False)
    compiled = on_cuda and (cudagraphs or setting not in (False, None))
    if compiled:
        mode = "reduce-overhead" if cudagraphs else (None if setting is True else str(setting))
        compile_blocks(transformer, dynamic=False, **({"mode": mode} if mode else {}))
    return compiled, cudagraphs


def _direct_orthogonal(mode: str, on_cuda: bool) -> bool:
    """`train.adalora.orth_gradient`: direct | autograd | auto (direct on CUDA)."""
    if mode not in ("auto", "direct", "autograd"):
        raise ValueError(f"train.adalora.orth_gradient={mode!r}: expected auto, direct or autograd")
    return mode == "direct" or (mode == "auto" and on_cuda)


def training_step(state: TrainingState, micro_batches: list[Batch], step: int,
                  generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
    """One optimizer step (step = 1, 2, ...): forward and backward of every micro-batch, clip,
    AdamW, lr schedule, AdaLoRA importance update and masking, EMA. Returns device tensors (no
    host sync) and the rank budget the allocator's schedule allows at this step (a host int)."""
    from artmaster.adalora import add_orthogonal_gradient_, orthogonal_penalty

    accelerator = state.accelerator
    count = len(micro_batches)
    mse_total = orth_total = 0.0
    for index, (batch, generator) in enumerate(zip(micro_batches, generators)):
        # gradients are all-reduced on the last micro-batch only
        sync = nullcontext() if index == count - 1 else accelerator.no_sync(state.model)
        with sync:
            if state.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # the graphs' previous outputs may be reused
            mse = flow_matching_loss(state.model, batch, state.flow, generator)
            if state.direct_orthogonal:
                accelerator.backward(mse / count)
            else:
                orth = orthogonal_penalty(state.adapter)
                accelerator.backward((mse + state.flow.orth_reg_weight * orth) / count)
                orth_total = orth_total + orth.detach() / count
        mse_total = mse_total + mse.detach() / count
    if state.direct_orthogonal:  # after the all-reduce: the term is the same on every rank
        orth_total = add_orthogonal_gradient_(state.adapter, state.flow.orth_reg_weight)
    grad_norm = accelerator.clip_grad_norm_(state.params, state.max_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    allocation = state.allocator.update_and_allocate(step)  # after the step, before zero_grad: it reads grads
    if state.ema is not None:
        state.ema.update()
    state.optimizer.zero_grad(set_to_none=True)
    return {"loss": mse_total + state.flow.orth_reg_weight * orth_total, "mse": mse_total,
            "orthogonal": orth_total, "grad_norm": grad_norm, "rank_budget": allocation.budget}


def active_rank(adapter) -> torch.Tensor:
    """Total number of unmasked singular values over all adapted modules (a device tensor)."""
    counts = [torch.count_nonzero(p) for n, p in adapter.named_parameters() if ".lora_E." in n]
    return torch.stack(counts).sum()


class NonFiniteWatch:
    """Remembers the first step whose loss or gradient norm was not finite, on the device, so the
    hot path never waits for the host; `check` (at logging and checkpoint steps) raises."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, step: int, out: dict[str, torch.Tensor]) -> None:
        bad = ~(torch.isfinite(out["loss"]) & torch.isfinite(out["grad_norm"]))
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.first_bad.new_full((), step), self.first_bad)

    def check(self, accelerator, last_checkpoint: Path | None) -> None:
        first_bad = self.first_bad
        if accelerator.num_processes > 1:
            first_bad = accelerator.reduce(first_bad.clone(), "max")
        step = int(first_bad)
        if step >= 0:
            kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                    else "no checkpoint was written yet")
            raise FloatingPointError(
                f"train: loss or gradient became NaN/inf at step {step}; stopped, {kept}. "
                "Lower train.optim.lr or set train.optim.max_grad_norm, then re-run (train.resume=auto "
                "continues from that checkpoint)."
            )


# --- validation and samples ----------------------------------------------------------------------


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


def render_samples(pipe, prompt_encodings, settings: DictConfig, device) -> list[tuple[str, int, Image.Image]]:
    """One image per (prompt, seed) at fixed settings, from the cached prompt embeddings."""
    images = []
    for prompt in settings.prompts:
        entry = prompt_encodings[prompt]
        for seed in settings.seeds:
            image = pipe(
                prompt_embeds=entry["prompt_embeds"][None].to(device, pipe.transformer.dtype),
                pooled_prompt_embeds=entry["pooled_prompt_embeds"][None].to(device, pipe.transformer.dtype),
                height=int(settings.height), width=int(settings.width),
                num_inference_steps=int(settings.steps), guidance_scale=float(settings.guidance),
                generator=torch.Generator(device=device).manual_seed(int(seed)),
            ).images[0]
            images.append((prompt, int(seed), image))
    return images


def sample_grid(samples: list[tuple[str, int, Image.Image]], step: int) -> Image.Image:
    """Rows = prompts (their text on the left), columns = seeds, titled with the step."""
    prompts = list(dict.fromkeys(prompt for prompt, _, _ in samples))
    seeds = list(dict.fromkeys(seed for _, seed, _ in samples))
    rows = [(prompt, [image for p, _, image in samples if p == prompt]) for prompt in prompts]
    return labelled_grid(rows, [f"seed {seed}" for seed in seeds], title=f"samples at step {step}")


# MLflow names of the logged rows. MLflow's run page shows one chart section per prefix, sections
# in alphabetical order: `loss` (train and val only) comes first, then the loss's two terms, the
# optimizer, AdaLoRA's ranks and `result` (log_summary's headline). loss.csv keeps the plain names.
METRIC_NAMES = {"loss": "loss/train", "val_loss": "loss/val", "mse": "objective/mse",
                "orthogonal": "objective/orthogonal", "grad_norm": "optim/grad_norm", "lr": "optim/lr",
                "rank_budget": "rank/budget", "active_rank": "rank/active"}


def mlflow_metrics(row: dict) -> dict[str, float]:
    return {METRIC_NAMES.get(key, key): value for key, value in row.items() if key != "step"}


# --- checkpoints ----------------------------------------------------------------------------------


def rng_states() -> dict:
    """Global RNG states (dropout and any library draw); our own draws use seeded generators."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(folder: Path, state: TrainingState, step: int, micro_batches_done: int, fingerprint: str,
                    history: list[dict], rng_by_rank: list[dict], keep: int) -> Path:
    """Write step-XXXXXX atomically (staged folder, then rename) and keep the newest `keep`."""
    target = folder / checkpoint_name(step)
    try:
        _write_checkpoint(target, state, step, micro_batches_done, fingerprint, history, rng_by_rank)
        fsync_dir(folder)  # the rename into place reaches the disk too
    except OSError as error:
        raise OSError(f"train: could not write checkpoint {target} ({error}); the previous checkpoints in "
                      f"{folder} are intact") from error
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _write_checkpoint(target: Path, state: TrainingState, step: int, micro_batches_done: int, fingerprint: str,
                      history: list[dict], rng_by_rank: list[dict]) -> None:
    with staged_dir(target) as staging:
        tensors = {name: param.detach().cpu().contiguous() for name, param in state.named_params}
        save_file(tensors, str(staging / "adapter.safetensors"))
        if state.ema is not None:
            averages = {k: v.cpu().contiguous() for k, v in state.ema.state_dict().items()}
            save_file(averages, str(staging / "ema.safetensors"))
        buffer = io.BytesIO()
        torch.save(
            {
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "allocator": state.allocator.state_dict(),
                "rng_by_rank": rng_by_rank,
                "history": history,
            },
            buffer,
        )
        (staging / "training_state.pt").write_bytes(buffer.getvalue())
        # the data position: the plan of batches is a pure function of the config, so the count of
        # micro-batches consumed on each rank is all a resumed run needs
        sealing.seal(staging, {"step": step, "micro_batches_done": micro_batches_done, "fingerprint": fingerprint})


def find_resume_checkpoint(folder: Path, resume: str, fingerprint: str) -> Path | None:
    """`auto`: the newest intact checkpoint of this exact recipe (damaged ones are skipped, saying
    so); `never`: none; else a given folder, which must verify."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"train.resume={resume}: no checkpoint there (expected {path / 'meta.json'})")
        if sealing.read_meta(sealing.verified(path, resume)).get("fingerprint") != fingerprint:
            raise ValueError(f"train.resume={resume}: that checkpoint is of another recipe, data, validation split "
                             "or schedule than this run; resume=auto starts afresh")
        return path
    return sealing.newest_intact(list_checkpoints(folder), fingerprint)


def load_checkpoint(path: Path, state: TrainingState, rank: int) -> tuple[int, list[dict]]:
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "adapter.safetensors"))
    with torch.no_grad():
        for name, param in state.named_params:
            if name not in tensors:
                raise KeyError(f"{path}: adapter.safetensors lacks {name} (a different target set?)")
            param.copy_(tensors[name])
    if state.ema is not None:
        state.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    saved = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.allocator.load_state_dict(saved["allocator"])
    set_rng_states(saved["rng_by_rank"][rank])
    return int(meta["step"]), list(saved["history"])


def run_fingerprint(cfg: DictConfig, sample_files: dict[str, str], world_size: int, setup: dict | None = None,
                    plan: dict | None = None) -> str:
    """Identity of a run's math, data and schedule: checkpoints resume only into the same recipe
    on the same crops, captions and encoders (the cache file names are their content hashes), the
    same trained crops per bucket and step count (`plan`), and, for retrain, the same starting
    adapter and fused LoRAs (`TrainSetup.identity`)."""
    train = resume_identity(OmegaConf.to_container(cfg.train, resolve=True))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    identity = {"train": train, "model": model, "seed": cfg.seed, "world_size": world_size, "data": sample_files}
    if plan is not None:
        identity["plan"] = plan
    if setup:
        identity["setup"] = setup
    return params_hash(identity)


# --- the stage ---------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Fine-tune an AdaLoRA adapter on the captioned crops; export it as peft and plain LoRA.
    Each further replicate (`replicates.count`) trains the same recipe with its own seed."""
    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process
    tracking = (stage_run(cfg, "train", sections=("train", "model", "replicates"), label=recipe_label(cfg))
                if is_main else nullcontext())
    with tracking:
        metrics = {}
        for replicate, replicate_cfg in replicates.each(cfg):
            child = child_run(cfg, "train", replicate.label) if is_main and not replicate.is_product else nullcontext()
            with child:
                result = train(replicate_cfg, accelerator, replicate.folder(output_dir(cfg)))
            if replicate.is_product:
                metrics = result
            elif is_main:
                metrics.setdefault("replicates", {})[replicate.label] = {
                    key: result[key] for key in ("loss", "val_loss", "active_rank") if key in result}
        return metrics


def recipe_label(cfg: DictConfig) -> str:
    """What tells training runs apart at a glance in MLflow: `r=8 lr=2e-4` (AdaLoRA target rank, lr)."""
    mantissa, exponent = f"{float(cfg.train.optim.lr):.2e}".split("e")
    lr = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"r={cfg.train.adalora.target_r} lr={lr}"


def make_accelerator(cfg: DictConfig):
    """accelerate's Accelerator for `cfg.train` (CPU threads, mixed precision, CPU or GPU)."""
    from accelerate import Accelerator

    settings = cfg.train
    use_cpu = cfg.model.device == "cpu" or not torch.cuda.is_available()
    if not use_cpu:
        # cuDNN's SDPA backward failed for FLUX shapes (torch 2.11, CUDA 13: `mha_graph.execute`, then an
        # illegal memory access); with it off, the flash backend runs (docs/performance.md, "Levers")
        torch.backends.cuda.enable_cudnn_sdp(False)
    return Accelerator(mixed_precision=str(settings.mixed_precision), cpu=use_cpu)


@dataclass(frozen=True)
class TrainSetup:
    """How a run of the loop differs from the train stage's (the defaults): `retrain` uses it to
    add the accepted ArtAug images, continue an adapter or train on a base with LoRAs fused in."""

    extra: tuple[Example, ...] = ()  # trained on besides the crops, never held out for validation
    extra_repeats: int = 1  # each extra example appears this many times for every time a crop does
    train_crops: bool = True  # False: the crops only give the validation set (the held ones are encoded)
    init_adapter: Path | None = None  # a peft AdaLoRA folder (train's adapter/) to continue from
    fuse: tuple[Path, ...] = ()  # plain diffusers LoRA folders fused into the base transformer first
    note: str = ""  # a paragraph for the model card: how this adapter was made

    def identity(self) -> dict:
        """What the checkpoints' fingerprint must add for this setup ({} for the train stage's)."""
        if self == TrainSetup():
            return {}
        def weights(folder: Path) -> dict[str, str]:  # by content, so a moved workspace still resumes
            return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
                    for path in sorted(Path(folder).rglob("*.safetensors"))}

        return {"extra_repeats": self.extra_repeats, "train_crops": self.train_crops,
                "init_adapter": weights(self.init_adapter) if self.init_adapter else None,
                "fuse": [weights(folder) for folder in self.fuse]}


def train(cfg: DictConfig, accelerator, out: Path, setup: TrainSetup | None = None) -> dict:
    """The training loop, writing everything into `out`; `setup` (retrain) changes its data,
    starting adapter and base model, the defaults are the train stage's."""
    from artmaster.adalora import fuse_lora_, load_adalora_weights_
    from artmaster.models import load_pipeline, truncation_reported

    setup = setup or TrainSetup()
    settings = cfg.train
    is_main = accelerator.is_main_process
    device = accelerator.device
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        _tag_run(cfg)

    # 1. data: crops + captions, encoded once (the main process writes the cache, others read it)
    examples = load_examples(cfg)
    if not setup.train_crops:  # the crops only validate: encode the held ones
        held = _held_out_ids([e.sample_id for e in examples], settings.validation, cfg.seed)
        examples = [e for e in examples if e.sample_id in held]
    pipe = load_pipeline(cfg.model)
    for folder in setup.fuse:
        modules = fuse_lora_(pipe.transformer, folder)
        if is_main:
            print(f"train: fused the LoRA in {folder} into the base ({modules} modules)")
    texts = [e.caption for e in examples + list(setup.extra)] + list(settings.samples.prompts)
    with accelerator.main_process_first(), truncation_reported(pipe, texts, int(cfg.model.max_sequence_length),
                                                               "train", report=is_main):
        encoded = build_cache(pipe, examples + list(setup.extra), list(settings.samples.prompts), out / "cache",
                              cfg.model, show_progress=is_main)
    if is_main:
        prune_cache(out / "cache", encoded.files)
    free_encoders(pipe)
    pipe.set_progress_bar_config(disable=True)
    extra_ids = {e.sample_id for e in setup.extra}
    extra = [e for e in encoded.examples if e.sample_id in extra_ids]
    examples = [e for e in encoded.examples if e.sample_id not in extra_ids]
    prompt_encodings = encoded.prompts
    encodings = on_device(encoded.samples, device, pipe.transformer.dtype)

    # 2. plan: hold out validation samples (crops only), bucket by size, batches for every epoch
    held = _held_out_ids([e.sample_id for e in examples], settings.validation, cfg.seed)
    train_ids = [e for e in examples
                 if setup.train_crops and not (settings.validation.hold_out and e.sample_id in held)]
    if not train_ids and not extra:
        raise ValueError("train: every crop is held out for validation; lower train.validation.num_samples")
    ids_by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for example in train_ids:
        ids_by_size[example.size].append(example.sample_id)
    for example in extra:
        ids_by_size[example.size] += [example.sample_id] * int(setup.extra_repeats)
    accumulation = int(settings.gradient_accumulation)
    plan = process_batches(ids_by_size, epochs=int(settings.epochs), repeats=int(settings.repeats),
                           batch_size=int(settings.batch_size), world_size=accelerator.num_processes,
                           process_index=accelerator.process_index, seed=int(cfg.seed))
    total_step = optimizer_steps(len(plan), accumulation)

    # 3. model: AdaLoRA, optimizer, schedule, allocator; resume
    state = build_training_state(cfg, pipe.transformer, pipe.vae.config, total_step, accelerator)
    if setup.init_adapter is not None:
        ranks = load_adalora_weights_(state.adapter, setup.init_adapter)
        if state.ema is not None:  # the average starts from the adapter continued
            state.ema = AdapterEMA(state.named_params, float(settings.ema.decay))
        if is_main:
            # the model starts exactly at the saved adapter (masked triplets at zero); the schedule then
            # runs again, so its warm-up may revive them (up to init_r per module) before the budget
            # shrinks back to target_r: the new data can move ranks between modules
            print(f"train: continuing the adapter in {setup.init_adapter} ({sum(ranks.values())} ranks kept; "
                  "masked ranks may come back during the warm-up, then the budget shrinks to target_r again)")
    fingerprint = run_fingerprint(cfg, encoded.sample_files, accelerator.num_processes, setup.identity(),
                                  {"buckets": {f"{w}x{h}": ids for (w, h), ids in sorted(ids_by_size.items())},
                                   "total_step": total_step})
    checkpoints = out / "checkpoints"
    resume_from = find_resume_checkpoint(checkpoints, str(settings.resume), fingerprint)
    start_step, history = 0, []
    if resume_from is not None:
        start_step, history = load_checkpoint(resume_from, state, accelerator.process_index)
        if is_main:
            print(f"train: resuming from {resume_from} (step {start_step} of {total_step})")
    accelerator.wait_for_everyone()  # every rank has chosen before stale checkpoints go
    if resume_from is None and is_main and checkpoints.exists():
        stale = list_checkpoints(checkpoints)
        if stale:
            print(f"train: not resuming: the {len(stale)} checkpoint(s) in {checkpoints} are of another recipe, "
                  "data, validation split or schedule, or damaged; removed, training from step 0")
        remove_folder(checkpoints)
    vset = validation_set(encodings, sorted(held), list(settings.validation.sigmas), int(cfg.seed), state.flow, device)
    if is_main:
        _log_plan(cfg, examples, ids_by_size, total_step, len(held), start_step)
        if setup != TrainSetup():
            print(f"train: + {len(extra)} extra images x {setup.extra_repeats}; crops trained on: "
                  f"{setup.train_crops}; LoRAs fused into the base: {len(setup.fuse)}")

    # 4. loop over optimizer steps
    watch = NonFiniteWatch(device)
    last_checkpoint = resume_from
    window: list[dict[str, torch.Tensor]] = []
    evaluation_seconds, loop_start = 0.0, time.perf_counter()
    samples_dir = out / "samples"
    if is_main and start_step == 0:
        evaluation_seconds += _evaluate(cfg, state, pipe, prompt_encodings, vset, 0, samples_dir, history)
    progress = tqdm(range(start_step + 1, total_step + 1), desc="train", unit="step", disable=not is_main,
                    initial=start_step, total=total_step)
    rate = SteadyRate()
    for step in progress:
        micro_batches = [make_batch(encodings, ids) for ids in plan[(step - 1) * accumulation : step * accumulation]]
        generators = [keyed_generator(cfg.seed, "step", accelerator.process_index, step, i, device=device)
                      for i in range(accumulation)]
        out_step = training_step(state, micro_batches, step, generators)
        watch.observe(step, out_step)
        window.append(out_step)
        last = step == total_step
        if step % int(settings.log_every) == 0 or last:
            watch.check(accelerator, last_checkpoint)
            row = _log_row(state, window, step)
            steps_per_second = rate.window(len(window))
            window = []
            history.append(row)
            if is_main:
                import mlflow

                mlflow.log_metrics(mlflow_metrics(row), step=step)
                progress.set_postfix(loss=f"{row['loss']:.4f}", rank=row["active_rank"],
                                     steps_per_s=f"{steps_per_second:.2f}")
        validate, sample = _due(step, settings.validation.every, last), _due(step, settings.samples.every, last)
        if is_main and (validate or sample):
            seconds = _evaluate(cfg, state, pipe, prompt_encodings, vset, step, samples_dir, history,
                                validate=validate, sample=sample)
            evaluation_seconds += seconds
            rate.exclude(seconds)
        if _due(step, settings.checkpoint.every, last):
            watch.check(accelerator, last_checkpoint)
            rng_by_rank = _gather(accelerator, rng_states())
            if is_main:
                last_checkpoint = save_checkpoint(checkpoints, state, step, step * accumulation, fingerprint,
                                                  history, rng_by_rank, int(settings.checkpoint.keep))
    loop_seconds = time.perf_counter() - loop_start

    # 5. every rank must hold the same adapter (DDP + allocator masks agree)
    checksums = _gather(accelerator, _adapter_checksum(state))
    if len(set(checksums)) != 1:
        raise RuntimeError(f"train: DDP ranks ended with different adapters: {checksums}")
    if not is_main:
        return {}
    steps_run = total_step - start_step
    metrics = _final_metrics(history, steps_run, loop_seconds - evaluation_seconds, total_step, len(examples))
    metrics.update(wall_seconds=loop_seconds, evaluation_seconds=evaluation_seconds)
    if rate.steady is not None:
        metrics["steady_steps_per_second"] = rate.steady
    metrics["rank_checksums"] = checksums
    if setup != TrainSetup():
        metrics["extra_examples"] = len(extra)
        metrics["crops_trained"] = len(train_ids)
    _export(cfg, state, out, history, metrics, setup.note)
    if not settings.checkpoint.keep_after_success and checkpoints.exists():
        remove_folder(checkpoints)
    print(f"train: {total_step} steps, final loss {metrics['loss']:.4f}, "
          f"val {metrics.get('val_loss', float('nan')):.4f}, "
          f"{metrics['active_rank']} ranks kept; outputs in {out}")
    return metrics


# --- helpers of the stage ---------------------------------------------------------------------


class SteadyRate:
    """Optimizer steps per second between logged rows (each row's host sync makes a window's time
    exact), validation and samples excluded. `steps_per_second` in metrics.json divides all steps by
    all training time, compiling and CUDA-graph recording included; the median over windows,
    `steady`, is the rate once those are done."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self._mark = time.perf_counter()
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def window(self, steps: int) -> float:
        now = time.perf_counter()
        busy = now - self._mark - self._excluded
        self._mark, self._excluded = now, 0.0
        if busy > 0:
            self.rates.append(steps / busy)
        return self.rates[-1] if self.rates else 0.0

    @property
    def steady(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


def _due(step: int, every, last: bool) -> bool:
    """Periodic work every `every` steps and at the end; `every` 0/null means only at the end."""
    return last or bool(every) and step % int(every) == 0


def _gather(accelerator, value) -> list:
    from accelerate.utils import gather_object

    return gather_object([value]) if accelerator.num_processes > 1 else [value]


def _adapter_checksum(state: TrainingState) -> str:
    digest = hashlib.sha256()
    for name, param in state.named_params:
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _held_out_ids(ids: list[str], validation: DictConfig, seed: int) -> set[str]:
    count = min(int(validation.num_samples), len(ids))
    order = torch.randperm(len(ids), generator=keyed_generator(seed, "validation-ids")).tolist()
    return {ids[i] for i in order[:count]}


def _log_row(state: TrainingState, window: list[dict[str, torch.Tensor]], step: int) -> dict:
    """Means over the logging window: the one host sync of the loop."""
    keys = ("loss", "mse", "orthogonal", "grad_norm")
    stacked = torch.stack([torch.stack([out[k].float() for out in window]).mean() for k in keys]
                          + [active_rank(state.adapter).float()])
    values = stacked.tolist()
    row = {"step": step, **dict(zip(keys, values[:-1]))}
    row["lr"] = state.scheduler.get_last_lr()[0]
    row["rank_budget"] = window[-1]["rank_budget"]
    row["active_rank"] = int(values[-1])
    return row


def _evaluate(cfg, state: TrainingState, pipe, prompt_encodings, vset: ValidationSet, step: int, samples_dir: Path,
              history: list[dict], validate: bool = True, sample: bool = True) -> float:
    """Validation loss and sample images at `step` (main process only); returns seconds spent."""
    import mlflow

    started = time.perf_counter()
    ema = state.ema.applied() if state.ema is not None else nullcontext()
    from artmaster.models import eager_blocks

    # CUDA-graph blocks cannot run inference block after block: evaluate with eager blocks
    eager = eager_blocks(pipe.transformer) if state.cudagraphs else nullcontext()
    with ema, eager, state.accelerator.autocast():
        if validate and vset.batches:
            value = float(validation_loss(state.adapter, vset, state.flow))
            mlflow.log_metric(METRIC_NAMES["val_loss"], value, step=step)
            history.append({"step": step, "val_loss": value})
        if sample and cfg.train.samples.enabled and cfg.train.samples.prompts:
            samples = render_samples(pipe, prompt_encodings, cfg.train.samples, state.accelerator.device)
            prompts = list(cfg.train.samples.prompts)
            for prompt, seed, image in samples:  # one slider per prompt and seed, the step on the slider
                mlflow.log_image(captioned(image, f"seed {seed}: {prompt}"),
                                 key=f"prompt {prompts.index(prompt)} seed {seed}", step=step)
            samples_dir.mkdir(parents=True, exist_ok=True)
            grid_path = samples_dir / f"{checkpoint_name(step)}.png"
            buffer = io.BytesIO()
            sample_grid(samples, step).save(buffer, format="PNG")
            write_atomic(grid_path, buffer.getvalue())
            mlflow.log_artifact(str(grid_path), artifact_path="samples")
    return time.perf_counter() - started


def _final_metrics(history: list[dict], steps_run: int, train_seconds: float, total_step: int, examples: int) -> dict:
    rows = [row for row in history if "loss" in row]
    validations = [row["val_loss"] for row in history if "val_loss" in row]
    metrics = {
        "loss": rows[-1]["loss"],
        "mse": rows[-1]["mse"],
        "orthogonal": rows[-1]["orthogonal"],
        "orthogonal_first": rows[0]["orthogonal"],
        "grad_norm": rows[-1]["grad_norm"],
        "active_rank": rows[-1]["active_rank"],
        "steps": total_step,
        "examples": examples,
        "steps_per_second": steps_run / train_seconds if steps_run and train_seconds > 0 else None,
    }
    if validations:
        metrics["val_loss"] = validations[-1]
        metrics["val_loss_first"] = validations[0]
    return {k: v for k, v in metrics.items() if v is not None}


# what `_export` writes into the output folder, replaced together (metrics.json, the sign of a
# finished run, last)
EXPORTED = ("adapter", "lora", "ranks.json", "ranks.png", "loss.csv", "val_loss.csv", "headline.json", "metrics.json")
def _export(cfg: DictConfig, state: TrainingState, out: Path, history: list[dict], metrics: dict,
            note: str = "") -> None:
    """peft folder, plain LoRA + model card, rank report and heatmap, metrics.json, loss.csv: all
    written first and then replacing the previous run's together, so a failure (e.g. every module
    at rank 0) leaves the previous outputs whole."""
    import mlflow

    from artmaster.adalora import export_lora, rank_heatmap, rank_report, save_lora

    ema = state.ema.applied() if state.ema is not None else nullcontext()
    with replace_together(out, EXPORTED) as staging:
        with ema:
            state.adapter.save_pretrained(str(staging / "adapter"))
            exported = export_lora(state.adapter)
        ranks = rank_report(exported)
        metrics.update(rank_total=sum(ranks.values()), rank_min=min(ranks.values()),
                       rank_max=max(ranks.values()), rank_modules=len(ranks))
        base_model = base_model_name(cfg.model)
        files = save_lora(exported, staging / "lora", base_model=base_model, trigger=str(cfg.train.trigger),
                          metadata={"recipe": training_recipe(cfg), "metrics": lora_metrics(metrics)},
                          dtype=str(cfg.train.export.dtype), kohya=bool(cfg.train.export.kohya))
        card = model_card(cfg, base_model, ranks, lora_metrics(metrics), {k: Path(v).name for k, v in files.items()},
                          note)
        (staging / "lora" / "README.md").write_text(card, encoding="utf-8")
        (staging / "ranks.json").write_text(json.dumps(ranks, indent=2), encoding="utf-8")
        rank_heatmap(ranks, staging / "ranks.png")
        buffer = io.StringIO()
        columns = ["step", "loss", "mse", "orthogonal", "grad_norm", "lr", "rank_budget", "active_rank"]
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row for row in history if "loss" in row)
        (staging / "loss.csv").write_text(buffer.getvalue(), encoding="utf-8")
        validation = "".join(f"{row['step']},{row['val_loss']}\n" for row in history if "val_loss" in row)
        # plotted with loss.csv by dvc.yaml
        (staging / "val_loss.csv").write_text("step,val_loss\n" + validation, encoding="utf-8")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        log_summary(headline(metrics), details=metrics, folder=staging,  # headline.json
                    note=f"{metrics['steps']} optimizer steps on {metrics['examples']} crops; adapter in "
                         f"`{out / 'lora'}`.")
    for name in ("adapter", "lora"):
        mlflow.log_artifacts(str(out / name), artifact_path=name)
    for name in ("ranks.json", "ranks.png", "metrics.json", "loss.csv", "val_loss.csv"):
        mlflow.log_artifact(str(out / name))


def headline(metrics: dict) -> dict:
    """The numbers `dvc metrics show` and the MLflow runs table show for a training run."""
    names = {"loss": "loss", "val_loss": "val_loss", "ranks": "rank_total"}
    return {name: metrics[key] for name, key in names.items() if key in metrics}


def _tag_run(cfg: DictConfig) -> None:
    import mlflow
    from hydra.core.hydra_config import HydraConfig

    tags = {"train.seed": str(cfg.seed)}
    if HydraConfig.initialized():
        tags["hydra_job_overrides"] = " ".join(HydraConfig.get().overrides.task)[:5000]
    mlflow.set_tags(tags)
    mlflow.log_param("seed", cfg.seed)


def _log_plan(cfg, examples, ids_by_size, total_step: int, held: int, start_step: int) -> None:
    import mlflow

    buckets = ", ".join(f"{w}x{h}: {len(ids)}" for (w, h), ids in sorted(ids_by_size.items()))
    print(f"train: {len(examples)} crops ({held} held for validation), buckets {buckets}; "
          f"{total_step} optimizer steps")
    mlflow.log_params({"plan.optimizer_steps": total_step, "plan.crops": len(examples), "plan.held_out": held,
                       "plan.resumed_from_step": start_step, "plan.buckets": buckets})


main = hydra_entry(run)

if __name__ == "__main__":
    main()
