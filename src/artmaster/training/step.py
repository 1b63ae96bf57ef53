"""One optimizer step: the rectified-flow loss of FLUX (flux_math's named pieces) and the step
around it (micro-batches, backward, clip, AdamW, schedule, AdaLoRA's rank allocation, EMA).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from artmaster import flux_math
from artmaster.training.batches import Batch
from artmaster.training.state import FlowSettings, TrainingState


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
