"""GPU speed levers (docs/performance.md) keep the maths: each one checked on the tiny CPU model."""

from __future__ import annotations

import re

import pytest
import torch
from accelerate import Accelerator
from peft.tuners.tuners_utils import BaseTunerLayer

from artmaster import flux_math, models, train
from artmaster.adalora import ExportedLora, save_lora, set_input_casting, target_modules_regex, wrap_with_adalora
from artmaster.generate import load_adapter


def _inputs(cfg, batch: int = 2, text: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    arch = cfg.model.architecture.transformer
    g = torch.Generator().manual_seed(seed)
    return {
        "latent_mean": torch.randn(batch, 16, 8, 8, generator=g),
        "prompt_embeds": torch.randn(batch, text, arch.joint_attention_dim, generator=g),
        "pooled_prompt_embeds": torch.randn(batch, arch.pooled_projection_dim, generator=g),
    }


def _encodings(cfg) -> dict:
    x = _inputs(cfg)
    return {f"s{i}": {"latent_mean": x["latent_mean"][i], "latent_std": torch.full((16, 8, 8), 0.05),
                      "prompt_embeds": x["prompt_embeds"][i], "pooled_prompt_embeds": x["pooled_prompt_embeds"][i]}
            for i in range(2)}


def _state(cfg):
    pipe = models.build_random_pipeline(cfg.model, with_text_encoders=False)
    return train.build_training_state(cfg, pipe.transformer, pipe.vae.config, 20, Accelerator(cpu=True))


def test_direct_orthogonal_gradient_trains_like_the_autograd_term(make_cfg):
    encodings = _encodings(make_cfg())
    results = {}
    for mode in ("autograd", "direct"):
        cfg = make_cfg("experiment=demo", f"train.adalora.orth_gradient={mode}")
        state = _state(cfg)
        assert state.direct_orthogonal == (mode == "direct")
        outs = [train.training_step(state, [train.make_batch(encodings, ["s0", "s1"])], step,
                                    [train.seeded_generator(0, step)]) for step in (1, 2, 3)]
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
    assert train._direct_orthogonal("auto", on_cuda=True) is True
    with pytest.raises(ValueError, match="orth_gradient='fast'"):
        train._direct_orthogonal("fast", on_cuda=False)


def test_skipping_peft_input_casts_under_bf16_autocast_changes_nothing(make_cfg):
    """bf16 base weights, fp32 adapters, bf16 autocast (the GPU recipe): peft's fp32 copy of each
    adapted input is cast straight back by autocast, so dropping it gives bitwise the same step."""
    cfg = make_cfg("experiment=demo", "model.dtype=bfloat16")
    x = _inputs(cfg)
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
    batch = train.make_batch(train.on_device(_encodings(cfg), "cpu", torch.bfloat16), ["s0", "s1"])
    for step in (1, 2):  # step 1 runs at the warm-up's lr 0
        out = train.training_step(state, [batch], step, [train.seeded_generator(0, step)])
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


def test_fused_adapter_predicts_what_the_loaded_adapter_predicts(make_cfg, tmp_path):
    cfg = make_cfg()
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
    save_lora(ExportedLora(lora_A, lora_B, ranks, out_features), tmp_path / "lora", base_model="tiny",
              trigger="zxh", metadata={}, kohya=False)
    x = _inputs(cfg)
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
