"""Stage `evaluate` on a tiny random model: outputs, metric keys and ranges, the paired test, the
held-out reference, the optional CLIP backend and the self-contained report."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import accelerate_launch
from PIL import Image
from tiny_upstream import write_base_and_lora

from artmaster import evaluate
from artmaster.config import compose
from artmaster.metrics import ModelSettings, StyleModel
from artmaster.painter import STYLES, paint

# 3 held-out crops of one scan, 4 training crops of two others
CROPS = [("held", "heldout", 3), ("a", "train", 2), ("b", "train", 2)]
MODELS = (
    "evaluate.models=["
    "{name: base, adapter: null, prefix: '', suffix: ''},"
    "{name: base_again, adapter: null, prefix: '', suffix: ''},"
    "{name: base_style_words, adapter: null, prefix: '', suffix: ', ${evaluate.style_words}'},"
    "{name: adapter, adapter: '${paths.data_dir}/train/lora', prefix: '${caption.trigger}, ', suffix: ''}]"
)
FAST = (
    MODELS,
    "evaluate.pairs=[[adapter,base_again]]",
    "evaluate.prompts=[a misty gorge,a cat sitting on a chair]",
    "evaluate.seeds=[0,1,2]",
    "evaluate.generation.image_scale=0.125",  # 512 px bucket -> 64 px
    "evaluate.generation.steps=2",
    "evaluate.metrics.stats.bootstrap=200",
    "evaluate.metrics.stats.permutations=500",
)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """data/ as the stages before evaluate leave it: crops (with splits), base pipeline, a LoRA."""
    data = tmp_path_factory.mktemp("upstream") / "data"
    rows, seed = [], 0
    for scan_id, split, count in CROPS:
        for i in range(count):
            seed += 1
            crop_id = f"{scan_id}-512x512-{i:02d}"
            path = data / "crop" / "512x512" / f"{crop_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            paint(STYLES["zeng_xiaohu"], 128, 128, seed=seed).resize((512, 512)).save(path)
            rows.append({"crop_id": crop_id, "scan_id": scan_id, "bucket": "512x512", "width": 512, "height": 512,
                         "path": f"512x512/{crop_id}.png", "split": split})
    (data / "crop" / "crops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_base_and_lora(data)
    return data


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPModel + processor saved like a downloaded one (safetensors)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from artmaster.models import local_tokenizers

    tokenizer, _ = local_tokenizers()
    folder = tmp_path_factory.mktemp("clip")
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evaluated(upstream, tmp_path_factory, clip_folder):
    """One run with every feature on (CLIP included): (config, returned metrics, output folder)."""
    root = tmp_path_factory.mktemp("evaluated")
    shutil.copytree(upstream, root / "data")
    cfg = compose([
        f"paths.data_dir={root / 'data'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_dir={root / 'mlartifacts'}",
        f"evaluate.adherence.clip_path={clip_folder}",
        *FAST,
    ])
    result = evaluate.run(cfg)
    return cfg, result, root / "data" / "evaluate"


def test_writes_metrics_plots_images_report_and_logs_to_mlflow(evaluated):
    import mlflow

    cfg, result, out = evaluated
    for name in ("metrics.json", "scores.csv", "per_prompt.csv", "grid.png", "report.html", "summary.md"):
        assert (out / name).is_file(), name
    names = ["base", "base_again", "base_style_words", "adapter"]
    assert len(list((out / "images" / "adapter").glob("*.png"))) == 2 * 3
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 2 * 3 and [r["model"] for r in rows[::6]] == names
    # the DVC plots' columns (dvc.yaml, template .dvc/plots/style_by_model.json)
    assert {"model", "prompt_index", "style_score", "vs_baseline"} <= set(rows[0])
    assert all(float(r["vs_baseline"]) == 0 for r in rows if r["model"] == "base")
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    run = client.search_runs([experiment.experiment_id], "tags.`artmaster.stage` = 'evaluate'")[0]
    headline = json.loads((out / "headline.json").read_text())
    assert {f"result/{name}" for name in headline} == set(run.data.metrics) and "adapter_gain" in headline
    assert "| model |" in run.data.tags["mlflow.note.content"]  # the summary table, not 30 charts
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/metrics.json", "evaluate/report.html", "evaluate/grid.png"} <= logged


def test_metric_keys_and_ranges(evaluated):
    _, metrics, out = evaluated
    assert metrics["compare_to"] == "base"
    assert metrics["reference"]["heldout_scans"] == ["held"] and metrics["reference"]["heldout_crops"] == 3
    assert metrics["reference"]["train_crops"]["count"] == 4
    ceiling = metrics["reference"]["vae_ceiling"]["style_score"]  # training crops through the VAE
    assert ceiling["ci_low"] <= ceiling["value"] <= ceiling["ci_high"]
    for name, entry in metrics["models"].items():
        style = entry["style_score"]
        assert style["ci_low"] <= style["value"] <= style["ci_high"] and style["value"] < 0, name
        kid = entry["kid"]
        assert kid["ci_low"] <= kid["value"] <= kid["ci_high"] and np.isfinite(kid["value"]), name
        assert entry["diversity"] > 0
        memo = entry["memorisation"]
        assert 0 <= memo["min_distance"] <= memo["mean_distance"] and memo["near_copies"] >= 0
        assert -1.0 <= memo["max_pixel_correlation"] <= 1.0
        assert 0 <= entry["adherence"]["value"] <= 100
        assert ("vs_baseline" in entry) == (name != "base")
    with (out / "per_prompt.csv").open() as handle:
        per_prompt = list(csv.DictReader(handle))
    assert [row["prompt"] for row in per_prompt] == ["a misty gorge", "a cat sitting on a chair"]
    for name in metrics["models"]:
        assert float(per_prompt[0][f"{name}_diversity"]) > 0 and float(per_prompt[1][name]) < 0
    comparison = metrics["models"]["adapter"]["vs_baseline"]
    assert 0 < comparison["p_value"] <= 1 and comparison["pairs"] == 6
    assert comparison["ci_low"] <= comparison["mean_difference"] <= comparison["ci_high"]
    assert metrics["adherence_backend"].startswith("clip")
    # evaluate.pairs: adapter against a copy of the base = the same test as adapter against the base
    extra = metrics["comparisons"]["adapter_vs_base_again"]
    assert extra["mean_difference"] == comparison["mean_difference"] and extra["pairs"] == 6
    summary = (out / "summary.md").read_text()
    assert "adapter vs base_again: style_score difference" in summary


def test_same_model_twice_is_a_null_paired_difference(evaluated):
    """Same prompts, same seeds, same weights: identical images, difference 0, p = 1."""
    _, metrics, out = evaluated
    again = metrics["models"]["base_again"]["vs_baseline"]
    assert again["mean_difference"] == 0 and again["p_value"] == 1.0 and not again["significant"]
    for base, copy in zip(sorted((out / "images" / "base").glob("*.png")), sorted((out / "images" / "base_again").glob("*.png"))):
        assert base.read_bytes() == copy.read_bytes()
    # the adapter changes the images it paints from the same seeds
    adapter = sorted((out / "images" / "adapter").glob("*.png"))
    assert any(a.read_bytes() != b.read_bytes() for a, b in zip(adapter, sorted((out / "images" / "base").glob("*.png"))))


def test_paired_test_detects_a_consistent_shift_and_not_noise():
    settings = ModelSettings.from_config(compose([]).evaluate.metrics)
    model = type("M", (), {"settings": settings})()  # `paired` reads only the settings
    rng = np.random.default_rng(0)
    baseline = rng.normal(-2.0, 0.5, 24)
    shifted = evaluate.paired(baseline + 0.3 + rng.normal(0, 0.05, 24), baseline, model, alpha=0.05)
    assert shifted["significant"] and shifted["p_value"] < 0.01 and shifted["ci_low"] > 0
    noise = evaluate.paired(baseline + rng.normal(0, 0.05, 24), baseline, model, alpha=0.05)
    assert noise["p_value"] > 0.05 and not noise["significant"] and noise["ci_low"] < 0 < noise["ci_high"]


def test_report_is_self_contained_with_every_image(evaluated):
    _, metrics, out = evaluated
    text = (out / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]+'", text)
    # grid + memorisation pairs + held-out crops + training crops with their VAE roundtrip
    shown = 4 * 2 * 3 + 2 * min(8, 4 * 2 * 3) + 3 + 2 * 4
    assert len(images) == shown
    assert "src='http" not in text and "src=\"http" not in text
    for name in metrics["models"]:
        assert name in text
    assert "a cat sitting on a chair" in text and "Memorisation" in text


def test_reference_is_the_heldout_split_only(make_cfg, monkeypatch, upstream, tmp_path):
    """The style model is fitted on the held-out crops; the memorisation model on the training crops."""
    shutil.copytree(upstream, tmp_path / "data")
    fitted = []
    real_fit = StyleModel.fit

    def spy(features, metrics):
        fitted.append(sorted(features.names))
        return real_fit(features, metrics)

    monkeypatch.setattr(evaluate.StyleModel, "fit", staticmethod(spy))
    result = evaluate.run(make_cfg(*FAST, "evaluate.models=[{name: base, adapter: null, prefix: '', suffix: ''}]",
                                   "evaluate.pairs=[]"))
    assert fitted[0] == [f"held-512x512-{i:02d}" for i in range(3)]
    assert all(not name.startswith("held") for name in fitted[1]) and len(fitted[1]) == 4
    assert result["adherence_backend"].startswith("not available")
    assert result["models"]["base"]["adherence"] == "not available"


def test_clear_errors_for_missing_heldout_crops_adapter_and_bad_names(make_cfg, upstream, tmp_path):
    shutil.copytree(upstream, tmp_path / "data")
    crops = tmp_path / "data" / "crop" / "crops.jsonl"
    rows = [json.loads(line) for line in crops.read_text().splitlines()]
    cfg = make_cfg(*FAST, "evaluate.models=[{name: base, adapter: null, prefix: '', suffix: ''},"
                   "{name: augmented, adapter: '${paths.data_dir}/retrain/lora', prefix: '', suffix: ''}]")
    with pytest.raises(FileNotFoundError, match=r"retrain/lora.*retrain"):
        evaluate.run(cfg)
    with pytest.raises(ValueError, match="names must be unique"):
        evaluate.run(make_cfg(*FAST, "evaluate.models=[{name: base, adapter: null},{name: base, adapter: null}]"))
    with pytest.raises(ValueError, match="compare_to"):
        evaluate.run(make_cfg(*FAST, "evaluate.compare_to=nothing"))
    with pytest.raises(ValueError, match=r"evaluate\.pairs: \['adapter', 'nothing'\] must name two"):
        evaluate.run(make_cfg(*FAST, "evaluate.pairs=[[adapter,nothing]]"))
    crops.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"0 held-out crop.*data\.holdout\.scans"):
        evaluate.run(make_cfg(*FAST))


@pytest.mark.slow
def test_two_processes_share_the_plan_and_measure_what_one_process_measures(evaluated, upstream, tmp_path):
    cfg, alone, out = evaluated
    shutil.copytree(upstream, tmp_path / "data")
    done = accelerate_launch("artmaster.evaluate", [
        f"paths.data_dir={tmp_path / 'data'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_dir={tmp_path / 'mlartifacts'}",
        f"evaluate.adherence.clip_path={cfg.evaluate.adherence.clip_path}", *FAST,
    ])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluate: process 0 of 2 paints samples 0 to 2 of 6" in done.stdout
    assert "evaluate: process 1 of 2 paints samples 3 to 5 of 6" in done.stdout
    # batches of 3 instead of 6: the same images up to float rounding, so the same measurements
    split_out = tmp_path / "data" / "evaluate"
    for image in (out / "images").rglob("*.png"):
        split_image = np.asarray(Image.open(split_out / image.relative_to(out)), dtype=np.int16)
        assert np.abs(split_image - np.asarray(Image.open(image), dtype=np.int16)).max() <= 2, image
    with (out / "scores.csv").open() as alone_rows, (split_out / "scores.csv").open() as split_rows:
        pairs = list(zip(csv.DictReader(alone_rows), csv.DictReader(split_rows), strict=True))
    assert len(pairs) == 4 * 2 * 3
    for alone_row, split_row in pairs:
        assert split_row["image"] == alone_row["image"] and split_row["model"] == alone_row["model"]
        assert float(split_row["style_score"]) == pytest.approx(float(alone_row["style_score"]), abs=1e-3)
    split = json.loads((split_out / "metrics.json").read_text())
    assert split["models"].keys() == alone["models"].keys()
    for name, entry in alone["models"].items():
        assert split["models"][name]["style_score"]["value"] == pytest.approx(entry["style_score"]["value"], abs=1e-3)
        assert split["models"][name]["images"] == entry["images"]
