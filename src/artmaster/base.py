"""Stage `base`: the model that every adapter is trained on top of.

- `tiny`: FLUX.1's classes at tiny sizes paint noise with random weights, and nothing an adapter
  learns on top of noise could show. So this stage pretrains the tiny VAE and transformer from
  scratch, for a few CPU minutes, on a generic procedural landscape corpus (the painter
  generator's styles other than the demo painter's, captioned by the template captioner without
  the trigger phrase), and saves the pipeline with `save_pretrained` to data/base/pipeline, which
  `load_pipeline` then reads like a FLUX.1-dev folder.
- `flux_dev`: checks that the weights are present locally (never downloads) and records the
  revision and the sha256 of every safetensors file in data/base/weights.json.
- `flux_dev_random`: records the architecture in data/base/weights.json.

Outputs in data/base/: metrics.json, and for tiny pipeline/, samples.png, reconstruction.png.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from artmaster import flux_math
from artmaster.config import hydra_entry, stage_dir
from artmaster.files import image_grid, staged_dir, write_atomic
from artmaster.generate import encode_prompts, generate_images
from artmaster.tracking import active, log_summary, stage_run

log = logging.getLogger(__name__)


# --- corpus ------------------------------------------------------------------------------------


@dataclass
class CorpusImage:
    style: str
    size: tuple[int, int]  # (width, height): the bucket
    image: Image.Image
    caption: str


def corpus_caption(image: Image.Image, caption_cfg: DictConfig) -> str:
    """The template captioner's content, palette, tone and composition words, without the trigger."""
    from artmaster.caption_words import describe

    return caption_cfg.separator.join(describe(image, caption_cfg.template))


def random_window(size: tuple[int, int], aspect: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The largest (left, top, right, bottom) box of width/height `aspect` inside `size`, placed at random."""
    width, height = size
    box_w, box_h = (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
    left = int(rng.integers(0, width - box_w + 1))
    top = int(rng.integers(0, height - box_h + 1))
    return left, top, left + box_w, top + box_h


def paint_paintings(corpus: DictConfig, count: int, exclude: list[str]) -> list[tuple[str, Image.Image]]:
    """`count` paintings of `corpus.size` from the painter styles not in `exclude`, painted at
    `paint_scale` times that size (finer strokes and dots, as in the downscaled demo crops)."""
    from artmaster.painter import generic_corpus

    width, height = corpus.size
    big = (width * corpus.paint_scale, height * corpus.paint_scale)
    paintings = generic_corpus(count, big, corpus.seed, exclude=exclude)
    return list(tqdm(paintings, total=count, desc="base: paint", unit="painting"))


def build_corpus(corpus: DictConfig, caption_cfg: DictConfig) -> list[CorpusImage]:
    """Each painting cut to every bucket (largest window of the bucket's aspect, random position,
    as the crop stage cuts scans) and captioned."""
    rng = np.random.default_rng(corpus.seed)
    items = []
    for style, painting in paint_paintings(corpus, corpus.paintings, list(corpus.exclude_styles)):
        for width, height in corpus.buckets:
            box = random_window(painting.size, width / height, rng)
            image = painting.resize((width, height), Image.Resampling.LANCZOS, box=box)
            items.append(CorpusImage(style, (width, height), image, corpus_caption(image, caption_cfg)))
    return items


def heldout_paintings(corpus: DictConfig) -> list[tuple[str, Image.Image]]:
    """Paintings of the excluded styles (never trained on): how well the VAE encodes them."""
    from artmaster.painter import STYLES

    heldout = [name for name in corpus.exclude_styles if name in STYLES]
    if not heldout or corpus.heldout_per_style < 1:
        return []
    others = [name for name in STYLES if name not in heldout]
    return [
        (style, painting.resize(tuple(corpus.size), Image.Resampling.LANCZOS))
        for style, painting in paint_paintings(corpus, corpus.heldout_per_style * len(heldout), others)
    ]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def to_image(tensor: torch.Tensor) -> Image.Image:
    array = ((tensor.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


# --- training helpers --------------------------------------------------------------------------


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def random_crops(images: list[torch.Tensor], count: int, crop: int, shuffle_channels: bool,
                 generator: torch.Generator) -> torch.Tensor:
    """`count` random crop x crop patches, randomly mirrored (and with shuffled RGB channels)."""
    patches = []
    for _ in range(count):
        image = images[int(torch.randint(len(images), (1,), generator=generator))]
        _, height, width = image.shape
        top = int(torch.randint(height - crop + 1, (1,), generator=generator))
        left = int(torch.randint(width - crop + 1, (1,), generator=generator))
        patch = image[:, top : top + crop, left : left + crop]
        if bool(torch.randint(2, (1,), generator=generator)):
            patch = patch.flip(-1)
        if shuffle_channels:
            patch = patch[torch.randperm(3, generator=generator)]
        patches.append(patch)
    return torch.stack(patches)


@torch.no_grad()
def fix_posterior_logvar(vae, logvar: float) -> None:
    """Make the posterior's log-variance one constant everywhere (the encoder's last conv emits
    mean and log-variance channels).

    A learned variance starts near 1, so the decoder would see mostly noise and learn little in a
    few hundred steps; and trained on small crops, it drifts to huge values (std > 1000 seen) at
    places of full-size images the crops never showed, which then poisons the latent statistics
    and every latent the transformer trains on.
    """
    conv = vae.encoder.conv_out
    channels = vae.config.latent_channels
    conv.weight[channels:] = 0.0
    conv.bias[channels:] = logvar


def chroma_channels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 2, H, W) colour differences B - Y and R - Y (Y: Rec. 601 luma)."""
    red, green, blue = images.unbind(1)
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    return torch.stack([blue - luma, red - luma], dim=1)


def train_vae(vae, images: list[torch.Tensor], settings: DictConfig, generator: torch.Generator) -> list[float]:
    """Reconstruction (L1 + MSE + coarse L1) plus a small KL term on random crops, with a fixed
    posterior variance; returns the L1 per step."""
    tracker = active()
    vae.train().requires_grad_(True)
    fix_posterior_logvar(vae, settings.posterior_logvar)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, settings.warmup_steps, settings.steps)
    l1_history = []
    for step in tqdm(range(settings.steps), desc="base: vae", unit="step"):
        batch = random_crops(images, settings.batch_size, settings.crop, settings.shuffle_channels, generator)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        l1 = (recon - batch).abs().mean()
        mse = (recon - batch).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        # colour layout (blurred images) learns slowly under a plain per-pixel loss, yet it is what
        # the base model's generations and an adapter's palette shift are judged by
        coarse_recon, coarse_batch = F.avg_pool2d(recon, settings.coarse_pool), F.avg_pool2d(batch, settings.coarse_pool)
        coarse = (coarse_recon - coarse_batch).abs().mean()
        chroma_recon, chroma_batch = F.avg_pool2d(recon, settings.chroma_pool), F.avg_pool2d(batch, settings.chroma_pool)
        chroma = (chroma_channels(chroma_recon) - chroma_channels(chroma_batch)).abs().mean()
        loss = (l1 + settings.mse_weight * mse + settings.coarse_weight * coarse + settings.chroma_weight * chroma
                + settings.kl_weight * kl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        fix_posterior_logvar(vae, settings.posterior_logvar)
        schedule.step()
        l1_history.append(l1.item())
        if step % settings.log_every == 0 or step == settings.steps - 1:
            tracker.log_metrics({"vae/l1": l1.item(), "vae/mse": mse.item(), "vae/coarse_l1": coarse.item(),
                                 "vae/chroma_l1": chroma.item(), "vae/kl": kl.item(),
                                 "vae/lr": schedule.get_last_lr()[0]}, step=step)
    vae.eval().requires_grad_(False)
    return l1_history


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of each image, raw (before shift and scale)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Decode of the posterior mean: what the VAE keeps of each image."""
    return torch.cat([
        vae.decode(vae.encode(images[start : start + batch_size]).latent_dist.mean).sample
        for start in range(0, len(images), batch_size)
    ])


@dataclass
class LatentBucket:
    """Cached VAE posteriors of one bucket's images (and their mirror images)."""

    size: tuple[int, int]  # (width, height) in pixels
    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor
    caption_index: torch.Tensor  # (N,) rows of the caption embedding table


def latent_statistics(buckets: list[LatentBucket], generator: torch.Generator) -> tuple[float, float]:
    """(shift, scale) that bring the corpus's latent samples to mean 0 and std 1, as FLUX's
    0.1159 / 0.3611 do for its VAE."""
    samples = torch.cat([
        (bucket.mean + bucket.std * torch.randn(bucket.mean.shape, generator=generator)).flatten()
        for bucket in buckets
    ])
    return float(samples.mean()), float(1.0 / samples.std())


def train_transformer(transformer, buckets: list[LatentBucket], embeds: torch.Tensor, pooled: torch.Tensor,
                      vae_config, settings: DictConfig, generator: torch.Generator) -> list[float]:
    """FLUX flow matching: packed 2x2 latents with position ids, logit-normal noise levels (with
    the sampler's resolution shift), velocity target, fixed guidance; one bucket per batch."""
    tracker = active()
    transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = warmup_cosine(optimizer, settings.warmup_steps, settings.steps)
    txt_ids = flux_math.text_ids(embeds.shape[1])
    layouts = []
    for bucket in buckets:
        latent_h, latent_w = bucket.mean.shape[-2:]
        tokens = (latent_h // 2) * (latent_w // 2)
        mu = flux_math.resolution_shift_mu(tokens) if settings.resolution_shift else None
        layouts.append((flux_math.latent_image_ids(latent_h, latent_w), mu))
    # batches drawn from each bucket in proportion to its size
    bucket_weights = torch.tensor([len(bucket.mean) for bucket in buckets], dtype=torch.float32)
    guidance = flux_math.guidance_vector(settings.guidance, settings.batch_size)
    losses = []
    for step in tqdm(range(settings.steps), desc="base: transformer", unit="step"):
        which = int(torch.multinomial(bucket_weights, 1, generator=generator))
        bucket, (image_ids, mu) = buckets[which], layouts[which]
        rows = torch.randint(len(bucket.mean), (settings.batch_size,), generator=generator)
        latents = flux_math.vae_latents(bucket.mean[rows], bucket.std[rows], vae_config.shift_factor,
                                        vae_config.scaling_factor, generator=generator)
        clean = flux_math.pack_latents(latents)
        noise = torch.randn(clean.shape, generator=generator)
        sigmas = flux_math.sample_sigmas(settings.batch_size, generator=generator, logit_mean=settings.logit_mean,
                                         logit_std=settings.logit_std, mu=mu)
        captions = bucket.caption_index[rows]
        prediction = flux_math.predict_velocity(
            transformer, flux_math.noisy_latents(clean, noise, sigmas), sigmas,
            prompt_embeds=embeds[captions], pooled_prompt_embeds=pooled[captions],
            image_ids=image_ids, txt_ids=txt_ids, guidance=guidance,
        )
        loss = F.mse_loss(prediction, flux_math.velocity_target(clean, noise))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % settings.log_every == 0 or step == settings.steps - 1:
            tracker.log_metrics({"flow/loss": loss.item(), "flow/grad_norm": grad_norm.item(),
                                 "flow/lr": schedule.get_last_lr()[0]}, step=step)
    transformer.eval().requires_grad_(False)
    return losses


def _tail_mean(values: list[float], share: float = 0.1) -> float:
    """Mean of the last `share` of a loss curve: a final value that one noisy batch cannot swing."""
    tail = values[-max(1, int(len(values) * share)) :]
    return float(sum(tail) / len(tail))


# --- tiny profile ------------------------------------------------------------------------------


class PhaseClock:
    """Wall and CPU seconds (all threads of this process) of consecutive phases. On a shared
    machine the wall time grows with the other processes' load; the CPU time much less."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._start = (time.perf_counter(), time.process_time())

    def lap(self, phase: str) -> None:
        """Close `phase` (the time since the previous lap) and start the next."""
        now = (time.perf_counter(), time.process_time())
        self.wall[phase], self.cpu[phase] = now[0] - self._start[0], now[1] - self._start[1]
        self._start = now


def check_vae_groups(vae_arch: DictConfig) -> None:
    """ValueError unless every GroupNorm of the VAE normalises groups of at least two channels.

    With one channel per group, each feature map is shifted to mean 0 and scaled to std 1 on its
    own at every norm layer: an image's mean colour and brightness are erased (only image borders
    leak some back), and the VAE reconstructs every painting in the same grey-blue.
    """
    groups, channels = vae_arch.norm_num_groups, list(vae_arch.block_out_channels)
    if any(width % groups for width in channels):
        raise ValueError(f"model.architecture.vae.norm_num_groups={groups} does not divide every block of "
                         f"block_out_channels={channels}")
    narrowest = min(channels)
    if narrowest // groups < 2:
        raise ValueError(f"model.architecture.vae.norm_num_groups={groups} leaves one channel per GroupNorm group "
                         f"in the {narrowest}-channel blocks: every channel is normalised on its own and the VAE "
                         f"cannot carry an image's colour (reconstructions come out grey); use at most "
                         f"{narrowest // 2} groups")


def pretrain_tiny(cfg: DictConfig, staging: Path) -> dict:
    """Paint and caption the corpus, train the VAE, cache latents, train the transformer, save."""
    from artmaster.models import build_random_pipeline

    settings = cfg.base
    check_vae_groups(cfg.model.architecture.vae)
    clock = PhaseClock()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    corpus = build_corpus(settings.corpus, cfg.caption)
    heldout = heldout_paintings(settings.corpus)
    clock.lap("corpus")

    pipe = build_random_pipeline(cfg.model)
    vae_losses = train_vae(pipe.vae, [to_tensor(item.image) for item in corpus], settings.vae, generator)
    clock.lap("vae")

    captions = sorted({item.caption for item in corpus})
    caption_row = {caption: row for row, caption in enumerate(captions)}
    text = encode_prompts(pipe, captions, cfg.model.max_sequence_length)
    embeds = torch.cat([text[(caption, cfg.model.max_sequence_length)][0] for caption in captions])
    pooled = torch.cat([text[(caption, cfg.model.max_sequence_length)][1] for caption in captions])
    buckets = []
    for size in dict.fromkeys(item.size for item in corpus):
        members = [item for item in corpus if item.size == size]
        images = torch.stack([to_tensor(item.image) for item in members])
        rows = torch.tensor([caption_row[item.caption] for item in members])
        if settings.transformer.flip:
            images, rows = torch.cat([images, images.flip(-1)]), torch.cat([rows, rows])
        mean, std = encode_images(pipe.vae, images, settings.vae.batch_size)
        buckets.append(LatentBucket(size, mean, std, rows))
    shift, scale = latent_statistics(buckets, generator)
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    clock.lap("latents")

    flow_losses = train_transformer(pipe.transformer, buckets, embeds, pooled, pipe.vae.config,
                                    settings.transformer, generator)
    clock.lap("transformer")

    recon_metrics = write_reconstruction(pipe.vae, corpus, heldout, settings, staging / "reconstruction.png")
    samples = settings.samples
    prompts = [prompt for prompt in samples.prompts for _ in samples.seeds]
    images = generate_images(
        pipe, prompts, [seed for _ in samples.prompts for seed in samples.seeds],
        height=samples.height, width=samples.width, steps=samples.steps, guidance=samples.guidance,
        max_sequence_length=cfg.model.max_sequence_length, batch_size=samples.batch_size,
    )
    # rows are prompts (listed in MLflow's sample_prompts.txt), columns seeds
    labels = [f"prompt {row} seed {seed}" for row in range(len(samples.prompts)) for seed in samples.seeds]
    image_grid(images, len(samples.seeds), labels).save(staging / "samples.png")
    pipe.save_pretrained(staging / "pipeline", safe_serialization=True)
    clock.lap("samples_and_save")

    metrics = {
        **recon_metrics,
        "vae_train_l1": _tail_mean(vae_losses),
        "flow_loss": _tail_mean(flow_losses),
        "latent_shift": shift,
        "latent_scale": scale,
        "corpus_images": len(corpus),
        "corpus_captions": len(captions),
        **{f"seconds_{phase}": round(value, 2) for phase, value in clock.wall.items()},
        **{f"cpu_seconds_{phase}": round(value, 2) for phase, value in clock.cpu.items()},
    }
    tracker = active()
    tracker.log_text("\n".join(captions), "corpus_captions.txt")
    tracker.log_text("\n".join(f"prompt {row}: {prompt}" for row, prompt in enumerate(samples.prompts)),
                     "sample_prompts.txt")
    tracker.log_picture(staging / "samples.png")
    tracker.log_picture(staging / "reconstruction.png")
    return metrics


def write_reconstruction(vae, corpus: list[CorpusImage], heldout: list[tuple[str, Image.Image]],
                         settings: DictConfig, path: Path) -> dict:
    """Mean L1 (in [-1, 1] units) of the VAE on a few corpus paintings and on the held-out styles,
    and a picture: originals above their reconstructions, corpus first, then held-out styles."""
    size = tuple(settings.corpus.size)
    shown = [item.image for item in corpus if item.size == size][: settings.corpus.report_images]
    originals = torch.stack([to_tensor(image) for image in shown])
    recon = reconstruct(vae, originals, settings.vae.batch_size)
    metrics = {"vae_recon_l1": float((recon - originals).abs().mean())}
    if heldout:
        held = torch.stack([to_tensor(image) for _, image in heldout])
        held_recon = reconstruct(vae, held, settings.vae.batch_size)
        metrics["vae_recon_l1_heldout_styles"] = float((held_recon - held).abs().mean())
        originals, recon = torch.cat([originals, held]), torch.cat([recon, held_recon])
    tiles = [to_image(image) for image in originals] + [to_image(image) for image in recon]
    image_grid(tiles, len(originals)).save(path)
    return metrics


# --- flux_dev profiles -------------------------------------------------------------------------


def locate_flux_weights(model_cfg: DictConfig) -> tuple[Path, str | None]:
    """The local folder holding the pipeline, and the commit it was downloaded at (cache only).

    Never downloads: a missing folder or cache entry is an error that says how to get it."""
    from artmaster.models import WeightsMissing, not_in_cache

    if model_cfg.path:
        folder = Path(model_cfg.path)
        if not folder.is_dir():
            raise WeightsMissing(f"model.path {folder} is not a folder (expected a FLUX.1-dev pipeline folder "
                                 "with model_index.json)")
        return folder, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model_cfg.repo_id, revision=model_cfg.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise not_in_cache(model_cfg) from None
    return folder, folder.name


def _holds_weights(library: str, class_name: str) -> bool:
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return True  # unknown class: require weights rather than wave it through
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def weight_files(folder: Path) -> list[Path]:
    """Every safetensors file the pipeline in `folder` needs; FileNotFoundError naming each missing part."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: model_index.json is missing (not a diffusers pipeline folder)")
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{index}: not valid JSON ({error.msg})") from error
    missing, files = [], []
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        component = folder / name
        if not component.is_dir():
            missing.append(f"{name}/ (component folder)")
            continue
        if not _holds_weights(*spec):
            continue
        found = sorted(component.glob("*.safetensors"))
        if not found:
            missing.append(f"{name}/*.safetensors (no weights)")
        for shard_index in component.glob("*.safetensors.index.json"):
            shards = set(json.loads(shard_index.read_text(encoding="utf-8"))["weight_map"].values())
            missing += [f"{name}/{shard} (listed in {shard_index.name})" for shard in sorted(shards)
                        if not (component / shard).is_file()]
        files += found
    if missing:
        raise FileNotFoundError(f"{folder}: FLUX weights incomplete, missing: " + "; ".join(missing))
    return files


def _hash_cache_path(settings: DictConfig) -> Path:
    if settings.hash_cache:
        return Path(settings.hash_cache)
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "artmaster" / "sha256.json"


def file_sha256(path: Path, cache: dict) -> str:
    """sha256 of a file, remembered by (resolved path, size, mtime) so re-runs skip 30 GB of reading."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = str(resolved)
    known = cache.get(key)
    if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(resolved, "rb") as handle, tqdm(total=stat.st_size, unit="B", unit_scale=True,
                                              desc=f"sha256 {path.name}", leave=False) as bar:
        while chunk := handle.read(1 << 23):
            digest.update(chunk)
            bar.update(len(chunk))
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return cache[key]["sha256"]


def record_flux_weights(cfg: DictConfig, staging: Path) -> dict:
    """flux_dev: check the local weights and record revision and hashes; no training."""
    folder, commit = locate_flux_weights(cfg.model)
    files = weight_files(folder)
    cache_path = _hash_cache_path(cfg.base.weights)
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    except json.JSONDecodeError:
        log.warning("base: ignoring unreadable hash cache %s", cache_path)
        cache = {}
    record = {
        "profile": cfg.model.profile,
        "source": str(cfg.model.path or cfg.model.repo_id),
        "folder": str(folder),
        "revision": cfg.model.revision,
        "commit": commit,
        "files": {str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": file_sha256(path, cache)}
                  for path in tqdm(files, desc="base: hash weights", unit="file")},
    }
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_path, json.dumps(cache, indent=1), per_process=True)  # one cache for every run of the user
    _write_record(staging, record)
    return {"weight_files": len(files), "weight_gb": sum(f["bytes"] for f in record["files"].values()) / 1e9}


def record_architecture(cfg: DictConfig, staging: Path) -> dict:
    """flux_dev_random: nothing to train or check; record the architecture and its size."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    arch = OmegaConf.to_container(cfg.model.architecture, resolve=True)
    with torch.device("meta"):  # parameter counts without allocating 12B parameters
        counts = {
            "transformer_parameters": sum(p.numel() for p in FluxTransformer2DModel(**arch["transformer"]).parameters()),
            "vae_parameters": sum(p.numel() for p in AutoencoderKL(**arch["vae"]).parameters()),
        }
    _write_record(staging, {"profile": cfg.model.profile, "architecture": arch, **counts})
    return counts


def _write_record(staging: Path, record: dict) -> None:
    (staging / "weights.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    active().log_dict(record, "weights.json")


# --- stage -------------------------------------------------------------------------------------


def headline(metrics: dict) -> dict:
    """tiny: the transformer's final flow-matching loss and the VAE's reconstruction error on the
    held-out styles; flux_dev: the size of the checked weights; flux_dev_random: its parameters."""
    names = {"loss": "flow_loss", "vae_l1": "vae_recon_l1", "weight_gb": "weight_gb",
             "parameters": "transformer_parameters"}
    return {name: metrics[key] for name, key in names.items() if key in metrics}


def run(cfg: DictConfig) -> dict:
    """Pretrain the tiny base model, or check and record the FLUX.1-dev weights."""
    out_dir = stage_dir(cfg, "base")
    profile = cfg.model.profile
    actions = {"tiny": pretrain_tiny, "flux_dev": record_flux_weights, "flux_dev_random": record_architecture}
    if profile not in actions:
        raise ValueError(f"model.profile={profile!r}: the base stage knows {', '.join(actions)}")
    with stage_run(cfg, "base", sections=("base", "model", "caption", "seed")), staged_dir(out_dir) as staging:
        metrics = actions[profile](cfg, staging)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        log_summary(headline(metrics), details=metrics, folder=staging)
    print(f"base ({profile}): " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in metrics.items()))
    return {"out_dir": str(out_dir), **metrics}


main = hydra_entry(run)
