"""The `train` section's typed settings, read once by the loop and the training state (and checked
by `config.validate` whatever set them: this module loads without torch, as validation runs before
every stage)."""

from __future__ import annotations

from dataclasses import dataclass

from artmaster.config import Settings


@dataclass(frozen=True)
class OptimSettings(Settings):
    lr: float
    weight_decay: float
    eps: float
    max_grad_norm: float | None  # null: no clipping


@dataclass(frozen=True)
class ScheduleSettings(Settings):
    warmup_fraction: float


@dataclass(frozen=True)
class EmaSettings(Settings):
    enabled: bool
    decay: float


@dataclass(frozen=True)
class CheckpointSettings(Settings):
    every: int | None
    keep: int
    keep_after_success: bool


@dataclass(frozen=True)
class AdaLoraSettings(Settings):
    # peft reads the section itself (its values as written go into adapter_config.json)
    init_r: int
    target_r: int
    lora_alpha: float


@dataclass(frozen=True)
class SampleSettings(Settings):
    enabled: bool
    every: int | None
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    batch_size: int
    width: int
    height: int
    steps: int
    guidance: float


@dataclass(frozen=True)
class ValidationSettings(Settings):
    every: int | None
    hold_out: bool


@dataclass(frozen=True)
class TrainSettings(Settings):
    image_scale: float
    repeats: int
    epochs: int
    batch_size: int
    gradient_accumulation: int
    log_every: int
    gradient_checkpointing: bool
    optim: OptimSettings
    lr_schedule: ScheduleSettings
    ema: EmaSettings
    checkpoint: CheckpointSettings
    adalora: AdaLoraSettings
    samples: SampleSettings
    validation: ValidationSettings
    gradient_checkpointing_fraction: float = 1.0
    cudagraphs: bool = False
    fp8_base: bool = False
