"""The frozen base GEMMs of the adapted layers in FP8 (`train.fp8_base`, opt-in).

Training a LoRA on FLUX.1-dev spends most of a step's GPU time in the frozen base layers: the
forward GEMM and the backward GEMM to the layer's input (the weight itself needs no gradient). On
a Hopper GPU those run twice as fast in FP8. Each adapted Linear's frozen weight is stored as
float8_e4m3 with one scale for the whole tensor, twice (W for the forward, W^T contiguous for the
backward: the FP8 matmul wants its second operand column-major), which is as many bytes as the
bf16 weight it replaces. Its input is scaled and cast to e4m3 on the fly (one scale per tensor,
from its absolute maximum), the incoming gradient to e5m2 (the wider range gradients need), and
`torch._scaled_mm` multiplies and rescales into the input's dtype (`scaled_matmul`). The LoRA branch
(`artmaster.lora_branch`) still sees the unquantized input and runs as before; only the frozen
product is approximated, the way ai-toolkit's and kohya's float8 base-model options approximate
it, so the trained adapter is applied to the bf16 weights at inference.

Whether the approximation changes training is measured, not assumed: benchmarks/fp8_loss_curve.py
trains the same steps with and without it at FLUX.1-dev size and compares the loss curves.
"""

from __future__ import annotations

import torch

from artmaster.lora_branch import adapted_linears

WEIGHT_DTYPE = torch.float8_e4m3fn  # weights and inputs: more mantissa
GRAD_DTYPE = torch.float8_e5m2  # gradients: more range
ALIGNMENT = 16  # torch._scaled_mm wants both dimensions of the weight divisible by 16
BUFFERS = ("weight_fp8", "weight_fp8_t", "weight_scale")


def quantize(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`tensor` as (fp8 values, fp32 scale) with values * scale ~= tensor; the scale maps the
    tensor's absolute maximum to the format's largest finite value."""
    largest = torch.finfo(dtype).max
    scale = tensor.detach().abs().amax().float().clamp(min=1e-12) / largest
    values = (tensor.float() / scale).clamp(-largest, largest).to(dtype)
    return values, scale


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) in `out_dtype`, from FP8 operands with fp32 accumulation. On a
    GPU, the FP8 tensor-core GEMM (`torch._scaled_mm`). On the CPU, the same product from the
    operands widened to fp32: oneDNN's FP8 matmul exists only among its AMX kernels, which the
    portable CPU kernels (`runtime.PORTABLE_KERNELS`) leave out, so `torch._scaled_mm` ran or
    failed by the processor and by which kernel setting a process had settled on first."""
    if a.device.type == "cuda":
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


class _Float8FrozenMatmul(torch.autograd.Function):
    """x @ W^T with W frozen: FP8 forward, FP8 backward to x, no gradient for W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor):
        values, scale = quantize(x, WEIGHT_DTYPE)
        ctx.save_for_backward(weight_t, weight_scale)
        return scaled_matmul(values.contiguous(), weight.t(), scale, weight_scale, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight_t, weight_scale = ctx.saved_tensors
        values, scale = quantize(grad.contiguous(), GRAD_DTYPE)
        grad_x = scaled_matmul(values, weight_t.t(), scale, weight_scale, grad.dtype)
        return grad_x, None, None, None


class Float8FrozenLinear(torch.nn.Linear):
    """An nn.Linear whose frozen weight lives in FP8 (buffers `weight_fp8`, `weight_fp8_t`,
    `weight_scale`); made by `to_float8` from a Linear in place, so it stays where peft and the
    blocks hold it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = _Float8FrozenMatmul.apply(flat, self.weight_fp8, self.weight_fp8_t, self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def fits(linear: torch.nn.Linear) -> bool:
    return linear.in_features % ALIGNMENT == 0 and linear.out_features % ALIGNMENT == 0


def to_float8(linear: torch.nn.Linear, keep_original: bool = False) -> None:
    """Turn a frozen Linear into a Float8FrozenLinear in place; with `keep_original` its weight
    is kept on the CPU (outside the module: `.to()` and state dicts do not see it), so
    `from_float8` can bring it back exactly."""
    if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
        raise ValueError(f"train.fp8_base: {linear} is trained; only frozen base layers run in FP8")
    if not fits(linear):
        raise ValueError(f"train.fp8_base: {linear} has a dimension not divisible by {ALIGNMENT}")
    weight = linear.weight.detach()
    values, scale = quantize(weight, WEIGHT_DTYPE)
    del linear.weight
    for name, tensor in zip(BUFFERS, (values, values.t().contiguous(), scale)):
        linear.register_buffer(name, tensor)
        # fixed addresses, as the frozen weights had: CUDA graphs read them in place, no copy per replay
        torch._dynamo.mark_static_address(tensor)
    linear._original_weight = weight.to("cpu", copy=True) if keep_original else None
    linear.__class__ = Float8FrozenLinear


def from_float8(linear: Float8FrozenLinear) -> None:
    """Undo `to_float8(keep_original=True)`: the bf16 (or whatever it was) weight back, bit for bit."""
    original = linear._original_weight
    if original is None:
        raise ValueError(f"{linear}: converted without keep_original; the original weight is gone")
    device = linear.weight_fp8.device
    for name in BUFFERS:
        delattr(linear, name)
    del linear._original_weight
    linear.__class__ = torch.nn.Linear
    linear.weight = torch.nn.Parameter(original.to(device), requires_grad=False)


def frozen_base_layers(peft_model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The frozen Linear under every adapted layer: where a LoRA step's GEMM FLOPs are."""
    return [layer.get_base_layer() for _, layer in adapted_linears(peft_model)]


def use_float8_base(peft_model: torch.nn.Module, keep_original: bool = False) -> int:
    """Every adapted layer's frozen base Linear in FP8 (`to_float8`); returns how many. A layer
    whose shape FP8 GEMMs cannot take stays as it is. DDP is told to leave the FP8 buffers alone
    (it would broadcast every buffer from rank 0 before each forward: the whole base, every step)."""
    layers = [layer for layer in frozen_base_layers(peft_model)
              if not isinstance(layer, Float8FrozenLinear) and fits(layer)]
    for layer in layers:
        to_float8(layer, keep_original)
    ignored = {f"{name}.{buffer}" for name, module in peft_model.named_modules()
               if isinstance(module, Float8FrozenLinear) for buffer in BUFFERS}
    peft_model._ddp_params_and_buffers_to_ignore = sorted(
        ignored | set(getattr(peft_model, "_ddp_params_and_buffers_to_ignore", ())))
    return len(layers)


def use_original_base(model: torch.nn.Module) -> int:
    """Undo `use_float8_base(keep_original=True)` on every converted Linear of `model`."""
    layers = [module for module in model.modules() if isinstance(module, Float8FrozenLinear)]
    for layer in layers:
        from_float8(layer)
    return len(layers)
