"""Stage `augment` on the tiny model: outputs and provenance, the filter, resuming after a kill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.augment import FAST
from helpers.launch import accelerate_launch
from omegaconf import OmegaConf
from PIL import Image

from artmaster import augment

@pytest.fixture
def cfg_for(make_cfg, augment_upstream, tmp_path):
    shutil.copytree(augment_upstream, tmp_path / "data")

    def _make(*overrides: str):
        return make_cfg(*FAST, *overrides)

    return _make


def _out(cfg) -> Path:
    return Path(cfg.paths.data_dir) / "augment" / "round_0"


def test_augment_writes_pairs_with_provenance_metrics_and_pictures(cfg_for):
    import mlflow

    cfg = cfg_for("augment.filter.margin=-1000", "augment.filter.near_copy_distance=0")
    metrics = augment.run(cfg)
    out = _out(cfg)
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in records] == ["0000", "0001", "0002"]
    assert [r["seed"] for r in records] == [1000, 1001, 1002]
    assert records[1]["prompt"] == str(cfg.augment.prompts[1])
    for record in records:
        assert record == json.loads((out / "samples" / f"{record['sample_id']}.json").read_text())
        assert 1 <= len(record["edits"]) <= cfg.critic.max_edits
        for edit in record["edits"]:
            x1, y1, x2, y2 = edit["box"]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and edit["local_prompt"].startswith("zxh style")
        assert record["style_gain"] == pytest.approx(record["style_after"] - record["style_before"])
        assert record["accepted"] and record["nearest_crop"].startswith("512x512/s")
        for name in ("original", "refined", "comparison", "accepted"):
            assert (out / record["files"][name]).is_file(), name
        with Image.open(out / record["files"]["original"]) as original:
            assert original.size == (64, 64)
        accepted = np.asarray(Image.open(out / record["files"]["accepted"]))
        assert np.array_equal(accepted, np.asarray(Image.open(out / record["files"]["refined"])))
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 3 and metrics["accepted"] == 3 and metrics["acceptance_rate"] == 1.0
    assert metrics["mean_style_gain"] == pytest.approx(np.mean([r["style_gain"] for r in records]))
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 2 * cfg.augment.picture.panel_height

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    run = client.search_runs([experiment.experiment_id], "tags.`artmaster.stage` = 'augment'")[0]
    assert run.info.run_name == "augment round 0"
    assert run.data.metrics["result/accepted"] == 3 and "result/mean_style_gain" in run.data.metrics
    assert "| acceptance_rate | 1 |" in run.data.tags["mlflow.note.content"]
    pairs = {a.path for a in client.list_artifacts(run.info.run_id, "augment/pairs")}
    assert pairs == {f"augment/pairs/{r['sample_id']}.png" for r in records}


def test_filter_rejects_small_gains_and_near_copies():
    settings = OmegaConf.create({"margin": 0.05, "near_copy_distance": 0.2})
    assert augment.filter_verdict(0.10, 0.9, "a.png", settings)[0]
    accepted, why = augment.filter_verdict(0.01, 0.9, "a.png", settings)
    assert not accepted and "below the margin 0.05" in why
    accepted, why = augment.filter_verdict(5.0, 0.1, "a.png", settings)
    assert not accepted and why.startswith("near-copy of crop a.png")


def test_rejected_samples_keep_their_pair_but_no_accepted_image(cfg_for):
    cfg = cfg_for("augment.count=1", "augment.filter.near_copy_distance=1e9")
    metrics = augment.run(cfg)
    record = json.loads((_out(cfg) / "samples" / "0000.json").read_text())
    assert not record["accepted"] and record["verdict"].startswith("near-copy")
    assert "accepted" not in record["files"] and not list((_out(cfg) / "accepted").iterdir())
    assert (_out(cfg) / record["files"]["refined"]).is_file()
    assert metrics["acceptance_rate"] == 0.0 and metrics["near_copies"] == 1


@pytest.mark.slow
def test_a_rerun_after_a_kill_redoes_only_the_unfinished_samples(cfg_for, monkeypatch):
    cfg = cfg_for()
    augment.run(cfg)
    out = _out(cfg)
    # killed while sample 0001 was being written: its JSON (written last) is missing
    (out / "samples" / "0001.json").unlink()
    kept = (out / "samples" / "0000.json").stat().st_mtime_ns

    done = []
    real = augment.process_sample
    monkeypatch.setattr(augment, "process_sample", lambda sample, *a: done.append(sample.sample_id) or real(sample, *a))
    augment.run(cfg)
    assert done == ["0001"]
    assert (out / "samples" / "0000.json").stat().st_mtime_ns == kept
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3

    # other inputs (here the filter margin) make every sample stale; fewer samples drop the rest
    done.clear()
    augment.run(cfg_for("augment.count=2", "augment.filter.margin=0.5"))
    assert done == ["0000", "0001"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000.json", "0001.json"]
    assert not list((out / "pairs").glob("0002-*")) and not (out / "comparisons" / "0002.png").exists()


def test_originals_painted_in_batches_with_the_lora_folded_in_match_one_at_a_time(cfg_for, monkeypatch):
    keep_all = ("augment.filter.margin=-1000", "augment.filter.near_copy_distance=0")
    cfg = cfg_for(*keep_all)
    augment.run(cfg)
    pairs = _out(cfg) / "pairs"
    one_at_a_time = {path.name: np.asarray(Image.open(path), dtype=np.int16) for path in pairs.glob("*-original.png")}

    calls, real = [], augment.generate_images
    monkeypatch.setattr(augment, "generate_images",
                        lambda pipe, prompts, *a, **k: calls.append(len(prompts)) or real(pipe, prompts, *a, **k))
    augment.run(cfg_for(*keep_all, "augment.generation.batch_size=2", "model.fuse_lora=true"))
    assert calls == [2, 1]  # 3 samples; the new settings make every finished sample stale
    assert len(one_at_a_time) == 3
    for name, image in one_at_a_time.items():  # the same images up to float rounding
        assert np.abs(np.asarray(Image.open(pairs / name), dtype=np.int16) - image).max() <= 2, name


def _files(folder: Path) -> dict[Path, bytes]:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_two_processes_share_the_samples_and_write_what_one_process_writes(cfg_for):
    import mlflow

    cfg = cfg_for("augment.filter.margin=-1000", "augment.filter.near_copy_distance=0")
    augment.run(cfg)
    alone = _files(_out(cfg))
    shutil.rmtree(_out(cfg))

    done = accelerate_launch("artmaster.augment", [
        f"paths.data_dir={cfg.paths.data_dir}", f"tracking.uri={cfg.tracking.uri}",
        f"tracking.artifact_dir={cfg.tracking.artifact_dir}", "replicates.count=1", *FAST,
        "augment.filter.margin=-1000", "augment.filter.near_copy_distance=0",
    ])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "augment: process 0 of 2 paints samples 0 to 1 of 3" in done.stdout
    assert "augment: process 1 of 2 paints samples 2 to 2 of 3" in done.stdout
    split = _files(_out(cfg))
    assert sorted(split) == sorted(alone)
    assert [str(path) for path in alone if split[path] != alone[path]] == []  # bitwise the same
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id
    runs = client.search_runs([experiment], "tags.`artmaster.stage` = 'augment'")
    assert len(runs) == 2  # one per launch: only the main process logs


def test_missing_adapter_and_bad_round_are_clear_errors(cfg_for, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"augment\.adapter .*nowhere.*artmaster train"):
        augment.run(cfg_for(f"augment.adapter={tmp_path / 'nowhere'}"))
    with pytest.raises(ValueError, match=r"augment\.round=2 must be in \[0, augment\.rounds=1\)"):
        augment.run(cfg_for("augment.round=2"))
    with pytest.raises(ValueError, match=r"augment\.generation\.batch_size must be >= 1, got 0"):
        augment.run(cfg_for("augment.generation.batch_size=0"))


def test_comparison_picture_draws_numbered_boxes_on_both_panels(make_cfg):
    picture = make_cfg().augment.picture
    before, after = Image.new("RGB", (64, 32), "white"), Image.new("RGB", (64, 32), "black")
    record = {
        "edits": [{"box": [8, 8, 40, 24], "local_prompt": "zxh style, mist", "reason": "tonal_range deviates"}],
        "style_before": -3.0, "style_after": -2.5, "style_gain": 0.5, "accepted": True, "verdict": "gain",
    }
    canvas = augment.draw_comparison(before, after, record, picture)
    scale = picture.panel_height / 32
    assert canvas.width == 2 * 64 * scale + 6
    colour = Image.new("RGB", (1, 1), picture.colours[0]).getpixel((0, 0))
    top = int(picture.font_size) + 4
    for left in (0, 64 * scale + 6):
        assert canvas.getpixel((int(left + 30 * scale), int(top + 8 * scale))) == colour
