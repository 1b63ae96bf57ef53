"""`train.fp8_base`: the frozen base GEMMs in FP8 (artmaster.float8); on the CPU the FP8 product
is computed in fp32 (`float8.scaled_matmul`), on a GPU by `torch._scaled_mm`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from helpers.launch import offline_env
from helpers.tiny_model import random_encodings

from artmaster import float8, models
from artmaster.config import ConfigError
from artmaster.training.batches import keyed_generator, make_batch
from artmaster.training.checkpoints import run_fingerprint
from artmaster.training.state import build_training_state
from artmaster.training.step import training_step


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _frozen_linear(in_features: int = 64, out_features: int = 48, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features).requires_grad_(False)


def test_quantize_maps_the_absolute_maximum_to_the_largest_fp8_value():
    tensor = torch.tensor([[0.5, -3.0], [1.25, 0.0]])
    for dtype in (float8.WEIGHT_DTYPE, float8.GRAD_DTYPE):
        values, scale = float8.quantize(tensor, dtype)
        assert values.dtype == dtype and scale.dtype == torch.float32 and scale.shape == ()
        assert float(values.float().abs().max()) == torch.finfo(dtype).max
        assert float(values[0, 1].float() * scale) == pytest.approx(-3.0, rel=1e-6)
        assert _relative(values.float() * scale, tensor) < 0.07
    zeros, scale = float8.quantize(torch.zeros(4, 4), float8.WEIGHT_DTYPE)
    assert torch.isfinite(scale) and not zeros.float().any()


def test_fp8_linear_is_the_product_of_the_quantized_operands_forward_and_backward():
    """Forward: x8 * sx @ (W8 * sw)^T + b; backward to the input: g8 * sg @ W8 * sw, g in e5m2;
    within FP8 rounding of the full-precision Linear, and no gradient for the frozen weight."""
    linear, exact = _frozen_linear(), _frozen_linear()
    float8.to_float8(linear)
    assert isinstance(linear, torch.nn.Linear)
    assert sorted(name for name, _ in linear.named_parameters()) == ["bias"]
    assert sorted(name for name, _ in linear.named_buffers()) == ["weight_fp8", "weight_fp8_t", "weight_scale"]
    x = torch.randn(2, 16, 64, requires_grad=True)
    out = linear(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    x8, sx = float8.quantize(x.detach(), float8.WEIGHT_DTYPE)
    weight = linear.weight_fp8.float() * linear.weight_scale
    expected = (x8.float() * sx) @ weight.T + linear.bias
    assert out.shape == (2, 16, 48)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    g8, sg = float8.quantize(grad, float8.GRAD_DTYPE)
    assert torch.allclose(x.grad, (g8.float() * sg) @ weight, rtol=1e-5, atol=1e-5)
    x_exact = x.detach().clone().requires_grad_(True)
    reference = exact(x_exact)
    reference.backward(grad)
    assert _relative(out, reference) < 0.06
    assert _relative(x.grad, x_exact.grad) < 0.1
    assert torch.equal(linear.weight_fp8_t, linear.weight_fp8.t())


def test_fp8_linear_runs_on_any_cpu_kernel_setting():
    """The CPU's FP8 product must not depend on oneDNN's FP8 kernels (AMX only): with oneDNN held
    to AVX2 while ATen keeps its widest kernels, `torch._scaled_mm` failed ("could not create a
    primitive descriptor for the matmul primitive") in CI."""
    script = (
        "import torch\n"
        "from artmaster import float8\n"
        "linear = torch.nn.Linear(64, 48).requires_grad_(False)\n"
        "float8.to_float8(linear)\n"
        "x = torch.randn(2, 16, 64, requires_grad=True)\n"
        "linear(x).sum().backward()\n"
        "print(tuple(x.grad.shape), bool(torch.isfinite(x.grad).all()))\n"
    )
    env = {**offline_env(), "ARTMASTER_CPU_KERNELS": "native", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    env.pop("ATEN_CPU_CAPABILITY", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(2,", "16,", "64)", "True"]


def test_fp8_linear_traces_into_one_compiled_graph():
    linear = _frozen_linear()
    float8.to_float8(linear)
    x = torch.randn(3, 16, 64, requires_grad=True)
    eager = linear(x)
    eager.sum().backward()
    eager_grad, x.grad = x.grad.clone(), None
    compiled = torch.compile(linear, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(out, eager) and torch.equal(x.grad, eager_grad)


def test_conversion_refuses_trained_or_misaligned_layers_and_undoes_exactly():
    trained = torch.nn.Linear(64, 48)
    with pytest.raises(ValueError, match="train.fp8_base: .* is trained"):
        float8.to_float8(trained)
    with pytest.raises(ValueError, match="not divisible by 16"):
        float8.to_float8(_frozen_linear(64, 40))
    linear, original = _frozen_linear(), _frozen_linear()
    float8.to_float8(linear, keep_original=True)
    assert linear._original_weight.device.type == "cpu"
    float8.from_float8(linear)
    assert type(linear) is torch.nn.Linear and not linear.weight.requires_grad
    assert torch.equal(linear.weight, original.weight)
    assert sorted(name for name, _ in linear.named_buffers()) == []
    gone = _frozen_linear()
    float8.to_float8(gone)
    with pytest.raises(ValueError, match="without keep_original"):
        float8.from_float8(gone)


def test_fp8_base_trains_every_adapted_layer_close_to_the_full_precision_base(make_cfg):
    """`train.fp8_base=true`: every adapted layer's base GEMMs run in FP8; three optimizer steps
    give finite losses near the full-precision run's, the same adapter tensors are trained, and
    the base comes back bit for bit when kept."""
    encodings = random_encodings(make_cfg())
    runs = {}
    for fp8 in (False, True):
        cfg = make_cfg("experiment=demo", f"train.fp8_base={str(fp8).lower()}")
        pipe = models.build_random_pipeline(cfg.model, with_text_encoders=False)
        before = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
        state = build_training_state(cfg, pipe.transformer, pipe.vae.config, 20, Accelerator(cpu=True),
                                     keep_original_base=True)
        converted = [m for m in pipe.transformer.modules() if isinstance(m, float8.Float8FrozenLinear)]
        assert len(converted) == (len(float8.frozen_base_layers(state.adapter)) if fp8 else 0)
        outs = [training_step(state, [make_batch(encodings, ["s0", "s1"])], step, [keyed_generator(0, step)])
                for step in (1, 2, 3)]
        runs[fp8] = ([float(out["mse"]) for out in outs], {name: p.detach().clone() for name, p in state.named_params})
        if fp8:
            assert len(converted) == 44
            ignored = state.adapter._ddp_params_and_buffers_to_ignore  # DDP must not broadcast the base
            assert len(ignored) == 3 * 44
            assert all(state.adapter.get_buffer(name).dtype in (float8.WEIGHT_DTYPE, torch.float32) for name in ignored)
            state.adapter.unload()
            assert float8.use_original_base(pipe.transformer) == 44
            after = dict(pipe.transformer.named_parameters())
            assert all(torch.equal(after[name], value) for name, value in before.items())
    (plain_losses, plain_params), (fp8_losses, fp8_params) = runs[False], runs[True]
    assert plain_params.keys() == fp8_params.keys()
    assert all(abs(a - b) / a < 0.05 for a, b in zip(plain_losses, fp8_losses)), (plain_losses, fp8_losses)
    moved = [name for name in fp8_params if not torch.equal(fp8_params[name], plain_params[name])]
    assert moved  # the FP8 base changes the gradients, not which tensors train


def test_fp8_base_is_part_of_a_checkpoint_identity(make_cfg):
    """A run with FP8 base GEMMs computes other gradients: its checkpoints never resume a bf16 run."""
    files = {"s0": "abc"}
    fingerprints = {run_fingerprint(make_cfg("experiment=demo", f"train.fp8_base={flag}"), files, 1)
                    for flag in ("false", "true")}
    assert len(fingerprints) == 2
    with pytest.raises(ConfigError, match="train.fp8_base='yes' is a str, expected true or false"):
        make_cfg("experiment=demo", "train.fp8_base=yes")
