"""Style-fidelity metrics: validated on synthetic painters, plus the statistics they rest on."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageFilter

from artmaster.config import compose
from artmaster.metrics import (
    FeatureSet,
    ModelSettings,
    StyleFeatureExtractor,
    StyleModel,
    paired_effect,
    validate,
)
from artmaster.metrics import stats
from artmaster.metrics.backends import load_backend
from artmaster.metrics.features import image_files
from artmaster.metrics.transfer import ChannelMatcher, JointMatcher
from artmaster.painter import STYLES, paint, rotate_hue

DEMO = "zeng_xiaohu"
WORKS_PER_PAINTER = 10
SIZE = (256, 192)


@pytest.fixture(scope="module")
def metrics():
    return compose().style_metric


@pytest.fixture(scope="module")
def extractor(metrics):
    return StyleFeatureExtractor.from_config(metrics)


@pytest.fixture(scope="module")
def painter_features(extractor):
    """Ten works of each synthetic painter, in mixed sizes and orientations."""
    features = {}
    for name, style in STYLES.items():
        works = [paint(style, *(SIZE if seed % 3 else SIZE[::-1]), seed) for seed in range(WORKS_PER_PAINTER)]
        features[name] = extractor.extract(works, [f"{name}_{seed}" for seed in range(WORKS_PER_PAINTER)])
    return features


@pytest.fixture(scope="module")
def demo_model(painter_features, metrics):
    return StyleModel.fit(painter_features[DEMO], metrics)


@pytest.fixture(scope="module")
def held_out():
    """Works of the demo painter that no model here was fitted on."""
    return [paint(STYLES[DEMO], *SIZE, seed) for seed in range(100, 106)]


# -- validation on synthetic painters ------------------------------------------------------------


@pytest.mark.parametrize("painter", sorted(STYLES))
def test_each_synthetic_painter_is_told_from_the_others(painter, painter_features, metrics):
    others = FeatureSet.concatenate([f for name, f in painter_features.items() if name != painter])
    result = validate(painter_features[painter], others, ModelSettings.from_config(metrics))
    assert result.retrieval_accuracy >= 0.95, result.misretrieved
    assert result.auc >= 0.95
    assert result.painter_scores.mean() > result.others_scores.mean()


def test_validation_holds_out_whole_groups(painter_features, metrics):
    """Leave-one-scan-out: a work's siblings (same group) never vouch for it."""
    demo, settings = painter_features[DEMO], ModelSettings.from_config(metrics)
    groups = [str(i // 2) for i in range(len(demo))]
    others = painter_features["snow_pine"]
    grouped = validate(demo, others, settings, painter_groups=groups)
    assert grouped.painter_groups == len(demo) // 2
    twins = FeatureSet.concatenate([demo, demo])  # each work twice: leave-one-out would see its twin
    twin_groups = [str(i % len(demo)) for i in range(2 * len(demo))]
    by_work = validate(twins, others, settings, painter_groups=twin_groups)
    by_file = validate(twins, others, settings)
    assert by_file.painter_scores.mean() > by_work.painter_scores.mean() + 0.5
    np.testing.assert_allclose(by_work.painter_scores[: len(demo)], by_work.painter_scores[len(demo):])
    with pytest.raises(ValueError, match="at least 2 scans"):
        validate(demo, others, settings, painter_groups=["one"] * len(demo))


def _best_other_painter_score(model: StyleModel, painter_features) -> float:
    return max(model.score(features).max() for name, features in painter_features.items() if name != DEMO)


def test_held_out_works_score_like_references_and_other_painters_far_lower(
    demo_model, extractor, held_out, painter_features
):
    own = demo_model.score(extractor.extract(held_out))
    assert np.all(own > -2.5), own  # a typical reference work scores about -1 against the others
    assert _best_other_painter_score(demo_model, painter_features) < own.min() - 2.0


def test_the_painters_works_in_other_hues_score_lower(demo_model, extractor, held_out):
    """Which colours occur is part of the style (colour_detail): the same paintings with their hues
    turned score lower, every one of them."""
    own = demo_model.score(extractor.extract(held_out))
    for steps in (28, -28):
        turned = demo_model.score(extractor.extract([rotate_hue(work, steps) for work in held_out]))
        assert np.all(turned < own), (steps, turned, own)


def test_a_tone_curve_barely_moves_tone_texture(extractor):
    """Tone texture is measured on per-image equalised lightness: a strong tone curve moves it only
    by resampling and 8-bit rounding, far less than another painter's brushwork does."""
    grey = paint(STYLES["dry_brush_monochrome"], 256, 192, 3).convert("L").convert("RGB")
    curved = grey.point(lambda v: round(255 * (v / 255) ** 2.2))
    other = paint(STYLES["snow_pine"], 256, 192, 3).convert("L").convert("RGB")
    a, b, c = extractor.extract([grey, curved, other]).image[:, extractor.blocks["tone_texture"]]
    assert np.linalg.norm(a - b) < 0.25 * np.linalg.norm(a - c)
    assert np.abs(np.asarray(grey, dtype=int) - np.asarray(curved, dtype=int)).max() > 60


def test_a_colour_lookup_table_does_not_buy_the_painters_colour_structure(demo_model, extractor, painter_features,
                                                                          held_out):
    """Washes of the painter's colours, lookup-table matched to the painter, stay far off in the
    colour blocks: the table moves colours, not where and at what scale they occur."""
    painter_pixels = held_out
    washes = [paint(STYLES["warm_sunset_western"], 256, 192, seed) for seed in range(4)]
    for matcher in (ChannelMatcher.fit(painter_pixels), JointMatcher.fit(painter_pixels)):
        matched = extractor.extract([matcher(work) for work in washes])
        own = demo_model.score(extractor.extract(held_out))
        assert demo_model.score(matched).max() < own.min()


def test_scores_barely_move_with_image_size_format_and_alpha(demo_model, extractor, painter_features):
    work = paint(STYLES[DEMO], 400, 300, 107)
    jpeg = io.BytesIO()
    work.save(jpeg, "JPEG", quality=90)
    variants = {
        "rgba": work.convert("RGBA"),
        "jpeg": Image.open(io.BytesIO(jpeg.getvalue())),
        "double": work.resize((800, 600), Image.Resampling.LANCZOS),
        "smaller": work.resize((320, 240), Image.Resampling.LANCZOS),
    }
    scores = demo_model.score(extractor.extract([work, *variants.values()]))
    assert scores[1] == scores[0], "an opaque alpha channel must not change anything"
    # q90 JPEG with 4:2:0 chroma subsampling blurs the colour dots a little: a real but small loss
    np.testing.assert_allclose(scores[2:], scores[0], atol=1.0)
    assert scores.min() > _best_other_painter_score(demo_model, painter_features) + 2.0


def test_set_distance_is_about_zero_for_the_painter_and_large_for_another(
    demo_model, extractor, held_out, painter_features
):
    own = demo_model.set_distance(extractor.extract(held_out))
    assert own.low <= 0.0 <= own.high
    other = demo_model.set_distance(painter_features["snow_pine"])
    assert other.low > own.high
    assert other.confidence == 0.95


# -- features --------------------------------------------------------------------------------------


def test_features_are_deterministic_and_finite(extractor):
    works = [paint(STYLES["blue_green_gongbi"], 200, 300, seed) for seed in (1, 2)]
    first, second = extractor.extract(works), extractor.extract(works)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.tiles, second.tiles)
    assert np.isfinite(first.image).all()
    assert first.image.shape == (2, extractor.tile_dim)
    assert list(first.blocks) == ["tone_texture", "colour_structure", "colour_detail"]


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (300, 200), 128),
        Image.new("LA", (120, 90), (40, 100)),
        Image.new("RGBA", (64, 64), (10, 200, 30, 0)),
        Image.new("P", (50, 80), 3),
        Image.new("1", (90, 90), 1),
        Image.new("CMYK", (100, 60), (0, 50, 200, 0)),
        Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20),
        Image.new("RGB", (3, 5), (200, 10, 10)),
        Image.new("RGB", (20, 2000), (90, 90, 90)),
    ],
    ids=["L", "LA", "RGBA-transparent", "P", "1bit", "CMYK", "I16", "tiny", "long"],
)
def test_any_mode_and_shape_gives_finite_features(image, extractor):
    features = extractor.extract([image])
    assert features.image.shape == (1, extractor.tile_dim)
    assert np.isfinite(features.image).all()
    assert 1 <= len(features.tiles) <= extractor.settings.max_tiles


def test_transparent_pixels_read_as_white_paper(extractor):
    transparent = extractor.extract([Image.new("RGBA", (80, 80), (0, 0, 0, 0))])
    white = extractor.extract([Image.new("RGB", (80, 80), "white")])
    np.testing.assert_allclose(transparent.image, white.image)


def test_unreadable_files_are_skipped_with_a_message_naming_them(extractor, tmp_path, caplog):
    paint(STYLES[DEMO], 96, 96, 0).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    whole = io.BytesIO()
    paint(STYLES[DEMO], 96, 96, 1).save(whole, "PNG")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "truncated.png").write_bytes(whole.getvalue()[:300])
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in image_files(tmp_path)] == ["broken.png", "good.png", "truncated.png"]
    with caplog.at_level(logging.WARNING):
        features, skipped = extractor.extract_folder(tmp_path, progress=False)
    assert features.names == ["good.png"]
    assert sorted(err.path.name for err in skipped) == ["broken.png", "truncated.png"]
    assert "broken.png" in caplog.text and "truncated.png" in caplog.text


def test_missing_folder_is_a_clear_error(extractor, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        extractor.extract_folder(tmp_path / "nowhere")


def test_feature_set_subset_and_concatenate_keep_tiles_with_their_images(painter_features):
    demo = painter_features[DEMO]
    picked = demo.subset([3, 1])
    assert picked.names == [demo.names[3], demo.names[1]]
    np.testing.assert_array_equal(picked.tiles[picked.tile_owner == 0], demo.tiles[demo.tile_owner == 3])
    both = FeatureSet.concatenate([picked, demo.subset([0])])
    assert both.names[-1] == demo.names[0]
    np.testing.assert_array_equal(both.tiles[both.tile_owner == 2], demo.tiles[demo.tile_owner == 0])


def test_nearest_reference_finds_a_reference_work_itself(painter_features, demo_model):
    demo = painter_features[DEMO]
    index, distance = demo_model.nearest_references(demo.subset([4, 7]))
    np.testing.assert_array_equal(index, [4, 7])
    np.testing.assert_allclose(distance, 0.0, atol=1e-9)
    _, other_distance = demo_model.nearest_references(painter_features["snow_pine"])
    assert other_distance.min() > demo_model.typical_distance


def test_model_rejects_too_few_references_and_mismatched_features(painter_features, metrics):
    demo = painter_features[DEMO]
    with pytest.raises(ValueError, match="at least 2 reference"):
        StyleModel.fit(demo.subset([0]), metrics)
    model = StyleModel.fit(demo, metrics)
    stripped = FeatureSet(demo.names, demo.image[:, :10], demo.tiles, demo.tile_owner, {"tone_texture": slice(0, 10)})
    with pytest.raises(ValueError, match="same settings"):
        model.score(stripped)


# -- region scoring (for the augment critic) -------------------------------------------------------

REGION = (96, 64, 224, 192)


@pytest.fixture(scope="module")
def region_work():
    return paint(STYLES[DEMO], 384, 256, 120)


def _edit_region(image: Image.Image, edit) -> Image.Image:
    edited = image.copy()
    edited.paste(edit(image.crop(REGION)), REGION[:2])
    return edited


@pytest.mark.parametrize(
    ("edit", "block"),
    [
        (lambda im: rotate_hue(im, 85), "colour_detail"),
        (lambda im: im.filter(ImageFilter.GaussianBlur(3)), "tone_texture"),
    ],
    ids=["hue", "blurred"],
)
def test_region_scoring_names_the_block_that_deviates(edit, block, demo_model, extractor, region_work):
    work = region_work
    untouched = demo_model.score_region(extractor.region_features(work, REGION))
    edited = demo_model.score_region(extractor.region_features(_edit_region(work, edit), REGION))
    assert max(untouched.deviation.values()) < 2.0
    assert edited.worst_block == block or block == "tone_texture" and edited.worst_block == "colour_structure"
    assert edited.style_score < untouched.style_score
    assert edited.deviation[block] > untouched.deviation[block] + 0.5


def test_small_and_out_of_bounds_boxes_are_measured_on_a_full_tile(demo_model, extractor, region_work):
    work = region_work
    tiny = extractor.region_features(work, (10, 10, 14, 14))
    assert len(tiny.tiles) == 1
    beyond = extractor.region_features(work, (300, 200, 900, 900))
    assert np.isfinite(demo_model.score_region(beyond).style_score)
    with pytest.raises(ValueError, match="empty"):
        extractor.region_features(work, (50, 50, 40, 60))


# -- statistics ------------------------------------------------------------------------------------


def _kid(x, y, bootstrap=500, seed=0):
    return stats.kernel_mmd2(x, y, degree=3, gamma=1 / x.shape[1], coef0=1.0, bootstrap=bootstrap, confidence=0.95, seed=seed)


def test_kid_is_unbiased_for_equal_distributions():
    rng = np.random.default_rng(0)
    values = np.array([_kid(rng.normal(size=(8, 4)), rng.normal(size=(8, 4)), bootstrap=1).value for _ in range(400)])
    assert abs(values.mean()) < 3 * values.std() / np.sqrt(len(values))


def test_kid_interval_covers_zero_for_equal_and_excludes_it_for_shifted_distributions():
    rng = np.random.default_rng(1)
    same = _kid(rng.normal(size=(40, 6)), rng.normal(size=(40, 6)))
    assert same.low < 0 < same.high
    shifted = _kid(rng.normal(size=(40, 6)), rng.normal(loc=1.0, size=(40, 6)))
    assert shifted.low > 0 and shifted.value > same.high


def test_kid_matches_a_direct_computation():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
    kernel = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    within_x = np.mean([kernel(x[i], x[j]) for i in range(5) for j in range(5) if i != j])
    within_y = np.mean([kernel(y[i], y[j]) for i in range(7) for j in range(7) if i != j])
    cross = np.mean([kernel(a, b) for a in x for b in y])
    assert _kid(x, y).value == pytest.approx(within_x + within_y - 2 * cross)
    with pytest.raises(ValueError, match="at least 2"):
        _kid(x[:1], y)


def _effect(difference, permutations=1000, seed=0):
    return paired_effect(np.asarray(difference, dtype=float), bootstrap=500, confidence=0.95,
                         permutations=permutations, seed=seed)


def test_paired_effect_flips_whole_prompts_exactly():
    equal = _effect(np.zeros((1, 8, 4)))
    assert equal.p_value == 1.0 and equal.exact and equal.mean_difference == 0
    # 6 prompts, all positive: only the all-positive and all-negative sign patterns are as extreme
    positive = _effect(np.arange(1, 7, dtype=float)[None, :, None] + np.zeros((3, 6, 4)))
    assert positive.exact and positive.permutations == 64 and positive.p_value == pytest.approx(2 / 64)
    assert positive.prompts == 6 and positive.replicates == 3 and positive.pairs == 72
    assert positive.replicates_agreeing == 3 and positive.significant(0.05)


def test_paired_effect_counts_prompts_not_images():
    """Many seeds of one prompt are not independent evidence: a shift carried by a single prompt
    among 8 is not significant, however many seeds it has (a per-image test would say p ~ 0)."""
    rng = np.random.default_rng(3)
    difference = rng.normal(0, 0.01, size=(1, 8, 64))
    difference[0, 0] += 1.0
    effect = _effect(difference)
    assert effect.p_value > 0.05 and not effect.significant(0.05)
    assert effect.ci_low < effect.mean_difference < effect.ci_high


def test_paired_effect_interval_includes_the_spread_between_replicates():
    rng = np.random.default_rng(4)
    prompts = rng.normal(0.2, 0.05, size=(1, 8, 1))
    agree = _effect(prompts + rng.normal(0, 0.01, size=(3, 8, 4)))
    disagree = _effect(prompts + np.array([-0.5, 0.0, 0.5])[:, None, None] + rng.normal(0, 0.01, size=(3, 8, 4)))
    assert disagree.ci_high - disagree.ci_low > 3 * (agree.ci_high - agree.ci_low)
    assert disagree.replicates_agreeing < 3 == agree.replicates_agreeing


def test_paired_effect_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(5)
    p = [_effect(rng.normal(size=(2, 10, 3)), permutations=500, seed=i).p_value for i in range(200)]
    assert 0.01 <= np.mean(np.array(p) < 0.05) <= 0.10


def test_bootstrap_mean_interval_has_roughly_its_coverage():
    rng = np.random.default_rng(4)
    hits = [
        (lambda ci: ci.low <= 0 <= ci.high)(stats.bootstrap_mean(rng.normal(size=30), 400, 0.9, seed=i))
        for i in range(200)
    ]
    assert 0.8 <= np.mean(hits) <= 0.97


def test_roc_auc_and_leave_one_out_retrieval():
    assert stats.roc_auc([3, 4], [1, 2]) == 1.0
    assert stats.roc_auc([1, 2], [3, 4]) == 0.0
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    positive, negative = rng.integers(0, 6, 40).astype(float), rng.integers(1, 8, 30).astype(float)  # many ties
    labels = np.r_[np.ones(40), np.zeros(30)]
    assert stats.roc_auc(positive, negative) == pytest.approx(roc_auc_score(labels, np.r_[positive, negative]), abs=1e-12)
    assert stats.roc_auc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(0.5, 1, 30), rng.normal(0, 1, 40)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert stats.roc_auc(pos, neg) == pytest.approx(brute)


def test_clustered_auc_interval_resamples_groups():
    rng = np.random.default_rng(6)
    positive, negative = rng.normal(1, 1, 20), rng.normal(0, 1, 40)
    interval = stats.clustered_auc(positive, np.arange(20) // 5, negative, np.arange(40) // 5, 300, 0.95, 0)
    assert interval.value == pytest.approx(stats.roc_auc(positive, negative))
    assert interval.low < interval.value < interval.high


# -- colour filters --------------------------------------------------------------------------------


def test_colour_filters_are_lookup_tables_that_match_the_reference_colours(held_out):
    source = paint(STYLES["warm_sunset_western"], 200, 150, 9)
    channels, joint = ChannelMatcher.fit(held_out), JointMatcher.fit(held_out)
    reference = np.concatenate([np.asarray(w).reshape(-1, 3) for w in held_out]).astype(float)
    for matcher in (channels, joint):
        out = np.asarray(matcher(source)).reshape(-1, 3).astype(float)
        # a colour map: pixels of one colour stay one colour
        colours = np.asarray(source).reshape(-1, 3)
        _, first, inverse = np.unique(colours, axis=0, return_index=True, return_inverse=True)
        assert np.array_equal(out, out[first][inverse.ravel()])
        np.testing.assert_allclose(out.mean(axis=0), reference.mean(axis=0), atol=6)
    out = np.asarray(channels(source)).reshape(-1, 3)
    for c in range(3):  # each channel's median lands on the reference's
        assert abs(np.median(out[:, c]) - np.median(reference[:, c])) <= 3


# -- optional learned backends ---------------------------------------------------------------------


def _save_tiny_backend(name: str, folder):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    size = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    if name == "dino":
        model = Dinov2Model(Dinov2Config(**size))
    elif name == "clip":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=8, **size))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**size))
        folder.mkdir(parents=True)
        save_file({"last_layer_style": torch.randn(16, 6)}, str(folder / "csd_style_head.safetensors"))
    model.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def _backend_config(name, path):
    return {"backend": name, "backend_paths": {"clip": None, "dino": None, "csd": None, name: path}, "backend_batch_size": 2}


@pytest.mark.parametrize(("name", "dim"), [("clip", 8), ("dino", 16), ("csd", 6)])
def test_learned_backend_from_a_local_safetensors_folder_adds_a_learned_block(name, dim, tmp_path, metrics):
    _save_tiny_backend(name, tmp_path / name)
    backend = load_backend(_backend_config(name, str(tmp_path / name)))
    assert backend is not None and backend.dim == dim
    extractor = StyleFeatureExtractor(StyleFeatureExtractor.from_config(metrics).settings, backend)
    works = [paint(STYLES[DEMO], 96, 80, seed) for seed in range(3)]
    features = extractor.extract(works)
    learned = features.image[:, features.blocks["learned"]]
    assert learned.shape == (3, dim)
    np.testing.assert_allclose(np.linalg.norm(learned, axis=1), 1.0)
    assert np.isfinite(StyleModel.fit(features, metrics).score(features)).all()


def test_absent_or_unsafe_backend_weights_are_skipped_with_a_message(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert load_backend(_backend_config("clip", None)) is None
        assert load_backend(_backend_config("dino", str(tmp_path / "missing"))) is None
        pickled = tmp_path / "pickled"
        pickled.mkdir()
        (pickled / "pytorch_model.bin").write_bytes(b"pickle")
        assert load_backend(_backend_config("csd", str(pickled))) is None
    assert "backend_paths.clip is not set" in caplog.text
    assert "missing not found" in caplog.text
    assert "only safetensors" in caplog.text
    assert load_backend(_backend_config("none", None)) is None
    with pytest.raises(ValueError, match="not one of"):
        load_backend(_backend_config("vgg", None))
