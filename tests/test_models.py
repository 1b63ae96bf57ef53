import torch
from omegaconf import OmegaConf

from artmaster.models import build_random_pipeline, load_pipeline, local_tokenizers


def test_tiny_profile_uses_flux_classes_and_round_trips_through_a_local_folder(make_cfg, tmp_path):
    cfg = make_cfg()
    pipe = build_random_pipeline(cfg.model)
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)
    assert not list(folder.rglob("*.bin")), "weights must be written as safetensors only"

    loaded = load_pipeline(OmegaConf.merge(cfg.model, {"path": str(folder)}))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        original = dict(getattr(pipe, name).state_dict())
        for key, value in getattr(loaded, name).state_dict().items():
            assert torch.equal(value, original[key]), f"{name}.{key} changed on reload"

    kwargs = dict(height=64, width=96, num_inference_steps=2, guidance_scale=1.0,
                  max_sequence_length=cfg.model.max_sequence_length, output_type="np")
    a = loaded("zxh style mountains", generator=torch.Generator().manual_seed(3), **kwargs).images
    b = pipe("zxh style mountains", generator=torch.Generator().manual_seed(3), **kwargs).images
    assert a.shape == (1, 64, 96, 3)
    assert abs(a - b).max() < 1e-5


def test_seeded_init_is_deterministic(make_cfg):
    cfg = make_cfg()
    a = build_random_pipeline(cfg.model, with_text_encoders=False).transformer.state_dict()
    b = build_random_pipeline(cfg.model, with_text_encoders=False).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_model_folder_names_the_path_and_the_fix(make_cfg, tmp_path):
    cfg = make_cfg()
    missing = tmp_path / "nowhere"
    try:
        load_pipeline(OmegaConf.merge(cfg.model, {"path": str(missing)}))
    except FileNotFoundError as err:
        assert str(missing) in str(err) and "artmaster base" in str(err)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_local_tokenizers_keep_vocabulary_words_whole():
    _, t5 = local_tokenizers()
    tokens = t5.convert_ids_to_tokens(t5("zxh style emerald mist").input_ids)
    assert tokens[:4] == ["\u2581zxh", "\u2581style", "\u2581emerald", "\u2581mist"]
