"""The encoding cache: each crop's VAE posterior and each caption's text embeddings, computed once.

An entry's file name is the sha256 of the sample id, its caption, its pixels and the encoders'
fingerprint, so a changed crop, caption or encoder gets a new entry; the tensors' own hash, written
into the file's metadata, is checked on every read, so a damaged entry is recomputed, never trusted.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from artmaster.config import params_hash
from artmaster.dataset import Example
from artmaster.files import atomic_path, sort_safetensors_header

log = logging.getLogger(__name__)


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
