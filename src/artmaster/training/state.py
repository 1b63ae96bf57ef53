"""What a training run holds: AdaLoRA around the transformer, the fp32 adapter tensors, AdamW,
the lr schedule, the rank allocator, the EMA, and the flow-matching settings the loss reads.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from artmaster.training.settings import TrainSettings


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


def build_training_state(cfg: DictConfig, transformer, vae_config, total_step: int, accelerator,
                         keep_original_base: bool = False) -> TrainingState:
    """AdaLoRA around the transformer, fp32 adapter tensors, AdamW, lr schedule, allocator, EMA;
    on CUDA the levers of docs/performance.md (LoRA branch, FP8 base GEMMs, compiled blocks, CUDA
    graphs). `keep_original_base`: with `train.fp8_base`, keep the base weights restorable
    (`float8.use_original_base`), for callers that train several setups on one transformer."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from artmaster import float8, lora_branch
    from artmaster.adalora import FastRankAllocator, set_input_casting, wrap_with_adalora
    from artmaster.models import enable_checkpointing

    section = cfg.train
    settings = TrainSettings.from_config(section)
    transformer.requires_grad_(False)
    if settings.gradient_checkpointing:  # non-reentrant: AdaLoRA needs every grad
        enable_checkpointing(transformer, settings.gradient_checkpointing_fraction)
    set_seed(cfg.seed)  # the adapter's initial values come from the global RNG
    adapter = wrap_with_adalora(transformer, section.adalora, total_step)
    named_params = [(name, param) for name, param in adapter.named_parameters() if param.requires_grad]
    for _, param in named_params:
        param.data = param.data.float()  # bf16 base weights, fp32 adapter and optimizer state
    if accelerator.mixed_precision != "no":
        set_input_casting(adapter, False)  # autocast casts to bf16 anyway: skip peft's fp32 input copies
    optim = settings.optim
    on_cuda = all(param.is_cuda for _, param in named_params)
    lora_branch.configure(adapter, section.get("lora_branch"), on_cuda)
    if settings.fp8_base:
        _check_fp8_device(on_cuda)
        float8.use_float8_base(adapter, keep_original=keep_original_base)
    compiled, cudagraphs = compile_for_training(cfg, transformer, on_cuda)
    fused = on_cuda if section.optim.fused == "auto" else bool(section.optim.fused)
    optimizer = torch.optim.AdamW(
        [param for _, param in named_params], lr=optim.lr, betas=tuple(section.optim.betas),
        weight_decay=optim.weight_decay, eps=optim.eps, fused=fused,
    )
    scheduler = get_scheduler(
        section.lr_schedule.name, optimizer,
        num_warmup_steps=round(settings.lr_schedule.warmup_fraction * total_step),
        num_training_steps=total_step,
    )
    allocator = FastRankAllocator(adapter)
    model = accelerator.prepare(adapter)
    ema = AdapterEMA(named_params, settings.ema.decay) if settings.ema.enabled else None
    return TrainingState(
        accelerator=accelerator, model=model, adapter=adapter, named_params=named_params,
        optimizer=optimizer, scheduler=scheduler, allocator=allocator,
        flow=flow_settings(cfg, transformer, vae_config, inputs_require_grad=compiled),
        max_grad_norm=optim.max_grad_norm or math.inf, ema=ema,
        direct_orthogonal=_direct_orthogonal(section.adalora.get("orth_gradient", "autograd"), on_cuda),
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
        compile_blocks(transformer, **({"mode": mode} if mode else {}))
    return compiled, cudagraphs


def _check_fp8_device(on_cuda: bool) -> None:
    """FP8 GEMMs need compute capability 8.9 (Ada, Hopper, Blackwell); the CPU computes the same
    product in fp32 (`float8.scaled_matmul`), slowly."""
    capability = torch.cuda.get_device_capability() if on_cuda else None
    if capability is not None and capability < (8, 9):
        raise ValueError(f"train.fp8_base=true: {torch.cuda.get_device_name()} (compute capability "
                         f"{'.'.join(map(str, capability))}) has no FP8 matmul; "
                         "it needs 8.9 or newer (Ada, Hopper, Blackwell). Set train.fp8_base=false.")


def _direct_orthogonal(mode: str, on_cuda: bool) -> bool:
    """`train.adalora.orth_gradient`: direct | autograd | auto (direct on CUDA)."""
    if mode not in ("auto", "direct", "autograd"):
        raise ValueError(f"train.adalora.orth_gradient={mode!r}: expected auto, direct or autograd")
    return mode == "direct" or (mode == "auto" and on_cuda)
