"""Critics: the grounding parser on recorded answers, the style critic on synthetic paintings, and
the VLM critic's loading and decoding path on tiny random-weight models saved locally."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from artmaster.critic import (
    BoxLimits,
    Edit,
    StyleCritic,
    StyleCriticSettings,
    VlmCritic,
    VlmCriticSettings,
    build_critic,
    caption_vocabulary,
    grid_boxes,
    parse_edits,
)
from artmaster.metrics import StyleFeatureExtractor, StyleModel
from artmaster.metrics.features import WEIGHT_FREE_BLOCKS
from artmaster.painter import STYLES, paint
from helpers.tiny_vlm import save_tiny_llava, save_tiny_qwen2_vl

LIMITS = BoxLimits(min_area=0.01, max_area=0.6, max_edits=5)

# --- parser: Qwen2-VL boxes in 0-1000 coordinates ------------------------------------------------

QWEN2VL_ANSWER = (
    "The trees and the sky drift from the painter's style. "
    "<|object_ref_start|>emerald green dotted trees<|object_ref_end|><|box_start|>(100,500),(400,900)<|box_end|>"
    " and <|object_ref_start|>misty light over the peaks<|object_ref_end|>"
    "<|box_start|>( 500 , 0 ),( 1000 , 250 )<|box_end|><|im_end|>"
)


def test_qwen2vl_boxes_are_scaled_from_0_1000_to_pixels_with_their_labels():
    edits = parse_edits(QWEN2VL_ANSWER, "qwen2vl", (200, 100), (1000, 1000), LIMITS, local_prompt="zxh style, {label}")
    assert [e.box for e in edits] == [(20, 50, 80, 90), (100, 0, 200, 25)]
    assert [e.local_prompt for e in edits] == [
        "zxh style, emerald green dotted trees", "zxh style, misty light over the peaks",
    ]
    assert all(isinstance(e, Edit) and e.reason for e in edits)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("<|object_ref_start|>trees<|object_ref_end|><|box_start|>(400,400),(100,900)<|box_end|>", "reversed x"),
        ("<|object_ref_start|>trees<|object_ref_end|><|box_start|>(300,300),(300,700)<|box_end|>", "zero width"),
        ("<|object_ref_start|>trees<|object_ref_end|><|box_start|>(100,100),(150,150)<|box_end|>", "tiny"),
        ("<|object_ref_start|>all<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>", "whole image"),
        ("<|box_start|>(100,100),(500,500)<|box_end|>", "no label"),
        ("<|object_ref_start|>trees<|object_ref_end|><|box_start|>(100,100),(500,500)", "unterminated"),
        ("<|object_ref_start|>trees<|object_ref_end|><|box_start|>(100,100,500,500)<|box_end|>", "not two points"),
        ("I cannot find any region to change.", "no box at all"),
    ],
)
def test_qwen2vl_unusable_boxes_are_dropped(answer, why):
    assert parse_edits(answer, "qwen2vl", (256, 256), (1000, 1000), LIMITS) == [], why


def test_boxes_outside_the_image_are_clamped_and_the_count_capped():
    answer = "".join(
        f"<|object_ref_start|>region {i}<|object_ref_end|><|box_start|>(-50,{100 * i}),(400,{100 * i + 300})<|box_end|>"
        for i in range(4)
    ) + "<|object_ref_start|>edge<|object_ref_end|><|box_start|>(800,800),(1200,1300)<|box_end|>"
    edits = parse_edits(answer, "qwen2vl", (100, 100), (1000, 1000), BoxLimits(0.01, 0.6, 3))
    assert [e.box for e in edits] == [(0, 0, 40, 30), (0, 10, 40, 40), (0, 20, 40, 50)]
    last = parse_edits(answer, "qwen2vl", (100, 100), (1000, 1000), LIMITS)[-1]
    assert last.box == (80, 80, 100, 100)


# --- parser: Qwen2.5-VL JSON bbox_2d in pixels of the model's input -----------------------------

QWEN25VL_ANSWER = """```json
[
  {"bbox_2d": [28, 56, 140, 168], "label": "trees", "prompt": "emerald and ochre dotted trees", "reason": "flat green"},
  {"bbox_2d": [0, 0, 280, 70], "label": "sky band with strong light"}
]
```"""


def test_qwen25vl_json_boxes_are_scaled_from_the_models_input_size():
    # the model saw the image resized to 280x280; the image itself is 128x64
    edits = parse_edits(QWEN25VL_ANSWER, "qwen25vl", (128, 64), (280, 280), LIMITS, label_keys=["prompt", "label"])
    assert [e.box for e in edits] == [(13, 13, 64, 38), (0, 0, 128, 16)]
    assert [e.local_prompt for e in edits] == ["emerald and ochre dotted trees", "sky band with strong light"]
    assert edits[0].reason == "flat green"


def test_qwen25vl_truncated_and_malformed_json_keeps_the_readable_objects():
    answer = (
        'Here: [{"bbox_2d": [10, 10, 60, 60], "label": "ridge"}, {"bbox_2d": [1, 2, "x", 4], "label": "bad"}, '
        '{"bbox_2d": [5, 5, 50], "label": "three numbers"}, {"label": "no box"}, {"bbox_2d": [70, 70, 90, 9'
    )
    edits = parse_edits(answer, "qwen25vl", (100, 100), (100, 100), LIMITS)
    assert [(e.box, e.local_prompt) for e in edits] == [((10, 10, 60, 60), "ridge")]
    assert parse_edits("not json at all {", "qwen25vl", (100, 100), (100, 100), LIMITS) == []


def test_unknown_box_format_is_a_config_error():
    with pytest.raises(ValueError, match=r"critic\.box_format='yolo'"):
        parse_edits("", "yolo", (10, 10), (10, 10), LIMITS)


# --- style critic -------------------------------------------------------------------------------


def test_caption_vocabulary_counts_words_and_ignores_stopwords_and_trigger():
    captions = ["zxh style, ink mist and mountains", "zxh style, mist over mountains", "zxh style, mist, gorge"]
    assert caption_vocabulary(captions, 2, ["zxh", "style", "and", "over"]) == ["mist", "mountains"]
    assert caption_vocabulary(captions, 10, ["zxh", "style", "and", "over"])[2:] == ["gorge", "ink"]


def test_grid_boxes_tile_the_image_at_each_scale():
    boxes = grid_boxes((90, 60), [1, 3])
    assert boxes[0] == (0, 0, 90, 60) and len(boxes) == 1 + 9
    assert boxes[1] == (0, 0, 30, 20) and boxes[-1] == (60, 40, 90, 60)


@pytest.fixture(scope="module")
def painter_reference():
    from artmaster.config import compose

    metrics = compose([]).style_metric
    extractor = StyleFeatureExtractor.from_config(metrics)
    works = [paint(STYLES["zeng_xiaohu"], 192, 192, seed) for seed in range(6)]
    return extractor, StyleModel.fit(extractor.extract(works), metrics)


def _critic_settings(make_cfg, **changes):
    cfg = make_cfg(*(f"critic.{key}={value}" for key, value in changes.items()))
    return cfg.critic


def test_style_critic_marks_the_region_painted_in_another_style(make_cfg, painter_reference):
    extractor, model = painter_reference
    image = paint(STYLES["zeng_xiaohu"], 192, 192, 42)
    foreign = paint(STYLES["warm_sunset_western"], 192, 192, 42).crop((96, 0, 192, 96))
    image.paste(foreign, (96, 0))
    critic = StyleCritic(
        StyleCriticSettings.from_config(_critic_settings(make_cfg, grids="[2]", max_edits=1, min_deviation=0.0)),
        extractor, model,
        ["zxh style, ink-wash mountains, mist", "zxh style, mist between peaks"],
    )
    edits = critic.critique(image, "zxh style, mountains")
    assert len(edits) == 1
    assert edits[0].box == (96, 0, 192, 96)
    block = edits[0].reason.split()[0]
    assert block in WEIGHT_FREE_BLOCKS
    assert edits[0].local_prompt.startswith(f"zxh style, {critic.phrases[block]}")
    assert "mist" in edits[0].local_prompt  # the captions' most frequent word


def test_style_critic_returns_nothing_when_no_region_deviates_enough(make_cfg, painter_reference):
    extractor, model = painter_reference
    critic = build_critic(_critic_settings(make_cfg, min_deviation=1e6), extractor=extractor, model=model)
    assert critic.critique(paint(STYLES["zeng_xiaohu"], 128, 128, 7), "zxh style") == []


def test_style_critic_chooses_cells_that_barely_overlap(make_cfg, painter_reference):
    extractor, model = painter_reference
    critic = build_critic(
        _critic_settings(make_cfg, grids="[2,3]", max_edits=4, min_deviation=0.0, max_overlap=0.0),
        extractor=extractor, model=model,
    )
    edits = critic.critique(paint(STYLES["snow_pine"], 128, 128, 3), "zxh style")
    assert len(edits) == 4
    for i, a in enumerate(edits):
        for b in edits[i + 1 :]:
            overlap_w = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
            overlap_h = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
            assert overlap_w <= 0 or overlap_h <= 0


def test_style_critic_needs_the_fitted_model(make_cfg):
    with pytest.raises(ValueError, match="needs the painter's feature extractor"):
        build_critic(make_cfg().critic)


# --- vlm critic ---------------------------------------------------------------------------------


def _vlm_settings(make_cfg, folder, *extra):
    return make_cfg(
        "critic=vlm", f"critic.model_path={folder}", "critic.max_new_tokens=12", "critic.device=cpu",
        "critic.dtype=float32", *extra,
    ).critic


def _vlm_critic(make_cfg, folder, *extra) -> VlmCritic:
    return VlmCritic(VlmCriticSettings.from_config(_vlm_settings(make_cfg, folder, *extra)))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def test_vlm_critic_loads_a_local_model_and_returns_a_list(make_cfg, tiny_llava):
    critic = build_critic(_vlm_settings(make_cfg, tiny_llava))
    assert isinstance(critic, VlmCritic)
    edits = critic.critique(Image.new("RGB", (96, 64), "white"), "zxh style, a gorge")
    assert isinstance(edits, list) and all(isinstance(e, Edit) for e in edits)


def test_vlm_critic_keeps_the_grounding_tokens_when_decoding(make_cfg, tiny_llava, monkeypatch):
    """Boxes are written with special tokens: decoding must not strip them."""
    critic = _vlm_critic(make_cfg, tiny_llava)
    answer = critic.processor.tokenizer(QWEN2VL_ANSWER, return_tensors="pt").input_ids

    def recorded_generate(input_ids, **kwargs):
        return torch.cat([input_ids, answer], dim=1)

    monkeypatch.setattr(critic.model, "generate", recorded_generate)
    edits = critic.critique(Image.new("RGB", (200, 100), "white"), "zxh style, peaks")
    assert [e.box for e in edits] == [(20, 50, 80, 90), (100, 0, 200, 25)]
    assert edits[0].local_prompt == "zxh style, emerald green dotted trees"


def test_vlm_critic_refuses_a_missing_folder_and_non_safetensors_weights(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"critic\.model_path=.*nowhere.* is not a folder"):
        _vlm_critic(make_cfg, tmp_path / "nowhere")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        _vlm_critic(make_cfg, tmp_path / "pickled")


def torchvision_problem() -> str:
    """"" when torchvision imports; else why not. PyPI's Linux wheel of torchvision 0.28.0 is built
    against CUDA torch: next to torch 2.13.0+cpu it installs but its import fails (RuntimeError:
    operator torchvision::nms does not exist)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return "is not installed"
    except RuntimeError as error:
        return f"is installed but does not import next to torch {torch.__version__} ({error})"
    return ""


@pytest.mark.slow
def test_vlm_critic_on_a_tiny_qwen2_vl(make_cfg, tmp_path):
    problem = torchvision_problem()
    if problem:
        pytest.skip(f"transformers' Qwen2-VL processor needs torchvision, which {problem}; "
                    "`pip install -e '.[vlm]'` next to the CUDA build of torch 2.13.0 brings a working one")
    folder = save_tiny_qwen2_vl(tmp_path / "qwen2vl")
    for box_format in ("qwen2vl", "qwen25vl"):
        critic = _vlm_critic(make_cfg, folder, f"critic.box_format={box_format}")
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
        edits = critic.critique(image, "zxh style, a waterfall")
        assert isinstance(edits, list)
    # Qwen2.5-VL-style pixel boxes refer to the resized input the processor made
    inputs = critic.processor(text=[critic._request("x")], images=[image], return_tensors="pt")
    width, height = critic._coordinate_size(image, inputs)
    assert width % 28 == 0 and height % 28 == 0 and (width, height) != (90, 60)
