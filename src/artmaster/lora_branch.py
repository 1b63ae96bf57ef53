"""The adapters' forward on a GPU: the LoRA branch in the model's dtype from fp32 master weights,
and one GEMM for the down-projections of adapted layers that read the same input.

peft's forward casts each adapted layer's input to the adapter's dtype: with bf16 base weights and
fp32 adapters (the FLUX.1-dev recipe) that is an fp32 copy of every adapted input, kept for
backward (6-9 GB at FLUX.1-dev size), and fp32 GEMMs (25+ ms of an H100 step; docs/performance.md).
Here the adapter tensors stay fp32 parameters, which AdamW updates, and are cast to the input's
dtype inside the forward: the branch's GEMMs run in bf16, autograd hands the fp32 parameters fp32
gradients, and there is no second copy of the weights to keep in sync.

Adapted layers of one block that read the same tensor (q, k, v of each stream of a double block;
q, k, v and the MLP input of a single block) project it down once, x @ [A_q; A_k; A_v]^T (AdaLoRA:
A * E, the masked factors), and each layer takes its columns: one GEMM instead of three or four,
forward and backward.

`use_fast_branch` switches the layers of a peft model (AdaLoRA or LoRA) over in place;
`use_peft_branch` switches them back. Parameters, state dicts and export are untouched.
"""

from __future__ import annotations

import re

import torch
from peft.tuners.adalora.layer import AdaLoraLayer
from peft.tuners.lora.layer import LoraLayer

# Layers that read one tensor, per block kind (diffusers' FluxTransformer2DModel names), in the
# order the block calls them.
SHARED_INPUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "transformer_blocks": (
        ("attn.to_q", "attn.to_k", "attn.to_v"),
        ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ),
    "single_transformer_blocks": (("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"),),
}


def _down_factor(layer, adapter: str) -> torch.Tensor:
    """(r, in) of one adapted Linear: AdaLoRA's masked A * E, or LoRA's A."""
    if isinstance(layer, AdaLoraLayer):
        return layer.lora_A[adapter] * layer.lora_E[adapter]
    return layer.lora_A[adapter].weight


def _up_factor(layer, adapter: str) -> torch.Tensor:
    """(out, r) of one adapted Linear: B."""
    if isinstance(layer, AdaLoraLayer):
        return layer.lora_B[adapter]
    return layer.lora_B[adapter].weight


def _scale(layer, adapter: str, branch: torch.Tensor) -> torch.Tensor:
    """The branch times peft's scale, with peft's own operations (bitwise peft's in fp32)."""
    if isinstance(layer, AdaLoraLayer):
        return branch * layer.scaling[adapter] / (layer.ranknum[adapter] + 1e-5)
    return branch * layer.scaling[adapter]


class SharedInput:
    """Adapted layers that read one tensor: the first of them to see a new input projects it down
    for all (one GEMM on the concatenated down factors); each takes its columns
    (`layer._shared_columns`), and the last one drops the result, so nothing outlives the block's
    forward."""

    def __init__(self, layers: list, adapter: str):
        self.layers = layers
        self.adapter = adapter
        start = 0
        for layer in layers:
            rank = _up_factor(layer, adapter).shape[1]
            layer._shared_columns = (start, start + rank)
            start += rank
        self._input: torch.Tensor | None = None
        self._down: torch.Tensor | None = None
        self._left = 0

    def down(self, layer, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self._input is not x:
            weights = torch.cat([_down_factor(member, self.adapter) for member in self.layers]).to(dtype)
            self._input, self._down, self._left = x, x.to(dtype) @ weights.T, len(self.layers)
        start, stop = layer._shared_columns
        columns = self._down[..., start:stop]
        self._left -= 1
        if self._left == 0:
            self._input = self._down = None
        return columns


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = [name for name in self.active_adapters if name in self.lora_A]
    if self.disable_adapters or self.merged or len(adapters) != 1 or kwargs.get("adapter_names") is not None:
        return super(type(self), self).forward(x, *args, **kwargs)
    adapter = adapters[0]
    result = self.base_layer(x, *args, **kwargs)
    dtype = self._branch_dtype or x.dtype
    if self._shared_input is not None:
        low = self._shared_input.down(self, x, dtype)
    else:
        low = self.lora_dropout[adapter](x.to(dtype)) @ _down_factor(self, adapter).to(dtype).T
    result += _scale(self, adapter, low @ _up_factor(self, adapter).to(dtype).T)
    return result


_FAST_CLASSES: dict[type, type] = {}


def _fast_class(cls: type) -> type:
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(f"Fast{cls.__name__}", (cls,), {"forward": _fast_forward, "_peft_class": cls})
    return _FAST_CLASSES[cls]


def adapted_linears(peft_model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every adapted (AdaLoRA or LoRA) layer whose base is a Linear."""
    return [(name, module) for name, module in peft_model.named_modules()
            if isinstance(module, (AdaLoraLayer, LoraLayer)) and isinstance(module.get_base_layer(), torch.nn.Linear)]


def use_fast_branch(peft_model: torch.nn.Module, *, dtype: torch.dtype | None = None, shared_down: bool = True) -> int:
    """Run every adapted Linear's branch in `dtype` (None: the input's dtype, i.e. the model's)
    from its parameters as they are (fp32 master weights), without casting the input to the
    adapter's dtype; with `shared_down`, layers that read one tensor (SHARED_INPUTS) share one
    down-projection GEMM. Returns the number of layers switched."""
    layers = adapted_linears(peft_model)
    for _, layer in layers:
        cls = getattr(type(layer), "_peft_class", type(layer))
        layer.__class__ = _fast_class(cls)
        layer._branch_dtype = dtype
        layer._shared_input = None
    if shared_down:
        for group in _sharing_groups(layers):
            shared = SharedInput(group, group[0].active_adapters[0])
            for layer in group:
                layer._shared_input = shared
    return len(layers)


def use_peft_branch(peft_model: torch.nn.Module) -> None:
    """Undo `use_fast_branch`: peft's own forward again."""
    for _, layer in adapted_linears(peft_model):
        cls = getattr(type(layer), "_peft_class", None)
        if cls is not None:
            layer.__class__ = cls
            del layer._branch_dtype, layer._shared_input
            layer.__dict__.pop("_shared_columns", None)


def _sharing_groups(layers: list[tuple[str, torch.nn.Module]]) -> list[list[torch.nn.Module]]:
    """Groups of two or more adapted layers of one block that read one input (SHARED_INPUTS),
    in call order; a layer with dropout (a mask of its own) stays alone."""
    blocks: dict[tuple[str, str], dict[str, torch.nn.Module]] = {}
    for name, layer in layers:
        match = re.search(r"(?:^|\.)((transformer_blocks|single_transformer_blocks)\.\d+)\.(.+)$", name)
        if match and isinstance(layer.lora_dropout[layer.active_adapters[0]], torch.nn.Identity):
            blocks.setdefault((match.group(2), match.group(1)), {})[match.group(3)] = layer
    groups = []
    for (kind, _), members in blocks.items():
        for names in SHARED_INPUTS[kind]:
            group = [members[name] for name in names if name in members]
            if len(group) >= 2:
                groups.append(group)
    return groups


PRECISIONS = ("auto", "model", "float32", "tf32")


def configure(peft_model: torch.nn.Module, settings, on_cuda: bool) -> tuple[str, bool]:
    """`train.lora_branch` on a freshly wrapped model: returns (precision, shared_down) in use.

    precision: model (the branch in the model's dtype, `use_fast_branch`) | float32 (peft's
    forward) | tf32 (peft's forward with TF32 GEMMs on CUDA, process-wide) | auto (model on CUDA,
    float32 on the CPU); shared_down: true | false | auto (on CUDA).
    """
    precision = str(settings.get("precision", "auto")) if settings is not None else "auto"
    shared = settings.get("shared_down", "auto") if settings is not None else "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"train.lora_branch.precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if shared not in ("auto", True, False):
        raise ValueError(f"train.lora_branch.shared_down={shared!r}: expected true, false or auto")
    if precision == "auto":
        precision = "model" if on_cuda else "float32"
    shared = on_cuda if shared == "auto" else bool(shared)
    if precision == "tf32" and on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    if precision == "model" or shared:
        use_fast_branch(peft_model, dtype=None if precision == "model" else torch.float32, shared_down=shared)
    return precision, shared
