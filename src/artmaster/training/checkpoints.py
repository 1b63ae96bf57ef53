"""Resumable checkpoints: the adapter, optimizer, schedule, allocator, RNG states and history at a
step, written atomically and sealed (`sealing`); a run resumes only into a checkpoint of the same
recipe, data and schedule (`run_fingerprint`), the newest intact one.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from artmaster.config import params_hash
from artmaster.files import fsync_dir, staged_dir
from artmaster.training import sealing
from artmaster.training.state import TrainingState


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
