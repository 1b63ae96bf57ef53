import math

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from artmaster import flux_math
from artmaster.models import flow_match_scheduler


@pytest.mark.parametrize("height,width", [(16, 16), (16, 24), (64, 96)])
def test_packing_matches_flux_pipeline_and_round_trips(height, width):
    latents = torch.randn(2, 16, height, width, generator=torch.Generator().manual_seed(0))
    packed = flux_math.pack_latents(latents)
    assert packed.shape == (2, height * width // 4, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, height, width))
    assert torch.equal(flux_math.unpack_latents(packed, height, width), latents)
    # the pipeline unpacks from pixel sizes (8 px per latent)
    assert torch.equal(FluxPipeline._unpack_latents(packed, height * 8, width * 8, 8), latents)


def test_odd_latent_size_is_refused_with_its_size():
    with pytest.raises(ValueError, match="15x16"):
        flux_math.pack_latents(torch.zeros(1, 16, 15, 16))


@pytest.mark.parametrize("height,width", [(16, 16), (16, 24)])
def test_position_ids_match_flux_pipeline(height, width):
    ours = flux_math.latent_image_ids(height, width)
    theirs = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu", torch.float32)
    assert torch.equal(ours, theirs)
    assert ours[width // 2 + 1].tolist() == [0.0, 1.0, 1.0]  # second row, second column
    assert torch.equal(flux_math.text_ids(7), torch.zeros(7, 3))


def test_resolution_shift_is_linear_in_token_count_like_the_pipeline():
    assert flux_math.resolution_shift_mu(256) == pytest.approx(0.5)
    assert flux_math.resolution_shift_mu(4096) == pytest.approx(1.15)
    for tokens in (64, 1024, 1536):
        assert flux_math.resolution_shift_mu(tokens) == pytest.approx(calculate_shift(tokens))


def test_time_shift_matches_the_scheduler_and_pushes_noise_up():
    sigmas = torch.linspace(0.05, 0.95, 10)
    mu = flux_math.resolution_shift_mu(1024)
    ours = flux_math.shift_sigmas(sigmas, mu)
    theirs = flow_match_scheduler().time_shift(mu, 1.0, sigmas)
    torch.testing.assert_close(ours, theirs)
    assert (ours > sigmas).all()


def test_logit_normal_sampling_matches_diffusers_for_the_same_generator():
    ours = flux_math.sample_sigmas(64, generator=torch.Generator().manual_seed(5))
    theirs = compute_density_for_timestep_sampling(
        "logit_normal", 64, logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(ours, theirs)
    assert ((ours > 0) & (ours < 1)).all()
    shifted = flux_math.sample_sigmas(64, generator=torch.Generator().manual_seed(5), mu=1.0)
    torch.testing.assert_close(shifted, flux_math.shift_sigmas(ours, 1.0))


def test_noise_path_ends_and_velocity():
    z = torch.randn(3, 10, 64)
    noise = torch.randn(3, 10, 64)
    sigmas = torch.tensor([0.0, 1.0, 0.25])
    x = flux_math.noisy_latents(z, noise, sigmas)
    assert torch.equal(x[0], z[0]) and torch.equal(x[1], noise[1])
    torch.testing.assert_close(x[2], 0.75 * z[2] + 0.25 * noise[2])
    # x_s moves along the velocity: x_s = z + s * (noise - z)
    torch.testing.assert_close(x, z + sigmas.view(-1, 1, 1) * flux_math.velocity_target(z, noise))


def test_vae_latents_apply_shift_then_scale():
    mean = torch.full((1, 16, 4, 4), 0.5)
    zero_std = torch.zeros_like(mean)
    assert torch.allclose(flux_math.vae_latents(mean, zero_std, 0.1159, 0.3611), torch.tensor((0.5 - 0.1159) * 0.3611))
    spread = flux_math.vae_latents(mean, torch.ones_like(mean), 0.0, 1.0, torch.Generator().manual_seed(0))
    assert spread.std() > 0.5


def test_guidance_vector():
    g = flux_math.guidance_vector(3.5, 4, dtype=torch.bfloat16)
    assert g.shape == (4,) and g.dtype == torch.bfloat16 and math.isclose(float(g[0]), 3.5)
