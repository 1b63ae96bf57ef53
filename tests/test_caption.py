"""Stage `caption`: template words respond to the image, determinism, overrides, local VLM path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from helpers.tiny_vlm import save_tiny_llava

from artmaster import caption, caption_words
from artmaster.config import compose
from artmaster.files import read_jsonl, write_jsonl

PAPER = (236, 229, 212)
INK = (30, 30, 32)


def _dotted(colour, seed: int, size=(128, 128)) -> Image.Image:
    """Paper with ~60 small dots of one colour."""
    image = Image.new("RGB", size, PAPER)
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for x, y in rng.uniform(4, min(size) - 4, (60, 2)):
        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
    return image


def _grey(size=(128, 128)) -> Image.Image:
    noise = np.random.default_rng(0).normal(0, 2, (size[1], size[0], 1))
    return Image.fromarray(np.clip(128 + noise, 0, 255).repeat(3, axis=2).astype(np.uint8))


def _mist_between_mountains(size=(128, 192)) -> Image.Image:
    """Ink in the upper and lower thirds, a pale band between them."""
    image = Image.new("RGB", size, PAPER)
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.rectangle([0, height // 8, width, height * 3 // 8], fill=INK)
    draw.rectangle([0, height * 5 // 8, width, height], fill=INK)
    return image


def _gorge(size=(192, 128)) -> Image.Image:
    """Dark cliffs on both sides of the lower part, a pale valley between them."""
    image = Image.new("RGB", size, PAPER)
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.polygon([(0, height // 4), (width * 0.42, height), (0, height)], fill=INK)
    draw.polygon([(width, height // 4), (width * 0.58, height), (width, height)], fill=INK)
    return image


CROPS = {
    # crop_id: (scan_id, image)
    "s1-128x128-00": ("s1", _dotted((30, 160, 100), 1)),  # emerald dots
    "s1-128x128-01": ("s1", _dotted((214, 158, 36), 2)),  # ochre dots
    "s2-128x128-00": ("s2", _grey()),
    "s3-128x192-00": ("s3", _mist_between_mountains()),
    "s3-192x128-00": ("s3", _gorge()),
}
SIDECARS = {"s1": "Autumn  colours\nin the Wuling hills", "s2": "", "s3": ""}


def _write_crops(data_dir: Path) -> None:
    rows = []
    for crop_id, (scan_id, image) in CROPS.items():
        relative = f"{image.width}x{image.height}/{crop_id}.png"
        (data_dir / "crop" / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(data_dir / "crop" / relative)
        rows.append(
            {
                "crop_id": crop_id,
                "scan_id": scan_id,
                "bucket": f"{image.width}x{image.height}",
                "width": image.width,
                "height": image.height,
                "box": [0, 0, image.width, image.height],
                "path": relative,
            }
        )
    write_jsonl(data_dir / "crop" / "crops.jsonl", rows)
    (data_dir / "ingest").mkdir(parents=True, exist_ok=True)
    manifest = [
        {"id": scan_id, "source": f"{scan_id}.tif", "status": "accepted", "sidecar_text": text}
        for scan_id, text in SIDECARS.items()
    ]
    write_jsonl(data_dir / "ingest" / "manifest.jsonl", manifest)


@pytest.fixture(scope="module")
def tracking_root(tmp_path_factory) -> Path:
    """One MLflow store for the module: creating a SQLite store takes seconds."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def make(tmp_path, tracking_root):
    """Crops + manifest in tmp_path/data, and a composer for configs pointing at them."""
    _write_crops(tmp_path / "data")

    def _make(*overrides: str):
        return compose(
            [
                f"paths.data_dir={tmp_path / 'data'}",
                f"tracking.uri=sqlite:///{tracking_root / 'mlflow.db'}",
                f"tracking.artifact_dir={tracking_root / 'mlartifacts'}",
                f"caption.overrides_file={tmp_path / 'overrides.yaml'}",
                *overrides,
            ]
        )

    return _make


def _captions(cfg) -> dict[str, dict]:
    return {row["crop_id"]: row for row in read_jsonl(Path(cfg.paths.data_dir) / "caption" / "captions.jsonl")}


def captioner_for(section) -> caption.Captioner:
    return caption.make_captioner(caption.CaptionSettings.from_config(section), section.template)


def test_template_captions_start_with_the_trigger_and_are_deterministic(make):
    cfg = make()
    caption.run(cfg)
    first = (Path(cfg.paths.data_dir) / "caption" / "captions.jsonl").read_text()
    caption.run(cfg)
    assert (Path(cfg.paths.data_dir) / "caption" / "captions.jsonl").read_text() == first
    rows = _captions(cfg)
    assert list(rows) == list(CROPS), "one line per crop, in crop order"
    for row in rows.values():
        assert row["source"] == "template"
        assert row["caption"].startswith("zxh style, ")
        assert "\n" not in row["caption"]


def test_palette_words_follow_the_colours_in_the_image(make):
    cfg = make()
    captioner = caption.TemplateCaptioner(caption.CaptionSettings.from_config(cfg.caption), cfg.caption.template)
    context = caption.CaptionContext("x", "x")
    emerald = captioner.caption(CROPS["s1-128x128-00"][1], context)
    ochre = captioner.caption(CROPS["s1-128x128-01"][1], context)
    grey = captioner.caption(CROPS["s2-128x128-00"][1], context)
    assert "emerald dotted trees" in emerald and "ochre" not in emerald
    assert "ochre dotted trees" in ochre and "emerald" not in ochre
    assert "monochrome ink" in grey and "emerald" not in grey and "dotted" not in grey
    # one big emerald patch is a wash, not dots
    patch = Image.new("RGB", (128, 128), PAPER)
    ImageDraw.Draw(patch).rectangle([30, 30, 90, 90], fill=(30, 160, 100))
    assert "emerald colour washes" in captioner.caption(patch, context)


def test_content_and_composition_words_follow_the_tonal_structure(make):
    template = make().caption.template
    mist = caption_words.describe(CROPS["s3-128x192-00"][1], template)
    gorge = caption_words.describe(CROPS["s3-192x128-00"][1], template)
    blank = caption_words.describe(Image.new("RGB", (128, 128), PAPER), template)
    assert template.content.mist_phrase in mist and template.content.gorge_phrase not in mist
    assert template.content.gorge_phrase in gorge and template.content.mist_phrase not in gorge
    assert template.content.mountains_phrase not in blank and template.content.mist_phrase not in blank
    assert template.composition.portrait_phrase in mist
    assert template.composition.landscape_phrase in gorge
    assert template.composition.square_phrase in blank


def test_sidecar_text_is_appended_on_one_line_when_enabled(make):
    cfg = make()
    caption.run(cfg)
    rows = _captions(cfg)
    assert rows["s1-128x128-00"]["caption"].endswith(", Autumn colours in the Wuling hills")
    assert rows["s2-128x128-00"]["caption"].endswith("composition"), "no sidecar, nothing appended"
    plain = make("caption.include_sidecar=false")
    caption.run(plain)
    assert "Wuling" not in _captions(plain)["s1-128x128-00"]["caption"]


def test_overrides_win_and_unknown_ids_warn_with_file_and_id(make, tmp_path):
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("s2-128x128-00: a grey test card\nghost-crop: nobody\n", encoding="utf-8")
    cfg = make()
    with pytest.warns(UserWarning, match=r"overrides\.yaml: override for unknown crop id 'ghost-crop'"):
        result = caption.run(cfg)
    rows = _captions(cfg)
    assert rows["s2-128x128-00"] == {"crop_id": "s2-128x128-00", "caption": "a grey test card", "source": "override"}
    assert rows["s1-128x128-00"]["source"] == "template"
    assert result["unknown_override_ids"] == ["ghost-crop"]
    assert result["by_source"] == {"template": 4, "vlm": 0, "override": 1}


def test_broken_overrides_file_is_a_clear_error(make, tmp_path):
    (tmp_path / "overrides.yaml").write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"overrides\.yaml: expected a mapping of crop_id: caption"):
        caption.run(make())


def test_unreadable_crop_is_reported_and_the_rest_captioned(make):
    cfg = make()
    (Path(cfg.paths.data_dir) / "crop" / "128x128" / "s2-128x128-00.png").write_bytes(b"not a png")
    result = caption.run(cfg)
    assert [f["crop_id"] for f in result["failed"]] == ["s2-128x128-00"]
    assert "s2-128x128-00" not in _captions(cfg) and len(_captions(cfg)) == len(CROPS) - 1


def test_caption_table_and_counts_are_logged_to_mlflow(make):
    import mlflow

    cfg = make()
    caption.run(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    run = client.search_runs([experiment.experiment_id], "tags.`artmaster.stage` = 'caption'")[0]
    assert run.data.metrics["result/captions"] == len(CROPS)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"captions_table.json", "pictures", "summary.json"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "captions_table.json")).read_text())
    assert len(table["data"]) == len(CROPS)


# --- vlm backend, with a tiny random-weight model built and saved locally -----------------------


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.mark.slow
def test_vlm_backend_captions_with_a_local_model(make, tiny_vlm):
    assert (tiny_vlm / "model.safetensors").is_file()
    cfg = make(
        "caption=vlm",
        f"caption.vlm.model_path={tiny_vlm}",
        "caption.vlm.max_new_tokens=6",
        "caption.vlm.device=cpu",
        "caption.vlm.dtype=float32",
    )
    result = caption.run(cfg)
    rows = _captions(cfg)
    assert result["by_source"]["vlm"] == len(CROPS) and len(rows) == len(CROPS)
    for row in rows.values():
        assert row["source"] == "vlm" and isinstance(row["caption"], str)
        assert row["caption"].startswith("zxh style")
    assert rows["s1-128x128-00"]["caption"].endswith("Autumn colours in the Wuling hills")
    # greedy decoding: the same model and image give the same words
    captioner = captioner_for(cfg.caption)
    context = caption.CaptionContext("x", "x")
    image = CROPS["s3-128x192-00"][1]
    first = captioner.caption(image, context)
    assert first == captioner.caption(image, context)
    assert len(first) > len("zxh style"), "the model's words follow the trigger"


def test_vlm_backend_without_a_model_folder_says_what_to_do(make, tmp_path):
    cfg = make("caption=vlm", f"caption.vlm.model_path={tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match=r"caption\.vlm\.model_path=.*missing.* is not a folder"):
        captioner_for(cfg.caption)


def test_unknown_backend_is_a_clear_error(make):
    with pytest.raises(ValueError, match=r"caption\.backend='nope': choose one of template, vlm"):
        captioner_for(make("caption.backend=nope").caption)


# --- issue 15: the overrides file and place-free outputs -------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s1-128x128-00: [unclosed\n", r"overrides\.yaml:2: not valid caption overrides YAML \(expected ',' or ']'"),
        ("s1-128x128-00: !!python/object/apply:os.system [echo pwned]\n",
         r"overrides\.yaml:1: not valid caption overrides YAML \(could not determine a constructor for the tag "
         r"'tag:yaml\.org,2002:python/object/apply:os\.system'\); fix or empty the file"),
        ("s1-128x128-00: 5\n",
         r"overrides\.yaml: the override for 's1-128x128-00' must be a non-empty string, got int 5"),
        ("s1-128x128-00:\n  nested: map\n", r"the override for 's1-128x128-00' must be a non-empty string, got dict"),
    ],
    ids=["malformed", "python_tag", "number", "mapping"],
)
def test_a_bad_overrides_file_is_one_line_naming_the_file_before_any_work(make, tmp_path, text, expected):
    from artmaster.config import ConfigError

    (tmp_path / "overrides.yaml").write_text(text, encoding="utf-8")
    cfg = make()
    with pytest.raises(ConfigError, match=expected) as raised:
        caption.run(cfg)
    assert "\n" not in str(raised.value)
    assert not (Path(cfg.paths.data_dir) / "caption").exists()


def test_a_missing_or_outside_overrides_file_is_said(make, tmp_path):
    cfg = make()
    with pytest.warns(UserWarning) as warned:
        caption.run(cfg)
    said = [str(w.message) for w in warned]
    assert said.count(f"caption.overrides_file {tmp_path / 'overrides.yaml'} does not exist: no caption overrides "
                      "are applied") == 1
    (tmp_path / "overrides.yaml").write_text("s2-128x128-00: a grey test card\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"overrides\.yaml is outside the project \(.*\); reading it"):
        caption.run(cfg)


def test_the_summary_holds_paths_as_configured_never_where_the_workspace_lies(make, tmp_path):
    from artmaster.config import project_root

    cfg = make("caption.overrides_file=captions_overrides.yaml")  # the default: relative to the project
    (Path(cfg.paths.data_dir) / "crop" / "128x128" / "s2-128x128-00.png").write_bytes(b"not a png")
    caption.run(cfg)
    text = (Path(cfg.paths.data_dir) / "caption" / "summary.json").read_text(encoding="utf-8")
    summary = json.loads(text)
    assert summary["overrides_file"] == "captions_overrides.yaml"
    assert summary["failed"][0]["path"] == "128x128/s2-128x128-00.png"
    assert str(tmp_path) not in text and str(project_root()) not in text
