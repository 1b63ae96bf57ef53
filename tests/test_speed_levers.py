"""GPU speed levers (docs/performance.md) keep the maths: each one checked on the tiny CPU model."""

from __future__ import annotations

import re

import pytest
import torch
import torch.utils._python_dispatch
import torch.utils.checkpoint
from accelerate import Accelerator
from helpers.tiny_model import random_encodings, random_inputs
from peft.tuners.tuners_utils import BaseTunerLayer

from artmaster import flux_math, lora_branch, models
from artmaster.adalora import ExportedLora, save_lora, set_input_casting, target_modules_regex, wrap_with_adalora
from artmaster.generate import load_adapter
from artmaster.training.batches import keyed_generator, make_batch, on_device
from artmaster.training.state import FlowSettings, _direct_orthogonal, build_training_state
from artmaster.training.step import training_step


def _state(cfg):
    pipe = models.build_random_pipeline(cfg.model, with_text_encoders=False)
    return build_training_state(cfg, pipe.transformer, pipe.vae.config, 20, Accelerator(cpu=True))


def test_direct_orthogonal_gradient_trains_like_the_autograd_term(make_cfg):
    encodings = random_encodings(make_cfg())
    results = {}
    for mode in ("autograd", "direct"):
        cfg = make_cfg("experiment=demo", f"train.adalora.orth_gradient={mode}")
        state = _state(cfg)
        assert state.direct_orthogonal == (mode == "direct")
        outs = [training_step(state, [make_batch(encodings, ["s0", "s1"])], step,
                                    [keyed_generator(0, step)]) for step in (1, 2, 3)]
        results[mode] = (outs, {name: p.detach().clone() for name, p in state.named_params})
    (outs_a, params_a), (outs_d, params_d) = results["autograd"], results["direct"]
    for a, d in zip(outs_a, outs_d):
        for key in ("loss", "mse", "orthogonal", "grad_norm"):
            assert torch.allclose(a[key], d[key], rtol=1e-5, atol=1e-7), key
    assert float(outs_a[0]["orthogonal"]) > 0
    for name, value in params_a.items():
        assert torch.allclose(value, params_d[name], rtol=1e-4, atol=1e-6), name


def test_orth_gradient_auto_is_direct_on_cuda_only_and_bad_modes_are_named(make_cfg):
    assert _state(make_cfg("experiment=demo")).direct_orthogonal is False  # auto on the CPU
    assert _direct_orthogonal("auto", on_cuda=True) is True
    with pytest.raises(ValueError, match="orth_gradient='fast'"):
        _direct_orthogonal("fast", on_cuda=False)


def test_skipping_peft_input_casts_under_bf16_autocast_changes_nothing(make_cfg):
    """bf16 base weights, fp32 adapters, bf16 autocast (the GPU recipe): peft's fp32 copy of each
    adapted input is cast straight back by autocast, so dropping it gives bitwise the same step."""
    cfg = make_cfg("experiment=demo", "model.dtype=bfloat16")
    x = random_inputs(cfg)
    results = []
    for casting in (True, False):
        transformer = models.build_random_pipeline(cfg.model, with_text_encoders=False).transformer
        transformer.requires_grad_(False)
        torch.manual_seed(0)
        adapter = wrap_with_adalora(transformer, cfg.train.adalora, 20)
        params = [p for p in adapter.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
            torch.nn.init.normal_(p.data, std=0.1)  # lora_E starts at 0: make every factor count
        assert set_input_casting(adapter, casting) == len(
            [m for m in adapter.modules() if isinstance(m, BaseTunerLayer)]) > 0
        tokens = flux_math.pack_latents(x["latent_mean"]).to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = flux_math.predict_velocity(
                adapter, tokens, torch.full((2,), 0.5), prompt_embeds=x["prompt_embeds"].to(torch.bfloat16),
                pooled_prompt_embeds=x["pooled_prompt_embeds"].to(torch.bfloat16),
                image_ids=flux_math.latent_image_ids(8, 8), txt_ids=flux_math.text_ids(8),
                guidance=flux_math.guidance_vector(1.0, 2))
        out.float().pow(2).mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in params]))
    (out_on, grads_on), (out_off, grads_off) = results
    assert torch.equal(out_on, out_off)
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))


def test_bf16_weights_without_autocast_train_fp32_adapters(make_cfg):
    """train.mixed_precision "no" with bf16 base weights: peft casts each adapted input to the fp32
    adapters (so the LoRA branch runs in fp32) and the step trains."""
    cfg = make_cfg("experiment=demo", "model.dtype=bfloat16")
    state = _state(cfg)
    layers = [m for m in state.adapter.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    assert {p.dtype for p in state.params} == {torch.float32}
    before = [p.detach().clone() for p in state.params]
    batch = make_batch(on_device(random_encodings(cfg), "cpu", torch.bfloat16), ["s0", "s1"])
    for step in (1, 2):  # step 1 runs at the warm-up's lr 0
        out = training_step(state, [batch], step, [keyed_generator(0, step)])
        assert torch.isfinite(out["loss"]) and float(out["grad_norm"]) > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, state.params))


def test_compile_is_regional_lazy_and_cuda_only(make_cfg):
    cfg = make_cfg("model.compile=true")
    transformer = models.build_random_pipeline(cfg.model, with_text_encoders=False).transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert models.maybe_compile(transformer, cfg.model) is False  # the CPU: left eager
    cfg.model.compile = "reduce-overhead"
    assert models.maybe_compile(transformer, cfg.model) is False
    assert all(block._compiled_call_impl is None for block in blocks)
    arch = cfg.model.architecture.transformer
    assert models.compile_blocks(transformer) == arch.num_layers + arch.num_single_layers
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert transformer._compiled_call_impl is None  # the blocks, never the whole model
    compiled = [block._compiled_call_impl for block in blocks]
    with models.eager_blocks(transformer):  # e.g. evaluation between CUDA-graph training steps
        assert all(block._compiled_call_impl is None for block in blocks)
    assert [block._compiled_call_impl for block in blocks] == compiled  # the same code: no recompile
    models.uncompile_blocks(transformer)
    assert all(block._compiled_call_impl is None for block in blocks)
    # train.cudagraphs is a CUDA lever too: on the CPU the blocks stay eager
    state = _state(make_cfg("experiment=demo", "train.cudagraphs=true"))
    assert state.cudagraphs is False
    assert all(m._compiled_call_impl is None for m in state.adapter.modules()
               if type(m).__name__ in models.BLOCK_CLASSES)


def _random_lora(cfg, path) -> dict[str, int]:
    """A rank-4 LoRA with random factors on the tiny transformer's attention and MLP layers,
    saved as the train stage exports one; returns the ranks by module."""
    probe = models.build_random_pipeline(cfg.model).transformer
    pattern = re.compile(target_modules_regex("attention_mlp"))
    g = torch.Generator().manual_seed(1)
    lora_A, lora_B, ranks, out_features = {}, {}, {}, {}
    for name, module in probe.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_features[name] = module.out_features
            if pattern.fullmatch(name):
                lora_A[name] = 0.3 * torch.randn(4, module.in_features, generator=g)
                lora_B[name] = 0.3 * torch.randn(module.out_features, 4, generator=g)
                ranks[name] = 4
    save_lora(ExportedLora(lora_A, lora_B, ranks, out_features), path, base_model="tiny",
              trigger="zxh", metadata={}, kohya=False)
    return ranks


def test_fused_adapter_predicts_what_the_loaded_adapter_predicts(make_cfg, tmp_path):
    cfg = make_cfg()
    ranks = _random_lora(cfg, tmp_path / "lora")
    x = random_inputs(cfg)
    outputs = {}
    for fuse in (None, False, True):
        pipe = models.build_random_pipeline(cfg.model)
        if fuse is not None:
            load_adapter(pipe, tmp_path / "lora", fuse=fuse)
        with torch.no_grad():
            outputs[fuse] = flux_math.predict_velocity(
                pipe.transformer, flux_math.pack_latents(x["latent_mean"]), torch.full((2,), 0.5),
                prompt_embeds=x["prompt_embeds"], pooled_prompt_embeds=x["pooled_prompt_embeds"],
                image_ids=flux_math.latent_image_ids(8, 8), txt_ids=flux_math.text_ids(8),
                guidance=flux_math.guidance_vector(1.0, 2))
        layers = [m for m in pipe.transformer.modules() if isinstance(m, BaseTunerLayer)]
        assert len(layers) == (len(ranks) if fuse is False else 0)
    assert (outputs[False] - outputs[None]).abs().max() > 1e-2, "the adapter changed nothing"
    assert torch.allclose(outputs[True], outputs[False], atol=1e-4, rtol=1e-4)


# --- issue 14: LoRA branch in the model's dtype, shared down-projections, one graph per block --------


class _Gemms(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtype and output width of every matrix product (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.calls.append((out.dtype, out.shape[-1]))
        return out


def _adalora(cfg, seed: int = 0):
    """The tiny transformer with AdaLoRA, every factor random (lora_E starts at 0 otherwise) and
    a third of the singular values masked, fp32 adapters as build_training_state makes them."""
    transformer = models.build_random_pipeline(cfg.model, with_text_encoders=False).transformer
    transformer.requires_grad_(False)
    torch.manual_seed(seed)
    adapter = wrap_with_adalora(transformer, cfg.train.adalora, 20)
    for name, param in adapter.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
            torch.nn.init.normal_(param.data, std=0.1)
            if ".lora_E." in name:
                param.data[::3] = 0.0
    return adapter


def _forward_backward(adapter, cfg, dtype=torch.float32):
    """Prediction and the adapters' gradients for one fixed batch."""
    x = random_inputs(cfg)
    prediction = flux_math.predict_velocity(
        adapter, flux_math.pack_latents(x["latent_mean"]).to(dtype), torch.tensor([0.3, 0.7]),
        prompt_embeds=x["prompt_embeds"].to(dtype), pooled_prompt_embeds=x["pooled_prompt_embeds"].to(dtype),
        image_ids=flux_math.latent_image_ids(8, 8), txt_ids=flux_math.text_ids(8),
        guidance=flux_math.guidance_vector(1.0, 2))
    prediction.float().pow(2).mean().backward()
    grads = {name: param.grad.clone() for name, param in adapter.named_parameters() if param.requires_grad}
    adapter.zero_grad(set_to_none=True)
    return prediction.detach().float(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_branch_in_the_model_dtype_runs_bf16_gemms_from_fp32_master_weights(make_cfg):
    """bf16 weights, fp32 adapters: peft copies each adapted input to fp32 and multiplies in fp32;
    the fast branch multiplies in bf16 and hands the fp32 parameters fp32 gradients, as close to an
    fp32 computation of the same bf16 model as peft's branch is."""
    cfg = make_cfg("experiment=demo", "model.dtype=bfloat16")
    results = {}
    for branch in ("peft", "fast", "fp32 truth"):
        adapter = _adalora(cfg)
        if branch == "fast":
            assert lora_branch.use_fast_branch(adapter, shared_down=False) == 44
        if branch == "fp32 truth":
            adapter.float()
        with _Gemms() as gemms:
            results[branch] = _forward_backward(adapter, cfg, torch.float32 if branch == "fp32 truth" else torch.bfloat16)
        results[branch] += (gemms.calls,)
    fp32_gemms = {branch: sum(dtype == torch.float32 for dtype, _ in results[branch][2]) for branch in ("peft", "fast")}
    assert fp32_gemms["peft"] > 0 and fp32_gemms["fast"] == 0
    truth_out, truth_grads, _ = results["fp32 truth"]
    for branch in ("peft", "fast"):
        out, grads, _ = results[branch]
        assert {grad.dtype for grad in grads.values()} == {torch.float32}
        assert _relative(out, truth_out) < 0.02, branch
        errors = [_relative(grads[name], truth_grads[name]) for name in truth_grads if truth_grads[name].norm() > 0]
        assert max(errors) < 0.1, branch
        results[branch] = (_relative(out, truth_out), sorted(errors)[len(errors) // 2])
    assert results["fast"][0] < 1.5 * results["peft"][0] and results["fast"][1] < 1.5 * results["peft"][1]


def test_layers_reading_one_input_share_one_down_projection_gemm(make_cfg):
    """q/k/v (each stream of a double block) and q/k/v + MLP input (single blocks) project their
    input down once; in fp32 the fast branch without sharing is peft's forward bit for bit, with
    sharing equal to rounding, masked AdaLoRA factors included."""
    cfg = make_cfg("experiment=demo")
    adapter = _adalora(cfg)
    with _Gemms() as gemms:
        peft_out, peft_grads = _forward_backward(adapter, cfg)
    peft_calls = gemms.calls
    lora_branch.use_fast_branch(adapter, dtype=torch.float32, shared_down=False)
    out, grads = _forward_backward(adapter, cfg)
    assert torch.equal(out, peft_out) and all(torch.equal(grads[k], peft_grads[k]) for k in grads)
    lora_branch.use_fast_branch(adapter, dtype=torch.float32, shared_down=True)
    with _Gemms() as gemms:
        out, grads = _forward_backward(adapter, cfg)
    assert torch.allclose(out, peft_out, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, peft_grads[name], rtol=1e-4, atol=1e-7), name
    r = int(cfg.train.adalora.init_r)
    arch = cfg.model.architecture.transformer
    # forward down-projections: 2 x 3 per double block and 4 per single block become 2 and 1 GEMMs
    separate = sum(width == r for _, width in peft_calls) - sum(width == r for _, width in gemms.calls)
    assert sum(width == 3 * r for _, width in gemms.calls) >= 2 * arch.num_layers
    assert sum(width == 4 * r for _, width in gemms.calls) >= arch.num_single_layers
    assert separate >= 2 * 3 * arch.num_layers + 4 * arch.num_single_layers
    lora_branch.use_peft_branch(adapter)
    out, _ = _forward_backward(adapter, cfg)
    assert torch.equal(out, peft_out)
    assert not any(hasattr(m, "_shared_input") for m in adapter.modules())


def test_the_fast_branch_trains_like_peft_and_exports_exactly(make_cfg):
    """Three optimizer steps with the fast branch (fp32 tiny model, shared down-projections) give
    peft's losses and adapters up to rounding; the exported plain LoRA predicts what the adapter does."""
    from artmaster.adalora import export_lora, fuse_lora_

    encodings = random_encodings(make_cfg())
    results = {}
    for branch in ("float32", "model"):
        cfg = make_cfg("experiment=demo", f"train.lora_branch.precision={branch}",
                       f"train.lora_branch.shared_down={branch == 'model'}")
        state = _state(cfg)
        switched = [m for m in state.adapter.modules() if type(m).__name__.startswith("Fast")]
        assert bool(switched) == (branch == "model")
        outs = [training_step(state, [make_batch(encodings, ["s0", "s1"])], step,
                                    [keyed_generator(0, step)]) for step in (1, 2, 3)]
        results[branch] = (outs, {name: p.detach().clone() for name, p in state.named_params}, state)
    (outs_p, params_p, _), (outs_f, params_f, state) = results["float32"], results["model"]
    for a, b in zip(outs_p, outs_f):
        assert torch.allclose(a["loss"], b["loss"], rtol=1e-5), (a["loss"], b["loss"])
    for name, value in params_p.items():
        assert torch.allclose(value, params_f[name], rtol=1e-4, atol=1e-6), name
    cfg = make_cfg("experiment=demo")
    exported = export_lora(state.adapter)
    x = random_inputs(cfg)

    def predict(model):
        with torch.no_grad():
            return flux_math.predict_velocity(
                model, flux_math.pack_latents(x["latent_mean"]), torch.full((2,), 0.5),
                prompt_embeds=x["prompt_embeds"], pooled_prompt_embeds=x["pooled_prompt_embeds"],
                image_ids=flux_math.latent_image_ids(8, 8), txt_ids=flux_math.text_ids(8),
                guidance=flux_math.guidance_vector(1.0, 2))

    adapted = predict(state.adapter)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        save_lora(exported, folder, base_model="tiny", trigger="zxh", metadata={}, kohya=False)
        base = models.build_random_pipeline(cfg.model, with_text_encoders=False).transformer
        fuse_lora_(base, folder)
    assert torch.allclose(predict(base), adapted, atol=1e-5, rtol=1e-5)


def test_ranknum_stays_a_constant_on_a_bf16_model(make_cfg):
    """peft re-creates AdaLoRA's rank normaliser as a trainable fp32 Parameter on bf16 models."""
    state = _state(make_cfg("experiment=demo", "model.dtype=bfloat16"))
    assert {name.rsplit(".", 2)[-2] for name, _ in state.named_params} == {"lora_A", "lora_B", "lora_E"}


def test_lora_branch_settings_are_cuda_levers_and_bad_values_are_named(make_cfg):
    from omegaconf import OmegaConf

    adapter = _adalora(make_cfg("experiment=demo"))
    assert lora_branch.configure(adapter, OmegaConf.create({"precision": "auto", "shared_down": "auto"}),
                                 on_cuda=False) == ("float32", False)
    assert not any(type(m).__name__.startswith("Fast") for m in adapter.modules())  # the CPU demo: peft's
    assert lora_branch.configure(adapter, OmegaConf.create({"precision": "auto", "shared_down": "auto"}),
                                 on_cuda=True) == ("model", True)
    assert any(type(m).__name__.startswith("Fast") for m in adapter.modules())
    with pytest.raises(ValueError, match="train.lora_branch.precision='fp16'"):
        lora_branch.configure(adapter, OmegaConf.create({"precision": "fp16"}), on_cuda=True)
    with pytest.raises(ValueError, match="train.lora_branch.shared_down='yes'"):
        lora_branch.configure(adapter, OmegaConf.create({"shared_down": "yes"}), on_cuda=True)


def _counting_backend(graphs: list):
    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    return backend


@pytest.mark.parametrize("shared", [False, True])
def test_compiled_training_traces_one_graph_per_block_class_and_shape(make_cfg, shared):
    """The training compile (`compile_for_training`, here with a counting backend on the CPU):
    two bucket shapes give 2 x 2 graphs, none broken; the inputs of the first double block require
    grad and the first single block gets views like every later one, as without the fixes each
    block class would trace twice per shape."""
    cfg = make_cfg("experiment=demo", f"train.lora_branch.shared_down={shared}", "train.lora_branch.precision=model")
    state = _state(cfg)
    graphs: list = []
    models.compile_blocks(state.adapter.base_model.model, backend=_counting_backend(graphs), fullgraph=True)
    state.flow = FlowSettings(**{**state.flow.__dict__, "inputs_require_grad": True})
    arch = cfg.model.architecture.transformer
    g = torch.Generator().manual_seed(0)
    for step, (h, w) in enumerate([(8, 8), (8, 8), (12, 8), (12, 8), (8, 8)], 1):
        encodings = {"s": {"latent_mean": torch.randn(16, h, w, generator=g), "latent_std": torch.full((16, h, w), .05),
                           "prompt_embeds": torch.randn(8, arch.joint_attention_dim, generator=g),
                           "pooled_prompt_embeds": torch.randn(arch.pooled_projection_dim, generator=g)}}
        out = training_step(state, [make_batch(encodings, ["s"])], step, [keyed_generator(0, step)])
        assert torch.isfinite(out["loss"])
    assert len(graphs) == 4
    models.uncompile_blocks(state.adapter.base_model.model)
    torch._dynamo.reset()


def test_generation_through_compiled_blocks_traces_one_graph_per_block_class(make_cfg):
    cfg = make_cfg("experiment=demo")
    pipe = models.build_random_pipeline(cfg.model)
    graphs: list = []
    models.compile_blocks(pipe.transformer, backend=_counting_backend(graphs), fullgraph=True)
    from artmaster.generate import generate_images

    generate_images(pipe, ["a", "b"], [0, 1], height=64, width=64, steps=2, guidance=1.0, max_sequence_length=8,
                    batch_size=2)
    assert len(graphs) == 2
    torch._dynamo.reset()


def test_inference_keeps_one_graph_per_block_class_and_batch_size(make_cfg, tmp_path):
    """What evaluate and augment do through compiled blocks: paint with the base model, fold an
    adapter in, paint again, then a regional refinement whose passes come 3 and then 1 at a time.
    The loader freezes every weight, so folding the adapter in (peft freezes what it wraps) fails
    no requires_grad guard; static shapes give each batch size its graph and nothing more."""
    cfg = make_cfg("experiment=demo")
    _random_lora(cfg, tmp_path / "lora")
    pipe = models.frozen_and_compiled(models.build_random_pipeline(cfg.model), cfg.model)
    assert not [name for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)
                and any(p.requires_grad for p in component.parameters())]
    graphs: list = []
    models.compile_blocks(pipe.transformer, backend=_counting_backend(graphs), fullgraph=True)
    from artmaster.generate import generate_images
    from artmaster.refine import regional_latents

    size = dict(height=64, width=64, steps=2, guidance=3.5, max_sequence_length=8)
    generate_images(pipe, ["a", "b"], [0, 1], batch_size=2, **size)
    load_adapter(pipe, tmp_path / "lora", fuse=True)
    generate_images(pipe, ["a", "b"], [0, 1], batch_size=2, **size)
    assert len(graphs) == 2
    regional_latents(pipe, "a", ["b", "c", "d"], torch.ones(3, 16), 0, batch_size=3, **size)  # passes 3 + 1
    assert len(graphs) == 6
    torch._dynamo.reset()


def test_selective_checkpointing_recomputes_the_chosen_blocks_and_keeps_the_gradients(make_cfg, monkeypatch):
    cfg = make_cfg("experiment=demo")
    adapter = _adalora(cfg)
    transformer = adapter.base_model.model
    out, grads = _forward_backward(adapter, cfg)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    blocks = models.transformer_blocks(transformer)
    assert models.enable_checkpointing(transformer, 0.5) == len(blocks) // 2
    out_ckpt, grads_ckpt = _forward_backward(adapter, cfg)
    assert len(calls) == len(blocks) // 2
    assert {fn.__self__ for fn in calls} == {blocks[i] for i in range(0, len(blocks), 2)}
    assert torch.allclose(out_ckpt, out) and all(torch.allclose(grads_ckpt[k], grads[k], atol=1e-7) for k in grads)
    with pytest.raises(ValueError, match="gradient_checkpointing_fraction=0"):
        models.enable_checkpointing(transformer, 0)
