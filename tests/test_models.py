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


def test_template_caption_words_are_whole_tokens_and_sample_prompts_fit_the_sequence_length():
    # a word missing from the vocabulary is spelled out a token per letter, which pushed the
    # palette words of the captions past max_sequence_length (cut off: the base never saw them)
    from artmaster.config import compose

    cfg = compose()
    _, t5 = local_tokenizers()
    template = cfg.caption.template
    phrases = [value for section in (template.content, template.palette, template.tone, template.composition)
               for key, value in section.items() if key.endswith("_phrase")]
    text = " ".join([cfg.caption.trigger, *phrases, *template.palette.prototypes]).replace("{colours}", "")
    for word in text.replace(",", " ").split():
        assert t5.convert_ids_to_tokens(t5(word, add_special_tokens=False).input_ids) == ["\u2581" + word], word
    for prompt in cfg.base.samples.prompts:
        assert len(t5(prompt).input_ids) <= cfg.model.max_sequence_length, prompt


def test_gpu_memory_peak_is_reported_only_by_processes_that_used_cuda(monkeypatch):
    """Stages add it to metrics.json: nothing on the CPU (CI's outputs stay as they were), the
    CUDA allocator's peak in GB where the stage ran on a GPU."""
    from artmaster.models import gpu_memory_peak

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert gpu_memory_peak() == {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *device: 32_726_923_776)
    assert gpu_memory_peak() == {"peak_gpu_memory_gb": 32.73}
