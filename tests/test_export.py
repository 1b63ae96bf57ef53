"""Export of AdaLoRA to plain LoRA: the diffusers and kohya files reproduce the adapter in
diffusers' own loader, ranks differ per module, rank-0 modules are dropped."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from helpers.tiny_model import composed, velocity

from artmaster import adalora
from artmaster.models import build_random_pipeline

TRIGGER = "zxh style"
# Everything diffusers' kohya converter can load at any model size: its single-block linear1
# (q, k, v, mlp-in fused) split is hard-coded to FLUX.1-dev's widths, tested separately below.
KOHYA_TINY_TARGETS = adalora.TARGET_PRESETS["all_linear"].split("|single_transformer_blocks")[0] + (
    r"|single_transformer_blocks\.\d+\.(proj_out|norm\.linear)")


def adapted_pipeline(target_modules: str = "attention_mlp"):
    """Tiny FluxPipeline whose transformer carries AdaLoRA with random factors and a non-uniform
    mask: module i keeps 12 - (i % 13) singular values, so ranks run 12 .. 0."""
    pipe = build_random_pipeline(composed().model)
    # lora_alpha != init_r, so a wrong scale in the export shows
    settings = OmegaConf.merge(composed().train.adalora,
                               {"target_modules": target_modules, "init_r": 12, "lora_alpha": 32})
    model = adalora.wrap_with_adalora(pipe.transformer, settings, total_step=10)
    layout = adalora._layout(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for index, layer in enumerate(layout.layers):
            layer.lora_A["default"].normal_(0, 0.3, generator=g)
            layer.lora_B["default"].normal_(0, 0.3, generator=g)
            singular_values = layer.lora_E["default"]
            singular_values.normal_(0, 1.0, generator=g)
            singular_values[torch.randperm(12, generator=g)[: index % 13]] = 0
    return pipe, model


@pytest.fixture(scope="module")
def adapted():
    pipe, model = adapted_pipeline()
    exported = adalora.export_lora(model)
    return pipe, model, exported


def fresh_pipeline() -> FluxPipeline:
    return build_random_pipeline(composed().model)


def generate(pipe: FluxPipeline) -> torch.Tensor:
    return pipe("zxh style mountains", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=composed().model.max_sequence_length, output_type="latent",
                generator=torch.Generator().manual_seed(3)).images


def test_export_folds_scale_and_singular_values_exactly(adapted):
    _, model, exported = adapted
    layout = adalora._layout(model)
    for name, layer in zip(layout.names, layout.layers):
        kept = int((layer.lora_E["default"] != 0).sum())
        assert exported.ranks[name] == kept
        if kept == 0:
            assert name not in exported.lora_A
            continue
        assert exported.lora_A[name].shape == (kept, layer.in_features)
        assert exported.lora_B[name].shape == (layer.out_features, kept)
        torch.testing.assert_close(exported.lora_B[name] @ exported.lora_A[name],
                                   layer.get_delta_weight("default").detach(), rtol=1e-5, atol=1e-6)
    assert len(set(exported.ranks.values())) == 13
    assert adalora.rank_report(exported) == adalora.rank_report(model) == exported.ranks


def test_diffusers_file_reproduces_the_adalora_model(adapted, tmp_path):
    pipe, model, exported = adapted
    paths = adalora.save_lora(exported, tmp_path, base_model="tiny", trigger=TRIGGER, metadata={"steps": 10})
    assert paths["diffusers"] == tmp_path / adalora.DIFFUSERS_WEIGHT_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())

    weights = load_file(paths["diffusers"])
    dropped = [name for name, rank in exported.ranks.items() if rank == 0]
    assert dropped and not any(key.startswith(f"transformer.{name}.") for name in dropped for key in weights)
    for name, rank in exported.ranks.items():
        if rank:
            assert weights[f"transformer.{name}.alpha"].item() == rank
            assert weights[f"transformer.{name}.lora_A.weight"].shape[0] == rank
    with safe_open(paths["diffusers"], framework="pt") as handle:
        header = handle.metadata()
    assert "lora_adapter_metadata" not in header
    assert header["modelspec.trigger_phrase"] == TRIGGER and json.loads(header["steps"]) == 10

    loaded = fresh_pipeline()
    loaded.load_lora_weights(tmp_path)
    with torch.no_grad():
        expected, base = velocity(model, seed=0), velocity(fresh_pipeline().transformer, seed=0)
        actual = velocity(loaded.transformer, seed=0)
    assert (expected - base).abs().max() > 0.1, "the adapter must change the output, or this test proves nothing"
    assert (actual - expected).abs().max() <= 1e-5
    assert (generate(loaded) - generate(pipe)).abs().max() <= 1e-5


def test_kohya_file_loads_through_diffusers_converter(tmp_path):
    pipe, model = adapted_pipeline(KOHYA_TINY_TARGETS)
    exported = adalora.export_lora(model)
    paths = adalora.save_lora(exported, tmp_path, base_model="tiny", trigger=TRIGGER, metadata={})
    assert paths["kohya"].name == "zxh_style_kohya.safetensors"
    keys = load_file(paths["kohya"]).keys()
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys)
    for stem in ("double_blocks_0_img_attn_qkv", "double_blocks_1_txt_attn_qkv", "double_blocks_0_img_mod_lin",
                 "single_blocks_0_linear2", "single_blocks_3_modulation_lin"):
        assert {f"lora_unet_{stem}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")} <= keys

    loaded = fresh_pipeline()
    loaded.load_lora_weights(tmp_path, weight_name=paths["kohya"].name)
    with torch.no_grad():
        expected, actual = velocity(model, seed=1), velocity(loaded.transformer, seed=1)
    assert (actual - expected).abs().max() <= 1e-5
    assert (generate(loaded) - generate(pipe)).abs().max() <= 1e-5


def test_kohya_fusion_at_flux_dev_size(tmp_path):
    """q, k, v (and the single blocks' MLP input) fuse into BFL's qkv / linear1 exactly, also with
    unequal ranks and missing parts; diffusers' converter splits them back to the same products."""
    dim, mlp = 3072, 12288
    shapes = {"transformer_blocks.0.attn.to_q": (dim, dim), "transformer_blocks.0.attn.to_k": (dim, dim),
              "transformer_blocks.0.attn.to_v": (dim, dim), "transformer_blocks.0.attn.add_q_proj": (dim, 4096),
              "transformer_blocks.0.attn.add_k_proj": (dim, 4096), "transformer_blocks.0.attn.add_v_proj": (dim, 4096),
              "transformer_blocks.0.ff.net.2": (dim, mlp), "single_transformer_blocks.5.attn.to_q": (dim, dim),
              "single_transformer_blocks.5.attn.to_k": (dim, dim), "single_transformer_blocks.5.attn.to_v": (dim, dim),
              "single_transformer_blocks.5.proj_mlp": (mlp, dim),
              "single_transformer_blocks.5.proj_out": (dim, dim + mlp)}
    # k of the double block and proj_mlp of the single block have rank 0: zero rows in the fused up
    ranks = dict(zip(shapes, [3, 0, 5, 4, 4, 4, 2, 6, 1, 2, 0, 7]))
    g = torch.Generator().manual_seed(0)
    lora_A = {n: torch.randn(r, shapes[n][1], generator=g) for n, r in ranks.items() if r}
    lora_B = {n: torch.randn(shapes[n][0], r, generator=g) for n, r in ranks.items() if r}
    exported = adalora.ExportedLora(lora_A, lora_B, ranks, {n: out for n, (out, _) in shapes.items()})
    paths = adalora.save_lora(exported, tmp_path, base_model="FLUX.1-dev", trigger=TRIGGER, metadata={})

    converted = FluxPipeline.lora_state_dict(str(tmp_path), weight_name=paths["kohya"].name)
    for name, (out_features, in_features) in shapes.items():
        probe = torch.randn(in_features, 4, generator=g)
        down = converted[f"transformer.{name}.lora_A.weight"]
        up = converted[f"transformer.{name}.lora_B.weight"]
        expected = lora_B[name] @ (lora_A[name] @ probe) if ranks[name] else torch.zeros(out_features, 4)
        torch.testing.assert_close(up @ (down @ probe), expected, rtol=1e-5, atol=1e-4)


def test_kohya_export_refuses_layers_outside_the_blocks():
    exported = adalora.ExportedLora({"proj_out": torch.ones(1, 4)}, {"proj_out": torch.ones(4, 1)},
                                    {"proj_out": 1}, {"proj_out": 4})
    with pytest.raises(ValueError, match="no kohya/BFL name for module 'proj_out'"):
        adalora.kohya_state_dict(exported)


def test_save_refuses_a_lora_config_in_metadata(tmp_path):
    exported = adalora.ExportedLora({}, {}, {"transformer_blocks.0.attn.to_q": 0}, {})
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        adalora.save_lora(exported, tmp_path, base_model="tiny", trigger=TRIGGER,
                          metadata={"lora_adapter_metadata": "{}"})
    with pytest.raises(ValueError, match="rank 0"):
        adalora.save_lora(exported, tmp_path, base_model="tiny", trigger=TRIGGER, metadata={})
