"""`artmaster score` and `artmaster validate-metric` on folders of synthetic paintings."""

from __future__ import annotations

import json

import pytest

from artmaster.cli import main
from artmaster.painter import STYLES, paint
from artmaster.score import cli

DEMO = "zeng_xiaohu"
OTHERS = [name for name in STYLES if name != DEMO]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """reference/: 6 demo works; images/: 2 held-out demo works (png + jpg in a subfolder),
    2 other painters' works, a broken file and a text note; others/: 2 works of each other painter."""
    root = tmp_path_factory.mktemp("score")
    reference, images, others = root / "reference", root / "images", root / "others"
    (images / "nested").mkdir(parents=True)
    reference.mkdir()
    others.mkdir()
    for seed in range(6):
        paint(STYLES[DEMO], 240, 180, seed).save(reference / f"work_{seed}.png")
    paint(STYLES[DEMO], 300, 400, 50).save(images / "demo_a.png")
    paint(STYLES[DEMO], 480, 360, 51).convert("RGB").save(images / "nested" / "demo_b.jpg", quality=92)
    paint(STYLES["blue_green_gongbi"], 240, 180, 52).save(images / "other_a.png")
    paint(STYLES["warm_sunset_western"], 200, 260, 53).save(images / "other_b.webp")
    (images / "broken.png").write_bytes(b"definitely not a png")
    (images / "notes.txt").write_text("sidecar text, not an image")
    for name in OTHERS:
        for seed in (60, 61):
            paint(STYLES[name], 240, 180, seed).save(others / f"{name}_{seed}.png")
    return {"reference": reference, "images": images, "others": others, "root": root}


def test_score_prints_a_table_and_writes_one_json_entry_per_image(folders, tmp_path, capsys):
    out = tmp_path / "results" / "scores.json"
    rc = main(["score", "--reference", str(folders["reference"]), "--images", str(folders["images"]), "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert not list(out.parent.glob(".*tmp")), "the JSON is written via a temporary file, then renamed"

    scores = {entry["file"]: entry["style_score"] for entry in result["images"]}
    assert set(scores) == {"demo_a.png", "nested/demo_b.jpg", "other_a.png", "other_b.webp"}
    assert min(scores["demo_a.png"], scores["nested/demo_b.jpg"]) > max(scores["other_a.png"], scores["other_b.webp"])
    assert result["reference_count"] == 6
    assert set(result["kid"]) == {"value", "ci_low", "ci_high", "confidence"}
    assert result["kid"]["ci_low"] <= result["kid"]["value"] <= result["kid"]["ci_high"]
    assert result["mean_style_score"]["value"] == pytest.approx(sum(scores.values()) / 4)
    assert [entry["file"].endswith("broken.png") for entry in result["skipped"]] == [True]
    assert result["backend"] == "none" and len(result["metrics_params_hash"]) == 12

    assert "style_score" in printed and "KID" in printed
    for file in scores:
        assert file in printed
    assert "skipped" in printed and "broken.png" in printed


def test_validate_metric_reports_auc_plain_and_under_colour_transfer(folders, tmp_path, capsys):
    out = tmp_path / "validation.json"
    rc = cli("validate-metric", ["--painter", str(folders["reference"]), "--others", str(folders["others"]),
                                 "--group-by", "file", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["painter_count"] == 6 and result["others_count"] == 2 * len(OTHERS)
    assert result["painter_groups"] == 6 and result["group_by"] == "file"
    assert result["auc"] >= 0.95
    assert set(result["auc_colour_transferred"]) == {"channels", "joint"}
    assert result["painter_mean_style_score"] > result["others_mean_style_score"]
    assert "AUC, painter's works vs others" in printed and "colour-matched to the painter (channels)" in printed
    assert "closes" in printed and "retrieval accuracy" in printed


def test_files_are_grouped_by_scan_folder_or_crop_name_prefix():
    from artmaster.score import file_group

    assert file_group("scan_a/001.png", "auto") == "scan_a"
    assert file_group("16d3880361f0d791-512x768-00.png", "auto") == "16d3880361f0d791"
    assert file_group("scan_a/001.png", "file") == "scan_a/001.png"
    assert file_group("x-1.png", "folder") == "x-1.png"


def _auc(painter: dict, others: dict, keep) -> float:
    from artmaster.metrics.stats import roc_auc

    return roc_auc(list(painter.values()), [v for k, v in others.items() if keep(k)])


@pytest.mark.slow
def test_validate_metric_on_synthetic_painters_meets_its_targets(tmp_path, capsys):
    """Leave-one-scan-out on the synthetic painters: the painter's crops above the others' (AUC >=
    0.97), above the others colour-matched to the painter by either filter (>= 0.95), above painters
    sharing the painter's palette with other brushwork and composition (>= 0.95), and above the
    painter's own other works with turned hues (>= 0.95); each printed."""
    out = tmp_path / "synthetic.json"
    assert cli("validate-metric", ["--synthetic", str(tmp_path / "synthetic"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["painter_groups"] == 20 and result["group_by"] == "auto"
    assert result["auc"] >= 0.97, result["auc"]
    assert min(result["auc_colour_transferred"].values()) >= 0.95, result["auc_colour_transferred"]
    assert result["colour_gain"]["channels"] <= 0.25
    painter, others = result["painter_scores"], result["others_scores"]
    assert _auc(painter, others, lambda name: "_palette_" in name) >= 0.95
    assert _auc(painter, others, lambda name: name.startswith("others/hue")) >= 0.95
    assert f"leave-one-scan-out style_score): {result['auc']:.3f}" in printed
    for method, auc in result["auc_colour_transferred"].items():
        assert f"({method}): {auc:.3f}" in printed


def test_hydra_overrides_reach_the_metric_settings(folders, tmp_path):
    outputs = []
    for overrides in ([], ["style_metric.model.k=1"]):
        out = tmp_path / f"run{len(outputs)}.json"
        argv = ["--reference", str(folders["reference"]), "--images", str(folders["images"]), "--json", str(out)]
        assert cli("score", argv + overrides) == 0
        outputs.append(json.loads(out.read_text()))
    assert outputs[0]["metrics_params_hash"] != outputs[1]["metrics_params_hash"]
    assert outputs[0]["images"] != outputs[1]["images"]


def test_bad_flags_and_overrides_are_usage_errors(folders, capsys):
    base = ["--reference", str(folders["reference"]), "--images", str(folders["images"])]
    with pytest.raises(SystemExit) as exit_info:
        cli("score", [*base, "--frobnicate"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli("score", [*base, "style_metric.no_such_key=1"])
    assert "no_such_key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("validate-metric", ["--painter", str(folders["reference"])])


def test_missing_or_empty_folders_are_clear_errors(folders, tmp_path, capsys, caplog):
    missing = tmp_path / "nowhere"
    assert cli("score", ["--reference", str(missing), "--images", str(folders["images"])]) == 1
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("score", ["--reference", str(folders["reference"]), "--images", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "no image files" in err and str(empty) in err
    (empty / "broken.jpg").write_bytes(b"nope")
    assert cli("validate-metric", ["--painter", str(empty), "--others", str(folders["others"])]) == 1
    err = capsys.readouterr().err
    assert "no readable images in painter folder" in err
    assert "broken.jpg" in caplog.text


def test_a_single_image_gets_a_score_but_no_set_distance(folders, tmp_path, capsys):
    single = tmp_path / "single"
    single.mkdir()
    paint(STYLES[DEMO], 200, 150, 70).save(single / "only.png")
    out = tmp_path / "single.json"
    assert cli("score", ["--reference", str(folders["reference"]), "--images", str(single), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [entry["file"] for entry in result["images"]] == ["only.png"]
    assert result["kid"] is None
    assert "KID: not available" in capsys.readouterr().out
