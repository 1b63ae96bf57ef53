"""Refiners: the regional merge on its own, mask placement on FLUX's packed token grid, the regional
loop against FluxPipeline itself, and inpainting that leaves the outside of the boxes untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from artmaster.config import compose
from artmaster.critic import Edit
from artmaster.flux_math import pack_latents
from artmaster.models import build_random_pipeline
from artmaster.generate import noise_generator
from artmaster.refine import (
    InpaintRefiner,
    RegionalRefiner,
    build_refiner,
    decode_latents,
    feathered_box_alpha,
    merge_regional_predictions,
    regional_latents,
    token_grid_masks,
)

SIZE = dict(height=64, width=96, steps=3, guidance=1.0, max_sequence_length=16)
PROMPT = "zxh style mountains mist"


# --- the merge ----------------------------------------------------------------------------------


def test_merge_with_a_zero_mask_is_the_plain_prediction():
    g, local = torch.randn(1, 12, 8), torch.randn(2, 12, 8)
    assert torch.equal(merge_regional_predictions(g, local, torch.zeros(2, 12)), g)
    assert torch.equal(merge_regional_predictions(g, local[:0], torch.zeros(0, 12)), g)


def test_merge_with_a_mask_of_ones_is_the_mean_of_global_and_local():
    g, local = torch.randn(1, 12, 8), torch.randn(1, 12, 8)
    merged = merge_regional_predictions(g, local, torch.ones(1, 12))
    torch.testing.assert_close(merged, (g + local) / 2)


def test_merge_weights_each_token_by_its_masks():
    g, local = torch.zeros(1, 3, 1), torch.tensor([[[3.0], [3.0], [3.0]], [[6.0], [6.0], [6.0]]])
    masks = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    merged = merge_regional_predictions(g, local, masks).flatten()
    # token 0: (0 + 3 + 6) / 3; token 1: (0 + 0.5 * 3) / 1.5; token 2: untouched
    torch.testing.assert_close(merged, torch.tensor([3.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="2 local predictions but 1 masks"):
        merge_regional_predictions(g, local, masks[:1])


# --- masks on the token grid --------------------------------------------------------------------


def test_token_masks_have_one_value_per_packed_token_in_token_order():
    # 64 x 96 px, VAE /8, 2x2 packing: a 4 x 6 token grid
    masks = token_grid_masks([(16, 0, 48, 32), (0, 48, 96, 64)], 64, 96, 8, blur_sigma=0)
    assert masks.shape == (2, 24)
    grid = masks.reshape(2, 4, 6)
    expected = torch.zeros(4, 6)
    expected[0:2, 1:3] = 1
    assert torch.equal(grid[0], expected)
    assert torch.equal(grid[1][3], torch.ones(6)) and grid[1][:3].sum() == 0


def test_token_masks_follow_the_latent_packing_layout():
    """A box drawn on the latent grid and packed like the latents lands on the same tokens."""
    box = (40, 8, 80, 48)  # partly covers some tokens
    latent = torch.zeros(1, 1, 8, 12)
    latent[..., box[1] // 8 : box[3] // 8, box[0] // 8 : box[2] // 8] = 1
    packed = pack_latents(latent).mean(dim=-1)  # (1, tokens): share of each 2x2 patch inside
    torch.testing.assert_close(token_grid_masks([box], 64, 96, 8, blur_sigma=0), packed)


def test_blurred_token_masks_soften_the_edges_only():
    sharp = token_grid_masks([(32, 16, 64, 48)], 64, 96, 8, blur_sigma=0)
    soft = token_grid_masks([(32, 16, 64, 48)], 64, 96, 8, blur_sigma=6)
    assert soft.min() >= 0 and soft.max() <= 1
    assert (soft[sharp == 0] > 0).any() and (soft[sharp == 1] < 1).any()
    assert abs(float(soft.sum() - sharp.sum())) < 0.5  # blur moves mass, it adds none
    whole = token_grid_masks([(0, 0, 96, 64)], 64, 96, 8, blur_sigma=6)
    assert torch.allclose(whole, torch.ones_like(whole))  # a box touching the border stays whole there


def test_feathered_alpha_is_zero_outside_and_one_deep_inside():
    alpha = feathered_box_alpha((10, 20, 50, 40), (64, 48), feather_px=4)
    assert alpha.shape == (48, 64)
    outside = np.ones_like(alpha, dtype=bool)
    outside[20:40, 10:50] = False
    assert alpha[outside].max() == 0
    assert alpha[26:34, 16:44].min() == 1 and 0 < alpha[20, 30] < 1


# --- refiners on the tiny model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    pipe = build_random_pipeline(compose([]).model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_output(pipe, seed, output_type):
    return pipe(
        PROMPT, generator=noise_generator(seed), height=SIZE["height"], width=SIZE["width"],
        num_inference_steps=SIZE["steps"], guidance_scale=SIZE["guidance"],
        max_sequence_length=SIZE["max_sequence_length"], output_type=output_type,
    ).images


def test_regional_loop_without_edits_reproduces_the_flux_pipeline(pipe):
    expected = _pipeline_output(pipe, 7, "latent")
    latents = regional_latents(pipe, PROMPT, [], torch.zeros(0, 24), 7, batch_size=4, **SIZE)
    assert latents.shape == expected.shape
    assert (latents - expected).abs().max().item() <= 1e-6
    image = decode_latents(pipe, latents, SIZE["height"], SIZE["width"])
    assert np.array_equal(np.asarray(image), np.asarray(_pipeline_output(pipe, 7, "pil")[0]))


def test_regional_refiner_repaints_and_batching_does_not_change_the_result(pipe):
    edits = [Edit((0, 0, 48, 32), "emerald green dotted trees", "palette"), Edit((48, 32, 96, 64), "strong light", "tone")]
    masks = token_grid_masks([e.box for e in edits], SIZE["height"], SIZE["width"], 8, blur_sigma=2)
    one_by_one = regional_latents(pipe, PROMPT, [e.local_prompt for e in edits], masks, 7, batch_size=1, **SIZE)
    batched = regional_latents(pipe, PROMPT, [e.local_prompt for e in edits], masks, 7, batch_size=3, **SIZE)
    torch.testing.assert_close(one_by_one, batched, atol=1e-5, rtol=1e-5)
    plain = _pipeline_output(pipe, 7, "latent")
    assert (batched - plain).abs().max() > 1e-4  # the local prompts changed the denoising

    refiner = build_refiner(pipe, OmegaConf.create({"name": "regional", "mask_blur": 0.03, "batch_size": 4}))
    assert isinstance(refiner, RegionalRefiner)
    refined = refiner.refine(None, PROMPT, 7, edits, **SIZE)
    assert refined.size == (SIZE["width"], SIZE["height"]) and refined.mode == "RGB"


def test_inpaint_refiner_changes_only_the_boxes(pipe):
    original = _pipeline_output(pipe, 3, "pil")[0]
    edits = [Edit((16, 16, 48, 48), "emerald green dotted trees", "palette"), Edit((64, 0, 96, 32), "mist", "tone")]
    refiner = build_refiner(pipe, OmegaConf.create({"name": "inpaint", "strength": 0.9, "feather": 0.05}))
    assert isinstance(refiner, InpaintRefiner)
    refined = np.asarray(refiner.refine(original, PROMPT, 3, edits, **SIZE)).astype(int)
    before = np.asarray(original).astype(int)
    inside = np.zeros(before.shape[:2], dtype=bool)
    for x1, y1, x2, y2 in (e.box for e in edits):
        inside[y1:y2, x1:x2] = True
    assert np.array_equal(refined[~inside], before[~inside])
    assert np.abs(refined[inside] - before[inside]).mean() > 1.0


def test_unknown_refiner_and_bad_settings_are_config_errors(pipe):
    with pytest.raises(ValueError, match=r"refine\.name='paint' is not one of regional, inpaint"):
        build_refiner(pipe, OmegaConf.create({"name": "paint"}))
    with pytest.raises(ValueError, match=r"refine\.strength must be in \(0, 1\]"):
        build_refiner(pipe, OmegaConf.create({"name": "inpaint", "strength": 0.0, "feather": 0.0}))


def test_refine_configs_compose(make_cfg):
    assert make_cfg().refine.name == "regional"
    assert make_cfg("refine=inpaint").refine.name == "inpaint"
