import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from artmaster import base
from artmaster.models import build_random_pipeline, load_pipeline

# A few steps of everything: checks the plumbing, not the quality (the stage's samples show that).
SMALL = [
    "base.corpus.paintings=4",
    "base.corpus.paint_scale=1",
    "base.corpus.heldout_per_style=1",
    "base.corpus.report_images=2",
    "base.vae.steps=2",
    "base.vae.batch_size=2",
    "base.vae.crop=32",
    "base.vae.warmup_steps=1",
    "base.transformer.steps=3",
    "base.transformer.batch_size=4",
    "base.transformer.warmup_steps=1",
    "base.samples.prompts=[layered ink-wash mountains]",
    "base.samples.seeds=[0,1]",
    "base.samples.steps=2",
    "base.samples.width=64",
    "base.samples.height=64",
]


def test_tiny_base_writes_a_pipeline_that_loads_and_generates(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL)
    result = base.run(cfg)
    out = tmp_path / "data" / "base"
    assert result["out_dir"] == str(out)
    assert (out / "pipeline" / "model_index.json").is_file()
    assert list((out / "pipeline").rglob("*.safetensors")) and not list((out / "pipeline").rglob("*.bin"))
    assert (out / "samples.png").is_file() and (out / "reconstruction.png").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("vae_recon_l1", "vae_recon_l1_heldout_styles", "flow_loss", "latent_shift", "latent_scale"):
        assert math.isfinite(metrics[key]), key
    assert metrics["corpus_images"] == 4 * 2  # every painting cut to both buckets

    pipe = load_pipeline(cfg.model)  # model.path of the tiny profile is data/base/pipeline
    assert pipe.vae.config.scaling_factor == pytest.approx(metrics["latent_scale"])
    assert pipe.vae.config.shift_factor == pytest.approx(metrics["latent_shift"])
    assert pipe.vae.config.scaling_factor != 1.0  # recomputed from the corpus, not the placeholder
    images = pipe("layered ink-wash mountains", height=64, width=96, num_inference_steps=2, guidance_scale=1.0,
                  max_sequence_length=cfg.model.max_sequence_length, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 96, 3) and np.isfinite(images).all()

    # trained weights differ from the seeded random initialisation
    initial = build_random_pipeline(cfg.model, with_text_encoders=False)
    for name in ("transformer", "vae"):
        trained, start = getattr(pipe, name).state_dict(), getattr(initial, name).state_dict()
        assert any(not torch.equal(trained[key], start[key]) for key in start), f"{name} was not trained"


def test_training_steps_are_deterministic_given_the_seed(make_cfg):
    cfg = make_cfg("base.vae.steps=2", "base.vae.batch_size=2", "base.transformer.steps=2",
                   "base.transformer.batch_size=2")
    images = [torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(3)]
    mean = torch.randn(4, 16, 4, 6, generator=torch.Generator().manual_seed(9))
    bucket = base.LatentBucket((48, 32), mean, torch.full_like(mean, 0.01), torch.tensor([0, 1, 0, 1]))
    embeds = torch.randn(2, cfg.model.max_sequence_length, 64, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    results = []
    mlflow.set_tracking_uri(cfg.tracking.uri)
    for _ in range(2):
        pipe = build_random_pipeline(cfg.model, with_text_encoders=False)
        generator = torch.Generator().manual_seed(cfg.seed)
        with mlflow.start_run():
            vae_losses = base.train_vae(pipe.vae, images, cfg.base.vae, generator)
            flow_losses = base.train_transformer(pipe.transformer, [bucket], embeds, pooled, pipe.vae.config,
                                                 cfg.base.transformer, generator)
        results.append((vae_losses, flow_losses, pipe.transformer.state_dict(), pipe.vae.state_dict()))
    (vae_a, flow_a, tr_a, vae_sd_a), (vae_b, flow_b, tr_b, vae_sd_b) = results
    assert vae_a == vae_b and flow_a == flow_b
    assert all(torch.equal(tr_a[k], tr_b[k]) for k in tr_a)
    assert all(torch.equal(vae_sd_a[k], vae_sd_b[k]) for k in vae_sd_a)
    # the posterior variance stays the configured constant
    logvar = pipe.vae.encoder.conv_out.bias[pipe.vae.config.latent_channels :]
    assert torch.all(logvar == cfg.base.vae.posterior_logvar)


def _flat_colour_error(make_cfg, groups: int) -> float:
    """Train a two-level VAE (16-channel blocks, `groups` GroupNorm groups) briefly on 32 px
    patches of flat colours, then reconstruct 128 px patches of new colours: the mean error in
    their centres, as a share of the colours' spread (1.0: the colour is not carried at all)."""
    cfg = make_cfg(
        "model.architecture.vae.block_out_channels=[16,16]",
        "model.architecture.vae.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D]",
        "model.architecture.vae.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D]",
        "model.architecture.vae.latent_channels=4", f"model.architecture.vae.norm_num_groups={groups}",
        "base.vae.steps=150", "base.vae.crop=16", "base.vae.batch_size=8", "base.vae.warmup_steps=5",
    )
    colours = torch.rand(64, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train, test = colours[:48].expand(-1, 3, 32, 32), colours[48:].expand(-1, 3, 128, 128)
    vae = build_random_pipeline(cfg.model, with_text_encoders=False).vae
    mlflow.set_tracking_uri(cfg.tracking.uri)
    with mlflow.start_run():
        base.train_vae(vae, list(train), cfg.base.vae, torch.Generator().manual_seed(0))
        recon = base.reconstruct(vae, test.contiguous(), 16)
    centre = (slice(None), slice(None), slice(32, 96), slice(32, 96))
    spread = (test - test.mean(0)).abs().mean()
    return float((recon[centre] - test[centre]).abs().mean() / spread)


def test_vae_carries_colour_only_with_several_channels_per_groupnorm_group(make_cfg):
    # one channel per group (the old tiny profile: 32 groups on 32 channels) normalises each
    # feature map on its own: flat colours come back as one grey, whatever the input
    assert _flat_colour_error(make_cfg, groups=16) > 0.75
    assert _flat_colour_error(make_cfg, groups=4) < 0.65


def test_vae_groups_that_erase_colour_are_refused(make_cfg):
    cfg = make_cfg("model.architecture.vae.norm_num_groups=32")
    with pytest.raises(ValueError, match="one channel per GroupNorm group.*at most 16 groups"):
        base.check_vae_groups(cfg.model.architecture.vae)
    with pytest.raises(ValueError, match="does not divide"):
        base.check_vae_groups(make_cfg("model.architecture.vae.norm_num_groups=12").model.architecture.vae)
    base.check_vae_groups(make_cfg().model.architecture.vae)  # the shipped profile passes
    with pytest.raises(ValueError, match="norm_num_groups=32"):
        base.run(cfg)
    assert not (Path(cfg.paths.data_dir) / "base").exists()


def test_latent_statistics_normalise_the_corpus_latents():
    generator = torch.Generator().manual_seed(0)
    mean = 0.7 + 2.5 * torch.randn(64, 16, 4, 4, generator=generator)
    bucket = base.LatentBucket((32, 32), mean, torch.full_like(mean, 0.01), torch.zeros(64, dtype=torch.long))
    shift, scale = base.latent_statistics([bucket], generator)
    assert shift == pytest.approx(0.7, abs=0.1)
    assert scale == pytest.approx(1 / 2.5, rel=0.05)
    normalised = (mean - shift) * scale
    assert float(normalised.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(normalised.std()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("size,aspect", [((256, 384), 1.0), ((256, 384), 256 / 384), ((300, 200), 0.5)])
def test_random_window_is_the_largest_of_the_aspect_and_inside(size, aspect):
    rng = np.random.default_rng(0)
    for _ in range(20):
        left, top, right, bottom = base.random_window(size, aspect, rng)
        assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
        assert (right - left) / (bottom - top) == pytest.approx(aspect, rel=0.01)
        assert right - left == size[0] or bottom - top == size[1]


def test_corpus_leaves_out_the_demo_painter_and_its_trigger(make_cfg):
    cfg = make_cfg("base.corpus.paintings=5", "base.corpus.paint_scale=1")
    corpus = base.build_corpus(cfg.base.corpus, cfg.caption)
    assert len(corpus) == 10
    assert "zeng_xiaohu" not in {item.style for item in corpus}
    assert len({item.style for item in corpus}) == 4
    assert {item.image.size for item in corpus} == {(128, 128), (128, 192)}
    assert all(item.caption and cfg.caption.trigger not in item.caption for item in corpus)
    again = base.build_corpus(cfg.base.corpus, cfg.caption)
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(corpus, again)), "corpus not deterministic"


# --- flux_dev ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_layout(tmp_path_factory):
    """A pipeline folder laid out like FLUX.1-dev (tiny weights), with a sharded transformer."""
    from artmaster.config import compose

    folder = tmp_path_factory.mktemp("flux") / "FLUX.1-dev"
    pipe = build_random_pipeline(compose().model)
    pipe.save_pretrained(folder)
    pipe.transformer.save_pretrained(folder / "transformer", max_shard_size="500KB")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)
    return folder


@pytest.fixture
def fake_flux_folder(flux_layout, tmp_path):
    """A fresh copy of the FLUX-like folder that a test may damage."""
    return Path(shutil.copytree(flux_layout, tmp_path / "FLUX.1-dev"))


def _flux_cfg(make_cfg, folder, tmp_path):
    return make_cfg("model=flux_dev", f"model.path={folder}", f"base.weights.hash_cache={tmp_path / 'sha.json'}")


def test_flux_dev_records_revision_and_hashes_of_every_weight_file(make_cfg, fake_flux_folder, tmp_path):
    cfg = _flux_cfg(make_cfg, fake_flux_folder, tmp_path)
    metrics = base.run(cfg)
    record = json.loads((tmp_path / "data" / "base" / "weights.json").read_text())
    files = sorted(p.relative_to(fake_flux_folder).as_posix() for p in fake_flux_folder.rglob("*.safetensors"))
    assert sorted(record["files"]) == files
    assert len([f for f in files if f.startswith("transformer/")]) > 1, "fixture should be sharded"
    for name, entry in record["files"].items():
        assert entry["sha256"] == hashlib.sha256((fake_flux_folder / name).read_bytes()).hexdigest()
    assert record["revision"] == cfg.model.revision and record["profile"] == "flux_dev"
    assert metrics["weight_files"] == len(files)
    assert json.loads((tmp_path / "data" / "base" / "metrics.json").read_text())["weight_files"] == len(files)


def test_flux_dev_hash_cache_is_keyed_by_size_and_mtime(make_cfg, fake_flux_folder, tmp_path):
    cfg = _flux_cfg(make_cfg, fake_flux_folder, tmp_path)
    base.run(cfg)
    cache_path = tmp_path / "sha.json"
    cache = json.loads(cache_path.read_text())
    vae_file = str((fake_flux_folder / "vae" / "diffusion_pytorch_model.safetensors").resolve())
    cache[vae_file]["sha256"] = "remembered"  # a cache hit must not re-read the file
    cache_path.write_text(json.dumps(cache))
    base.run(cfg)
    record = json.loads((tmp_path / "data" / "base" / "weights.json").read_text())
    assert record["files"]["vae/diffusion_pytorch_model.safetensors"]["sha256"] == "remembered"

    stat = (fake_flux_folder / "vae" / "diffusion_pytorch_model.safetensors").stat()
    os.utime(vae_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hash again
    base.run(cfg)
    record = json.loads((tmp_path / "data" / "base" / "weights.json").read_text())
    assert record["files"]["vae/diffusion_pytorch_model.safetensors"]["sha256"] != "remembered"


@pytest.mark.parametrize(
    "remove,named",
    [
        ("transformer", "transformer/ (component folder)"),
        ("vae/diffusion_pytorch_model.safetensors", "vae/*.safetensors"),
        ("transformer/diffusion_pytorch_model-00002-of-", "transformer/diffusion_pytorch_model-00002-of-"),
        ("model_index.json", "model_index.json is missing"),
    ],
)
def test_flux_dev_names_what_is_missing(fake_flux_folder, remove, named):
    for path in list(fake_flux_folder.glob(remove + "*")):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(FileNotFoundError) as error:
        base.weight_files(fake_flux_folder)
    assert named in str(error.value) and str(fake_flux_folder) in str(error.value)


def test_flux_dev_stage_with_missing_weights_fails_and_writes_nothing(make_cfg, fake_flux_folder, tmp_path):
    shutil.rmtree(fake_flux_folder / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2/"):
        base.run(_flux_cfg(make_cfg, fake_flux_folder, tmp_path))
    assert not (tmp_path / "data" / "base").exists(), "a failed check must leave no output"


def test_flux_dev_from_the_hugging_face_cache_records_the_commit(make_cfg, fake_flux_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--black-forest-labs--FLUX.1-dev"
    shutil.copytree(fake_flux_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    cfg = make_cfg("model=flux_dev", f"base.weights.hash_cache={tmp_path / 'sha.json'}")
    base.run(cfg)
    record = json.loads((tmp_path / "data" / "base" / "weights.json").read_text())
    assert record["commit"] == commit and record["revision"] == "main"
    assert record["source"] == "black-forest-labs/FLUX.1-dev"


def test_flux_dev_not_in_cache_says_how_to_get_it(make_cfg, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    cfg = make_cfg("model=flux_dev", f"base.weights.hash_cache={tmp_path / 'sha.json'}")
    with pytest.raises(FileNotFoundError, match="black-forest-labs/FLUX.1-dev.*hf download"):
        base.run(cfg)


def test_flux_dev_random_records_the_architecture(make_cfg, tmp_path):
    cfg = make_cfg("model=flux_dev_random")
    metrics = base.run(cfg)
    record = json.loads((tmp_path / "data" / "base" / "weights.json").read_text())
    assert record["architecture"] == OmegaConf.to_container(cfg.model.architecture, resolve=True)
    assert 11e9 < metrics["transformer_parameters"] < 13e9  # FLUX.1-dev's transformer: 11.9B
