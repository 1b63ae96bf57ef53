"""AdaLoRA on FluxTransformer2DModel: target presets, peft wrapping, a batched rank allocator, the
orthogonal regulariser, and export to plain LoRA files (diffusers and kohya/ComfyUI formats).

peft's own AdaLoRA loops over every adapter module in Python: at FLUX.1-dev size (418 modules)
the importance update, the masking and a naive orthogonal term each launch thousands of tiny
kernels and cost as much as the model's step. Here every tensor of one role and shape is stacked
and processed at once; tests check that the masks, rank pattern and importance statistics equal
peft's `update_and_allocate` and that the penalty equals peft's formula.

Training-loop contract (peft's for `update_and_allocate`, which reads the gradients), in optimizer
steps 1, 2, 3 ... with `total_step` in the same unit (with gradient accumulation: sync steps only;
with DDP: on every process, the all-reduced gradients keep the masks equal):
    loss = task_loss + cfg.orth_reg_weight * orthogonal_penalty(model)
    loss.backward(); optimizer.step()
    allocator.update_and_allocate(step)      # before zero_grad()
    optimizer.zero_grad()
(or, cheaper at FLUX size: task_loss.backward(); add_orthogonal_gradient_(model, cfg.orth_reg_weight)
before clipping and optimizer.step(): the same gradient without per-tensor autograd work.)
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraLayer

from artmaster.files import atomic_path, sort_safetensors_header
from artmaster.models import DTYPES


def _block_regex(double: str, single: str) -> str:
    return rf"transformer_blocks\.\d+\.({double})|single_transformer_blocks\.\d+\.({single})"


_DOUBLE_ATTENTION = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DOUBLE_MLP = r"ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)"
_DOUBLE_MODULATION = r"norm1\.linear|norm1_context\.linear"
_SINGLE_ATTENTION = r"attn\.(to_q|to_k|to_v)"
_SINGLE_MLP = r"proj_mlp|proj_out"  # proj_out maps [attention, mlp] back to the stream
_SINGLE_MODULATION = r"norm\.linear"

# Full-match regexes over FluxTransformer2DModel module names. A suffix list with `proj_out` would
# also hit the top-level output head; these only reach inside the blocks. At FLUX.1-dev size
# (19 double + 38 single blocks): attention 266 layers, attention_mlp 418, all_linear 494 (adds the
# adaLN modulation linears); the model has 504 Linear layers in all.
TARGET_PRESETS: dict[str, str] = {
    "attention": _block_regex(_DOUBLE_ATTENTION, _SINGLE_ATTENTION),
    "attention_mlp": _block_regex(f"{_DOUBLE_ATTENTION}|{_DOUBLE_MLP}", f"{_SINGLE_ATTENTION}|{_SINGLE_MLP}"),
    "all_linear": _block_regex(
        f"{_DOUBLE_ATTENTION}|{_DOUBLE_MLP}|{_DOUBLE_MODULATION}",
        f"{_SINGLE_ATTENTION}|{_SINGLE_MLP}|{_SINGLE_MODULATION}",
    ),
}

ROLES = ("lora_A", "lora_B", "lora_E")
STATISTICS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # peft RankAllocator's per-tensor state


def target_modules_regex(target: str) -> str:
    """A preset name from TARGET_PRESETS, or else the value itself as a full-match regex."""
    if target in TARGET_PRESETS:
        return TARGET_PRESETS[target]
    try:
        re.compile(target)
    except re.error as err:
        raise ValueError(
            f"train.adalora.target_modules={target!r} is neither a preset ({', '.join(TARGET_PRESETS)}) "
            f"nor a valid regex: {err}"
        ) from None
    return target


def adalora_schedule(adalora_cfg: DictConfig, total_step: int) -> tuple[int, int]:
    """(tinit, tfinal) in optimizer steps from the config's fractions of `total_step`."""
    if total_step < 2:
        raise ValueError(f"AdaLoRA needs at least 2 optimizer steps, got total_step={total_step}")
    # lora_E starts at zero: with no warm-up step every score ties and the first mask removes all.
    tinit = max(1, round(adalora_cfg.tinit_fraction * total_step))
    tfinal = round(adalora_cfg.tfinal_fraction * total_step)
    if tinit >= total_step - tfinal:
        raise ValueError(
            f"AdaLoRA schedule leaves no budget phase: total_step={total_step}, tinit={tinit} "
            f"(train.adalora.tinit_fraction={adalora_cfg.tinit_fraction}), tfinal={tfinal} "
            f"(train.adalora.tfinal_fraction={adalora_cfg.tfinal_fraction}); lower the fractions or train longer"
        )
    return tinit, tfinal


def adalora_config(adalora_cfg: DictConfig, total_step: int) -> AdaLoraConfig:
    """peft's AdaLoraConfig from `train.adalora`; `total_step` counts optimizer steps."""
    if not 0 < adalora_cfg.target_r <= adalora_cfg.init_r:
        raise ValueError(
            f"train.adalora.target_r={adalora_cfg.target_r} must be in [1, init_r={adalora_cfg.init_r}]"
        )
    if adalora_cfg.delta_t < 1:
        raise ValueError(f"train.adalora.delta_t={adalora_cfg.delta_t} must be at least 1")
    tinit, tfinal = adalora_schedule(adalora_cfg, total_step)
    return AdaLoraConfig(
        target_modules=target_modules_regex(adalora_cfg.target_modules),
        init_r=adalora_cfg.init_r,
        target_r=adalora_cfg.target_r,
        lora_alpha=adalora_cfg.lora_alpha,
        lora_dropout=adalora_cfg.lora_dropout,
        beta1=adalora_cfg.beta1,
        beta2=adalora_cfg.beta2,
        orth_reg_weight=adalora_cfg.orth_reg_weight,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=adalora_cfg.delta_t,
        total_step=total_step,
    )


def wrap_with_adalora(transformer: torch.nn.Module, adalora_cfg: DictConfig, total_step: int) -> PeftModel:
    """The transformer with AdaLoRA adapters, through `get_peft_model` (add_adapter and
    inject_adapter_in_model drop the AdaLoraModel that owns the rank allocator)."""
    model = get_peft_model(transformer, adalora_config(adalora_cfg, total_step))
    # On a bf16 model peft re-creates each layer's `ranknum` (the rank AdaLoRA divides the update
    # by) as an fp32 Parameter that requires grad: it is a constant, never a trainable weight.
    for name, param in model.named_parameters():
        if ".ranknum." in name:
            param.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# Layout: the adapter tensors of a PeftModel, grouped by role and shape for batched work


@dataclass(eq=False)
class _Group:
    """Parameters of one role ("lora_A" | "lora_B" | "lora_E") that share shape, dtype and device."""

    role: str
    modules: list[int]  # indices into _Layout.names, in stacking order
    params: list[torch.nn.Parameter]


@dataclass(eq=False)
class _Layout:
    adapter: str
    names: list[str]  # adapted module names inside the transformer, in named_modules order
    layers: list[AdaLoraLayer]
    groups: dict[str, list[_Group]]  # role -> groups
    # role -> for each module, its row in the concatenation of that role's groups (on the CPU)
    rows: dict[str, torch.Tensor]
    _device_rows: dict[tuple[str, torch.device], torch.Tensor] = field(default_factory=dict)

    def rows_on(self, role: str, device: torch.device) -> torch.Tensor:
        """`rows[role]` on `device`, copied once: a host-to-device copy per step would sync."""
        key = (role, device)
        if key not in self._device_rows:
            self._device_rows[key] = self.rows[role].to(device)
        return self._device_rows[key]

    def param_names(self, role: str) -> list[str]:
        """Parameter names as peft's RankAllocator writes them (relative to the transformer)."""
        return [f"{name}.{role}.{self.adapter}" for name in self.names]

    def params(self, role: str) -> list[torch.nn.Parameter]:
        return [getattr(layer, role)[self.adapter] for layer in self.layers]


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout(peft_model: PeftModel) -> _Layout:
    """Grouping of the model's adapter tensors, built once per model (parameter objects stay the
    same through load_state_dict and .to(); only adding or deleting adapters would change it)."""
    if peft_model in _LAYOUTS:
        return _LAYOUTS[peft_model]
    adapter = peft_model.active_adapter
    named = [
        (name, module)
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, AdaLoraLayer) and adapter in module.lora_A
    ]
    if not named:
        raise ValueError(f"the model has no AdaLoRA layers for adapter {adapter!r}")
    names = [name for name, _ in named]
    layers = [module for _, module in named]
    groups: dict[str, list[_Group]] = {}
    rows: dict[str, torch.Tensor] = {}
    for role in ROLES:
        by_key: dict[tuple, _Group] = {}
        for index, layer in enumerate(layers):
            param = getattr(layer, role)[adapter]
            key = (tuple(param.shape), param.dtype, param.device)
            group = by_key.setdefault(key, _Group(role, [], []))
            group.modules.append(index)
            group.params.append(param)
        groups[role] = list(by_key.values())
        stacking_order = torch.tensor([i for group in groups[role] for i in group.modules])
        rows[role] = torch.argsort(stacking_order)
    ranks = {tuple(layer.lora_A[adapter].shape)[0] for layer in layers}
    if len(ranks) != 1:
        raise ValueError(f"AdaLoRA layers have different initial ranks {sorted(ranks)}; expected one init_r")
    layout = _Layout(adapter, names, layers, groups, rows)
    _LAYOUTS[peft_model] = layout
    return layout


def _per_module(layout: _Layout, role: str, per_group: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-group results (each (G, ...)) and reorder them to module order."""
    stacked = torch.cat(per_group)
    return stacked.index_select(0, layout.rows_on(role, stacked.device))


# --------------------------------------------------------------------------------------------
# Orthogonal regulariser


def _gram_deviations(layout: _Layout):
    """For each lora_A / lora_B group: (group, stacked factors, G - I, ||G - I||_F per module), with
    G = A A^T or B^T B. Computed in the adapters' own precision even under autocast: bf16 Gram
    matrices would drown the term in noise."""
    device = layout.groups["lora_A"][0].params[0].device
    with torch.autocast(device.type, enabled=False):
        for role in ("lora_A", "lora_B"):
            for group in layout.groups[role]:
                stacked = torch.stack(group.params)
                gram = stacked @ stacked.mT if role == "lora_A" else stacked.mT @ stacked
                deviation = gram - torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
                yield group, stacked, deviation, torch.linalg.matrix_norm(deviation, ord="fro")


def orthogonal_penalty(peft_model: PeftModel) -> torch.Tensor:
    """mean over every lora_A (P = A) and lora_B (P = B^T) of ||P P^T - I||_F, differentiable.

    peft adds this term only for models whose output has `.loss`, never for diffusers models, so
    the training loop adds `orth_reg_weight * orthogonal_penalty(model)` to its loss itself.
    """
    layout = _layout(peft_model)
    norms = [norm for _, _, _, norm in _gram_deviations(layout)]
    return torch.cat(norms).sum() / (2 * len(layout.names))


@torch.no_grad()
def add_orthogonal_gradient_(peft_model: PeftModel, weight: float) -> torch.Tensor:
    """Add the gradient of `weight * orthogonal_penalty(model)` straight into the adapters' .grad
    and return the penalty (detached), instead of putting the term in the loss.

    Same result as backpropagating the term, without one autograd node and accumulation kernel
    per adapter tensor (836 at FLUX.1-dev size): d||G - I||_F / dA = 2 (G - I) A / ||G - I||_F, and
    B (G - I) for B. Call it once per optimizer step after the last backward and before gradient
    clipping; with DDP on every rank (the adapters, hence this gradient, are equal everywhere).
    """
    layout = _layout(peft_model)
    count = 2 * len(layout.names)
    norms = []
    for group, stacked, deviation, norm in _gram_deviations(layout):
        norms.append(norm)
        # a module whose factor is exactly orthonormal has no gradient (not 0/0)
        scale = torch.where(norm > 0, (2 * weight / count) / norm, 0).to(stacked.dtype)[:, None, None]
        if group.role == "lora_A":
            gradient = torch.bmm(deviation, stacked).mul_(scale)
        else:
            gradient = torch.bmm(stacked, deviation).mul_(scale)
        for param in group.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        torch._foreach_add_([param.grad for param in group.params], list(gradient.unbind(0)))
    return torch.cat(norms).sum() / count


def set_input_casting(peft_model: torch.nn.Module, enabled: bool) -> int:
    """Turn peft's cast of each adapted layer's input to the adapter dtype on or off; returns the
    number of layers. With fp32 adapters on bf16 activations the cast makes an fp32 copy of every
    adapted layer's input, which bf16 autocast turns straight back into bf16 for the LoRA product:
    the same numbers, at the cost of two activation-sized copies per layer in each direction
    (418 layers at FLUX.1-dev size). Under autocast the cast can go."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in peft_model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = enabled
    return len(layers)


# --------------------------------------------------------------------------------------------
# Rank allocator


class Allocation(NamedTuple):
    budget: int  # total rank the schedule allows at this step (sum over modules)
    masked: bool  # whether lora_E was masked at this step


class FastRankAllocator:
    """Drop-in for `peft_model.base_model.update_and_allocate` with shape-grouped batched maths.

    Same contract and results as peft's RankAllocator: call `update_and_allocate(step)` once per
    optimizer step, after `optimizer.step()` and before `zero_grad()`, with step = 1, 2, 3 ...
    The importance statistics live as one stacked tensor per (role, shape) group. Nothing in the
    per-step path reads values back to the host: thresholds stay on the device and the rank
    pattern is only materialised when asked for (`rank_pattern`, `state_dict`) and once at the
    final mask, where peft's config gets it for `save_pretrained`.
    """

    def __init__(self, peft_model: PeftModel):
        self.layout = _layout(peft_model)
        self.config: AdaLoraConfig = peft_model.peft_config[self.layout.adapter]
        rankallocator = getattr(peft_model.base_model, "rankallocator", None)
        if rankallocator is None:
            raise ValueError("the AdaLoRA model has no trainable adapter (inference_mode=True?)")
        # peft's budget schedule is plain integer arithmetic on the host; reuse it as is.
        self._peft_allocator = rankallocator
        self.init_budget: int = rankallocator.init_bgt
        self.target_budget: int = rankallocator.target_bgt
        # every group of every role; the statistics hold one stacked tensor per entry, in this order
        self._groups = [group for role in ROLES for group in self.layout.groups[role]]
        self._stats: dict[str, list[torch.Tensor]] | None = None  # ipt, exp_avg_ipt, exp_avg_unc
        self._scratch: list[torch.Tensor] | None = None  # one work buffer per group
        self._keep: torch.Tensor | None = None  # (modules, init_r) bool, latest mask
        self.final = False

    @property
    def final_step(self) -> int:
        """The step at which the final rank pattern is fixed (total_step - tfinal)."""
        return self.config.total_step - self.config.tfinal

    def update_and_allocate(self, global_step: int) -> Allocation:
        if global_step < self.final_step:
            self._update_importance()
            budget, mask_now = self._peft_allocator.budget_schedule(global_step)
            if mask_now:
                self._mask_to_budget(budget)
            return Allocation(budget, bool(mask_now))
        if global_step == self.final_step:
            self._mask_to_budget(self.target_budget)
            self.final = True
            self.config.rank_pattern = self.rank_pattern
            self._stats = self._scratch = None  # peft frees its three fp32 copies here too
            return Allocation(self.target_budget, True)
        if not self.final:
            raise RuntimeError(
                f"step {global_step} is past the final mask at step {self.final_step}, which never ran "
                "(resumed without the allocator state, or skipped steps?)"
            )
        self._apply_keep()  # the optimizer revives masked singular values; peft re-masks every step
        return Allocation(self.target_budget, True)

    @torch.no_grad()
    def _update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        if self._stats is None:
            self._stats = {key: [torch.zeros_like(torch.stack(g.params)) for g in self._groups] for key in STATISTICS}
        if self._scratch is None:
            self._scratch = [torch.empty_like(ipt) for ipt in self._stats["ipt"]]
        for index, group in enumerate(self._groups):
            grads = [p.grad for p in group.params]
            if any(grad is None for grad in grads):
                missing = [self.layout.names[m] for m, g in zip(group.modules, grads) if g is None]
                raise RuntimeError(
                    f"AdaLoRA {group.role} of {len(missing)} module(s) got no gradient this step, e.g. "
                    f"{missing[:3]}: every targeted module must take part in the loss (use non-reentrant "
                    "gradient checkpointing) and update_and_allocate must run before zero_grad()"
                )
            # peft's per-module arithmetic, element for element (so bitwise equal), written into
            # persistent buffers: fresh multi-megabyte temporaries would page-fault on every CPU step.
            ipt, scratch = self._stats["ipt"][index], self._scratch[index]
            torch.stack(grads, out=ipt).mul_(torch.stack(group.params, out=scratch)).abs_()
            exp_avg_ipt = self._stats["exp_avg_ipt"][index].mul_(beta1).add_(torch.mul(ipt, 1 - beta1, out=scratch))
            torch.sub(ipt, exp_avg_ipt, out=scratch).abs_().mul_(1 - beta2)
            self._stats["exp_avg_unc"][index].mul_(beta2).add_(scratch)

    def _triplet_scores(self) -> torch.Tensor:
        """(modules, init_r) importance of each singular triplet, as peft's mask_to_budget scores it."""
        stats = self._stats
        if stats is None:
            raise RuntimeError("no importance statistics yet: update_and_allocate ran no update step")
        per_group: dict[str, list[torch.Tensor]] = {role: [] for role in ROLES}
        for group, exp_avg_ipt, exp_avg_unc in zip(self._groups, stats["exp_avg_ipt"], stats["exp_avg_unc"]):
            element = exp_avg_ipt * exp_avg_unc
            if group.role == "lora_A":  # (G, r, in): mean over the input features of each row
                per_group["lora_A"].append(element.mean(dim=2))
            elif group.role == "lora_B":  # (G, out, r): mean over the output features of each column
                per_group["lora_B"].append(element.mean(dim=1))
            else:  # (G, r, 1)
                per_group["lora_E"].append(element.squeeze(2))
        scores = {role: _per_module(self.layout, role, per_group[role]) for role in ROLES}
        return scores["lora_E"] + (scores["lora_A"] + scores["lora_B"])

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> None:
        scores = self._triplet_scores()
        to_mask = self.init_budget - budget
        if to_mask <= 0:
            self._keep = torch.ones_like(scores, dtype=torch.bool)
        else:
            threshold = torch.kthvalue(scores.flatten(), k=to_mask).values
            self._keep = ~(scores <= threshold)  # peft masks `score <= threshold` (ties included)
        self._apply_keep()

    @torch.no_grad()
    def _apply_keep(self) -> None:
        singular_values = self.layout.params("lora_E")
        masked = torch.stack(singular_values).masked_fill_(~self._keep.unsqueeze(-1), 0.0)
        torch._foreach_copy_(singular_values, list(masked.unbind(0)))

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """The latest mask in peft's format: {"<module>.lora_E.<adapter>": [kept?] * init_r}."""
        if self._keep is None:
            return None
        rows = self._keep.cpu().tolist()
        return dict(zip(self.layout.param_names("lora_E"), rows))

    def statistics(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"ipt" | "exp_avg_ipt" | "exp_avg_unc": {parameter name: tensor}}, names as peft's."""
        if self._stats is None:
            return {key: {} for key in STATISTICS}
        result = {}
        for key, stacked_groups in self._stats.items():
            result[key] = {}
            for group, stacked in zip(self._groups, stacked_groups):
                names = self.layout.param_names(group.role)
                result[key].update(zip((names[m] for m in group.modules), stacked.unbind(0)))
        return result

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bitwise identically: the importance
        statistics (CPU copies), the latest rank pattern and whether the final mask happened."""
        stats = {
            key: {name: tensor.to("cpu", copy=True) for name, tensor in per_name.items()}
            for key, per_name in self.statistics().items()
        }
        return {**stats, "rank_pattern": self.rank_pattern, "final": self.final}

    def load_state_dict(self, state: dict) -> None:
        expected = {name for role in ROLES for name in self.layout.param_names(role)}
        if state["ipt"] and set(state["ipt"]) != expected:
            unknown = sorted(set(state["ipt"]) ^ expected)
            raise ValueError(
                f"allocator state does not fit this model: {len(unknown)} parameter names differ, "
                f"e.g. {unknown[:3]}"
            )
        self._stats = None
        if state["ipt"]:
            self._stats = {
                key: [
                    torch.stack([state[key][self.layout.param_names(g.role)[m]] for m in g.modules]).to(
                        device=g.params[0].device, dtype=g.params[0].dtype)
                    for g in self._groups
                ]
                for key in STATISTICS
            }
        pattern = state["rank_pattern"]
        if pattern is None:
            self._keep = None
        else:
            names = self.layout.param_names("lora_E")
            if set(pattern) != set(names):
                raise ValueError("allocator state's rank_pattern names other modules than this model's")
            device = self.layout.layers[0].lora_E[self.layout.adapter].device
            self._keep = torch.tensor([pattern[name] for name in names], dtype=torch.bool, device=device)
        self.final = bool(state["final"])
        if self.final:
            self.config.rank_pattern = self.rank_pattern


# --------------------------------------------------------------------------------------------
# Export to plain LoRA


@dataclass
class ExportedLora:
    """AdaLoRA folded into plain LoRA: W' = W + lora_B @ lora_A with scale 1, rank per module."""

    lora_A: dict[str, torch.Tensor]  # module -> (rank, in_features), singular values folded in
    lora_B: dict[str, torch.Tensor]  # module -> (out_features, rank), AdaLoRA's scale folded in
    ranks: dict[str, int]  # every adapted module, rank 0 included (those have no tensors)
    out_features: dict[str, int]  # every Linear of the transformer: kohya's fused layers need them


@torch.no_grad()
def export_lora(peft_model: PeftModel) -> ExportedLora:
    """Exact conversion: keep = E != 0; A' = (A * E)[keep]; B' = B[:, keep] * scaling / (ranknum + 1e-5),
    the factor peft's SVDLinear applies to its output (scaling = lora_alpha; ranknum = init_r)."""
    layout = _layout(peft_model)
    adapter = layout.adapter
    lora_A, lora_B, ranks = {}, {}, {}
    for name, layer in zip(layout.names, layout.layers):
        singular_values = layer.lora_E[adapter]
        keep = singular_values.view(-1) != 0
        ranks[name] = int(keep.sum())
        if ranks[name] == 0:
            continue
        factor = layer.scaling[adapter] / (layer.ranknum[adapter] + 1e-5)
        lora_A[name] = (layer.lora_A[adapter] * singular_values)[keep].float().cpu().contiguous()
        lora_B[name] = (layer.lora_B[adapter][:, keep] * factor).float().cpu().contiguous()
    out_features = {
        name.removesuffix(".base_layer"): module.out_features
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    return ExportedLora(lora_A, lora_B, ranks, out_features)


# BFL's original FLUX layout, which kohya's sd-scripts and ComfyUI name LoRA keys after
# (lora_unet_double_blocks_0_img_attn_qkv): diffusers block prefix -> (BFL block name,
# {BFL layer: diffusers layers it fuses, in output order}). diffusers' kohya converter splits the
# fused qkv / linear1 outputs back in this order.
BFL_LAYOUT: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "transformer_blocks": (
        "double_blocks",
        {
            "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_attn_proj": ("attn.to_out.0",),
            "img_mlp_0": ("ff.net.0.proj",),
            "img_mlp_2": ("ff.net.2",),
            "img_mod_lin": ("norm1.linear",),
            "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_attn_proj": ("attn.to_add_out",),
            "txt_mlp_0": ("ff_context.net.0.proj",),
            "txt_mlp_2": ("ff_context.net.2",),
            "txt_mod_lin": ("norm1_context.linear",),
        },
    ),
    "single_transformer_blocks": (
        "single_blocks",
        {
            "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            "linear2": ("proj_out",),
            "modulation_lin": ("norm.linear",),
        },
    ),
}


def _bfl_layer(module: str) -> tuple[str, list[str]]:
    """diffusers module name -> (kohya key stem, the diffusers modules BFL fuses into that layer,
    in output order), e.g. transformer_blocks.0.attn.to_k -> (lora_unet_double_blocks_0_img_attn_qkv,
    [transformer_blocks.0.attn.to_q, ...to_k, ...to_v])."""
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if match:
        prefix, index, layer = match.groups()
        block, layers = BFL_LAYOUT[prefix]
        for bfl_layer, parts in layers.items():
            if layer in parts:
                return f"lora_unet_{block}_{index}_{bfl_layer}", [f"{prefix}.{index}.{part}" for part in parts]
    raise ValueError(f"no kohya/BFL name for module {module!r}: only in-block Linear layers can be exported")


def kohya_state_dict(exported: ExportedLora) -> dict[str, torch.Tensor]:
    """lora_unet_* keys in BFL naming with .lora_down/.lora_up/.alpha (alpha = rank: scale 1).

    Layers BFL fuses (q, k, v; in single blocks q, k, v and the MLP input) become one LoRA whose
    down matrix stacks the parts' A and whose up matrix is block diagonal in the parts' B, so
    up @ down = [B_q A_q; B_k A_k; ...] exactly; parts without an adapter get zero rows.
    """
    fused = dict(_bfl_layer(module) for module in exported.lora_A)
    state = {}
    for stem, parts in fused.items():
        downs = [exported.lora_A[part] for part in parts if part in exported.lora_A]
        rank = sum(down.shape[0] for down in downs)
        up = torch.zeros(sum(exported.out_features[part] for part in parts), rank, dtype=downs[0].dtype)
        row = column = 0
        for part in parts:
            if part in exported.lora_B:
                part_up = exported.lora_B[part]
                up[row : row + part_up.shape[0], column : column + part_up.shape[1]] = part_up
                column += part_up.shape[1]
            row += exported.out_features[part]
        state[f"{stem}.lora_down.weight"] = torch.cat(downs)
        state[f"{stem}.lora_up.weight"] = up
        state[f"{stem}.alpha"] = torch.tensor(float(rank))
    return state


def is_kohya_file(path: str | Path) -> bool:
    """A .safetensors file with kohya / ComfyUI FLUX keys (`lora_unet_*`)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith("lora_unet_") for key in handle.keys())


def read_kohya(path: str | Path, out_features: dict[str, int]) -> ExportedLora:
    """A kohya / ComfyUI FLUX LoRA file (BFL layer names, `.lora_down/.lora_up/.alpha`) as plain
    diffusers-named LoRA with scale 1, exactly: `alpha / rank` is folded into the up matrix, and a
    fused layer (qkv, linear1) is split into its diffusers modules by their widths in
    `out_features` (the model's own, so any model size loads; diffusers' kohya converter assumes
    FLUX.1-dev's widths). Each part keeps the down rows its up block uses: the block-diagonal up
    matrices ArtMaster writes come back with their per-module ranks; a dense one keeps them all."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    layers = {}
    for prefix, (block, parts_by_layer) in BFL_LAYOUT.items():
        for bfl_layer, parts in parts_by_layer.items():
            layers[(block, bfl_layer)] = (prefix, parts)
    lora_A, lora_B, ranks = {}, {}, {}
    for key in sorted(k for k in state if k.endswith(".lora_down.weight")):
        stem = key.removesuffix(".lora_down.weight")
        match = re.fullmatch(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)", stem)
        if match is None or (match.group(1), match.group(3)) not in layers:
            raise ValueError(f"{path}: key {key!r} is no FLUX transformer-block layer (kohya/BFL naming)")
        block, index, bfl_layer = match.groups()
        prefix, parts = layers[(block, bfl_layer)]
        down, up = state[key].float(), state[f"{stem}.lora_up.weight"].float()
        rank = down.shape[0]
        scale = float(state[f"{stem}.alpha"]) / rank if f"{stem}.alpha" in state else 1.0
        modules = [f"{prefix}.{index}.{part}" for part in parts]
        missing = [module for module in modules if module not in out_features]
        if missing:
            raise ValueError(f"{path}: {stem} needs modules the model lacks: {missing}")
        widths = [out_features[module] for module in modules]
        if sum(widths) != up.shape[0]:
            raise ValueError(f"{path}: {stem} has {up.shape[0]} output rows; this model's {'+'.join(modules)} "
                             f"have {sum(widths)} (a LoRA for another model size?)")
        for module, part_up in zip(modules, torch.split(up, widths)):
            used = part_up.abs().sum(dim=0) != 0
            ranks[module] = int(used.sum())
            if ranks[module]:
                lora_A[module] = down[used].contiguous()
                lora_B[module] = (part_up[:, used] * scale).contiguous()
    return ExportedLora(lora_A, lora_B, ranks, dict(out_features))


def diffusers_state_dict(exported: ExportedLora) -> dict[str, torch.Tensor]:
    """transformer.<module>.lora_A/lora_B.weight plus <module>.alpha = rank, so every loader,
    whatever it assumes about alpha, applies scale 1 to each module."""
    state = {}
    for module, down in exported.lora_A.items():
        state[f"transformer.{module}.lora_A.weight"] = down
        state[f"transformer.{module}.lora_B.weight"] = exported.lora_B[module]
        state[f"transformer.{module}.alpha"] = torch.tensor(float(down.shape[0]))
    return state


DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) reads


def kohya_weight_name(trigger: str) -> str:
    stem = re.sub(r"[^0-9A-Za-z]+", "_", trigger).strip("_").lower() or "lora"
    return f"{stem}_kohya.safetensors"


def save_lora(
    exported: ExportedLora,
    folder: str | Path,
    *,
    base_model: str,
    trigger: str,
    metadata: dict,
    dtype: str = "float32",
    kohya: bool = True,
) -> dict[str, Path]:
    """Write the plain LoRA: {"diffusers": folder/pytorch_lora_weights.safetensors,
    "kohya": folder/<trigger>_kohya.safetensors}. Header metadata: base model, trigger phrase and
    `metadata` (values JSON-encoded unless strings). No `lora_adapter_metadata` key: diffusers
    would build a LoraConfig from it and ignore the per-module alphas."""
    from safetensors.torch import save_file

    if "lora_adapter_metadata" in metadata:
        raise ValueError("metadata must not set 'lora_adapter_metadata' (diffusers reads it as a LoraConfig)")
    if not exported.lora_A:
        raise ValueError("every module has rank 0: there is no LoRA to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = {
        "base_model": base_model,
        "modelspec.trigger_phrase": trigger,
        "ranks": json.dumps(exported.ranks),
        **{str(key): value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
           for key, value in metadata.items()},
    }
    torch_dtype = DTYPES[dtype]

    def write(state: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> Path:
        weights = {k: (v if k.endswith(".alpha") else v.to(torch_dtype)).contiguous() for k, v in state.items()}
        with atomic_path(path) as tmp:
            save_file(weights, str(tmp), metadata=header)
            sort_safetensors_header(tmp)  # the same LoRA gives the same bytes
        return path

    paths = {"diffusers": write(diffusers_state_dict(exported), folder / DIFFUSERS_WEIGHT_NAME, header)}
    if kohya:
        kohya_header = {**header, "ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}
        paths["kohya"] = write(kohya_state_dict(exported), folder / kohya_weight_name(trigger), kohya_header)
    return paths


# --------------------------------------------------------------------------------------------
# Rank report


@torch.no_grad()
def rank_report(source: PeftModel | ExportedLora) -> dict[str, int]:
    """Rank per adapted module: kept singular values now (model) or as exported."""
    if isinstance(source, ExportedLora):
        return dict(source.ranks)
    layout = _layout(source)
    kept = (torch.stack(layout.params("lora_E")).squeeze(-1) != 0).sum(dim=1)
    return dict(zip(layout.names, kept.tolist()))


def _heatmap_cell(module: str) -> tuple[str, int, str]:
    """module name -> (panel, row, column): block kind, block index, layer inside the block."""
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if match is None:
        return "other layers", 0, module
    prefix, index, layer = match.groups()
    panel = "double-stream blocks" if prefix == "transformer_blocks" else "single-stream blocks"
    return panel, int(index), layer


def rank_heatmap(ranks: dict[str, int], path: str | Path, title: str = "AdaLoRA final rank per module") -> Path:
    """PNG heatmap: rows = blocks, columns = layer types, one panel per block kind; blank cells
    are layers without an adapter."""
    import numpy as np
    from matplotlib.figure import Figure

    panels: dict[str, dict[tuple[int, str], int]] = {}
    for module, rank in ranks.items():
        panel, row, column = _heatmap_cell(module)
        panels.setdefault(panel, {})[(row, column)] = rank
    vmax = max(max(ranks.values()), 1)
    shapes = []
    for cells in panels.values():
        rows = sorted({r for r, _ in cells})
        columns = list(dict.fromkeys(c for _, c in cells))
        shapes.append((rows, columns))
    height = max(len(rows) for rows, _ in shapes) * 0.28 + 2.5
    width = sum(len(columns) * 0.55 + 1.6 for _, columns in shapes) + 1.5
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False,
                        width_ratios=[len(columns) + 2 for _, columns in shapes])[0]
    image = None
    for ax, (panel, cells), (rows, columns) in zip(axes, panels.items(), shapes):
        grid = np.full((len(rows), len(columns)), np.nan)
        for (row, column), rank in cells.items():
            grid[rows.index(row), columns.index(column)] = rank
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 * vmax else "black")
        ax.set_title(f"{panel} (total rank {sum(cells.values())})", fontsize=9)
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
        ax.set_ylabel("block")
    fig.colorbar(image, ax=list(axes), label="rank", shrink=0.8)
    fig.suptitle(f"{title}: {sum(ranks.values())} over {len(ranks)} modules", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


# --------------------------------------------------------------------------------------------
# Reading adapters back: continue an AdaLoRA run, fuse or concatenate plain LoRAs (`retrain`)


@torch.no_grad()
def load_adalora_weights_(peft_model: PeftModel, folder: str | Path) -> dict[str, int]:
    """Continue from a saved AdaLoRA folder (`save_pretrained`: each module's kept singular
    triplets only, their positions in `rank_pattern`): the kept triplets go back to their
    positions, masked ones get lora_E = 0 and keep this model's fresh lora_A/lora_B, so the model
    starts exactly at the saved adapter and the allocator can revive masked ranks. The folder
    must come from the same recipe (target modules, init_r, lora_alpha). Returns the saved ranks."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{folder}: no peft adapter folder (adapter_config.json + adapter_model.safetensors)")
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    layout = _layout(peft_model)
    adapter = layout.adapter
    config = peft_model.peft_config[adapter]
    if saved.get("peft_type") != "ADALORA":
        raise ValueError(f"{folder}: a {saved.get('peft_type')} adapter, not AdaLoRA: cannot continue it")
    for key in ("init_r", "lora_alpha"):
        if saved.get(key) != getattr(config, key):
            raise ValueError(f"{folder}: saved with {key}={saved.get(key)}, but this run's train.adalora.{key} is "
                             f"{getattr(config, key)}: continue only with the recipe that made the adapter")
    tensors = load_file(str(weights_file))
    saved_modules = {key.removeprefix("base_model.model.").rsplit(".", 1)[0] for key in tensors}
    if saved_modules - set(layout.names) or set(layout.names) - saved_modules:
        differ = sorted(saved_modules ^ set(layout.names))
        raise ValueError(f"{folder}: adapted modules differ from this run's target set, e.g. {differ[:3]}")
    pattern = saved.get("rank_pattern") or {}
    ranks = {}
    for name, layer in zip(layout.names, layout.layers):
        init_r = layer.lora_A[adapter].shape[0]
        keep = torch.tensor(pattern.get(f"{name}.lora_E", [True] * init_r), dtype=torch.bool)
        key = f"base_model.model.{name}"
        parts = {role: tensors[f"{key}.{role}"] for role in ROLES}
        if parts["lora_E"].shape[0] != int(keep.sum()):
            raise ValueError(f"{folder}: {name} holds {parts['lora_E'].shape[0]} triplets, its rank_pattern {int(keep.sum())}")
        A, B, E = (getattr(layer, role)[adapter] for role in ROLES)
        keep = keep.to(A.device)
        E.zero_()
        E[keep] = parts["lora_E"].to(E.device, E.dtype)
        A[keep] = parts["lora_A"].to(A.device, A.dtype)
        B[:, keep] = parts["lora_B"].to(B.device, B.dtype)
        ranks[name] = int(keep.sum())
    return ranks


def read_lora(folder: str | Path, out_features: dict[str, int] | None = None) -> ExportedLora:
    """A diffusers LoRA folder (pytorch_lora_weights.safetensors, `transformer.<module>.lora_A/B`
    keys) as plain LoRA with scale 1: each module's scale (its `.alpha` / rank when stored, else
    the header's `lora_adapter_metadata` lora_alpha / r, else 1) is folded into lora_B."""
    from safetensors import safe_open

    path = Path(folder) / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no diffusers LoRA file")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    default_scale = 1.0
    if "lora_adapter_metadata" in header:
        meta = json.loads(header["lora_adapter_metadata"])
        if meta.get("r"):
            default_scale = float(meta.get("lora_alpha", meta["r"])) / float(meta["r"])
    lora_A, lora_B, ranks = {}, {}, {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        if not key.startswith("transformer."):
            raise ValueError(f"{path}: key {key!r} is not a diffusers transformer LoRA key")
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        up = tensors[f"transformer.{module}.lora_B.weight"]
        alpha = tensors.get(f"transformer.{module}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else default_scale
        lora_A[module] = down.float()
        lora_B[module] = up.float() * scale
        ranks[module] = down.shape[0]
    if not lora_A:
        raise ValueError(f"{path}: holds no LoRA tensors")
    return ExportedLora(lora_A, lora_B, ranks, dict(out_features or {}))


@torch.no_grad()
def fuse_lora_(transformer: torch.nn.Module, folder: str | Path) -> int:
    """Add a plain LoRA's update B @ A into the base weights of `transformer` (in place, computed
    in fp32): the base that the next adapter trains on. Returns the number of modules changed."""
    lora = read_lora(folder)
    for module, down in lora.lora_A.items():
        try:
            linear = transformer.get_submodule(module)
        except AttributeError:
            raise ValueError(f"{folder}: LoRA module {module!r} is not in the transformer (another base model?)") from None
        delta = lora.lora_B[module].to(linear.weight.device) @ down.to(linear.weight.device)
        if delta.shape != linear.weight.shape:
            raise ValueError(f"{folder}: {module} update {tuple(delta.shape)} does not fit weight {tuple(linear.weight.shape)}")
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
    return len(lora.lora_A)


def concat_loras(loras: list[ExportedLora], out_features: dict[str, int]) -> ExportedLora:
    """One plain LoRA equal to the sum of several: per module, A stacked and B side by side, so
    [B1 B2] @ [A1; A2] = B1 A1 + B2 A2 exactly; its rank is the sum of the parts' ranks."""
    lora_A: dict[str, torch.Tensor] = {}
    lora_B: dict[str, torch.Tensor] = {}
    for lora in loras:
        for module, down in lora.lora_A.items():
            if module in lora_A:
                lora_A[module] = torch.cat([lora_A[module], down])
                lora_B[module] = torch.cat([lora_B[module], lora.lora_B[module]], dim=1)
            else:
                lora_A[module], lora_B[module] = down, lora.lora_B[module]
    modules = {module for lora in loras for module in lora.ranks}
    ranks = {module: lora_A[module].shape[0] if module in lora_A else 0 for module in sorted(modules)}
    return ExportedLora(lora_A, lora_B, ranks, dict(out_features))
