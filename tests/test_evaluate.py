"""Stage `evaluate` on a tiny random model: outputs, metric keys and ranges, the colour-filter
baselines, both judges, the paired tests over replicates, the held-out reference, the optional CLIP
backend, the self-contained report and the committed verdicts."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.launch import accelerate_launch
from PIL import Image
from helpers.tiny_upstream import write_base_and_lora

from artmaster import evaluate, results
from artmaster.config import compose
from artmaster.metrics import ModelSettings, StyleModel
from artmaster.painter import STYLES, paint

# 4 held-out crops of two scans, 4 training crops of two others
CROPS = [("held1", "heldout", 2), ("held2", "heldout", 2), ("a", "train", 2), ("b", "train", 2)]
MODELS = (
    "evaluate.models=["
    "{name: base, adapter: null, prefix: '', suffix: ''},"
    "{name: base_again, adapter: null, prefix: '', suffix: ''},"
    "{name: base_style_words, adapter: null, prefix: '', suffix: ', ${evaluate.style_words}'},"
    "{name: adapter, adapter: '${paths.data_dir}/train/lora', prefix: '${caption.trigger}, ', suffix: '',"
    " replicated: true}]"
)
FAST = (
    MODELS,
    "evaluate.colour_matched=[{name: base_colour_matched, source: base, method: channels}]",
    "evaluate.pairs=[[adapter,base_again]]",
    "evaluate.prompts=[a misty gorge,a cat sitting on a chair]",
    "evaluate.seeds=[0,1,2]",
    "evaluate.generation.image_scale=0.125",  # 512 px bucket -> 64 px
    "evaluate.generation.steps=2",
    "style_metric.stats.bootstrap=200",
    "style_metric.stats.permutations=500",
    "evaluate.judge.steps=10",
    "evaluate.judge.patch=16",
    "evaluate.judge.folds=2",
)
NAMES = ["base", "base_again", "base_style_words", "adapter", "base_colour_matched"]


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
    # a second training replicate: the same LoRA, so it paints what replicate 0 paints
    shutil.copytree(data / "train" / "lora", data / "train" / "replicates" / "seed_1" / "lora")
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
        "replicates.count=2",
        *FAST,
    ])
    result = evaluate.run(cfg)
    return cfg, result, root / "data" / "evaluate"


def test_writes_verdicts_report_images_and_logs_to_mlflow(evaluated):
    import mlflow

    cfg, result, out = evaluated
    for name in ("metrics.json", "scores.csv", "per_prompt.csv", "grid.png", "report.html", "summary.md"):
        assert (out / "report" / name).is_file(), name
    assert (out / "results.json").is_file() and (out / "headline.json").is_file()
    assert len(list((out / "report" / "images" / "adapter").glob("*.png"))) == 2 * 2 * 3  # 2 replicates
    assert len(list((out / "report" / "images" / "base").glob("*.png"))) == 2 * 3
    with (out / "report" / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == (4 + 2) * 2 * 3 and [r["model"] for r in rows[::6]] == [
        "base", "base_again", "base_style_words", "adapter", "adapter", "base_colour_matched"]
    # the DVC plots' columns (dvc.yaml, templates in .dvc/plots/)
    assert {"model", "prompt", "style_score", "vs_baseline", "judge_p_painter", "replicate"} <= set(rows[0])
    assert all(float(r["vs_baseline"]) == 0 for r in rows if r["model"] == "base")
    assert json.loads((out / "report" / "metrics.json").read_text())["models"].keys() == result["models"].keys()
    headline = json.loads((out / "headline.json").read_text())
    assert set(headline) == {"adapter_gain", "adapter_over_colour_filter", "adapter_vs_base_again",
                             "adapter_vs_base_again_judge"}

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    run = client.search_runs([experiment.experiment_id], "tags.`artmaster.stage` = 'evaluate'")[0]
    assert {f"result/{key}" for key in headline} == set(run.data.metrics)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/metrics.json", "evaluate/report.html", "evaluate/grid.png", "evaluate/results.json"} <= logged


def test_metric_keys_and_ranges(evaluated):
    _, metrics, out = evaluated
    assert metrics["compare_to"] == "base" and list(metrics["models"]) == NAMES
    assert metrics["reference"]["heldout_scans"] == ["held1", "held2"] and metrics["reference"]["heldout_crops"] == 4
    assert metrics["reference"]["train_crops"] == 4
    roundtrip = metrics["references"]["training_crops_through_the_vae"]["style_score"]
    assert roundtrip["ci_low"] <= roundtrip["value"] <= roundtrip["ci_high"]
    for name, entry in metrics["models"].items():
        assert entry["replicates"] == (2 if name == "adapter" else 1)
        for key in ("style_score", "judge_p_painter", "judge_auc"):
            interval = entry[key]
            assert interval["ci_low"] <= interval["value"] <= interval["ci_high"], (name, key)
        assert 0 <= entry["judge_auc"]["value"] <= 1 and 0 <= entry["judge_p_painter"]["value"] <= 1
        kid = entry["kid"]
        assert kid["ci_low"] <= kid["value"] <= kid["ci_high"] and np.isfinite(kid["value"]), name
        assert entry["diversity"] > 0
        memo = entry["memorisation"]
        assert 0 <= memo["min_distance"] <= memo["mean_distance"] and memo["near_copies"] >= 0
        assert -1.0 <= memo["max_pixel_correlation"] <= 1.0
        assert 0 <= entry["adherence"]["value"] <= 100
    with (out / "report" / "per_prompt.csv").open() as handle:
        per_prompt = list(csv.DictReader(handle))
    assert [row["prompt"] for row in per_prompt] == ["a misty gorge", "a cat sitting on a chair"]
    comparisons = metrics["comparisons"]
    assert set(comparisons) == {"base_again_vs_base", "base_style_words_vs_base", "adapter_vs_base",
                                "base_colour_matched_vs_base", "adapter_vs_base_again",
                                "adapter_vs_base_colour_matched"}
    effect = comparisons["adapter_vs_base"]["style"]
    assert effect["prompts"] == 2 and effect["replicates"] == 2 and effect["pairs"] == 2 * 2 * 3
    assert effect["ci_low"] <= effect["mean_difference"] <= effect["ci_high"] and 0 < effect["p_value"] <= 1
    assert set(comparisons["adapter_vs_base"]) == {"style", "judge", "adherence"}
    # the adapter against a copy of the base = the same test as against the base
    assert comparisons["adapter_vs_base_again"]["style"] == effect
    assert metrics["adherence_backend"].startswith("clip")
    assert metrics["verdicts"]["style_learned"].keys() == {"adapter"}
    summary = (out / "report" / "summary.md").read_text()
    assert "adapter vs base_again: by the style metric" in summary


def test_same_model_twice_is_a_null_paired_difference(evaluated):
    """Same prompts, same seeds, same weights: identical images, difference 0, p = 1; and the two
    replicates of one LoRA paint identical images."""
    _, metrics, out = evaluated
    again = metrics["comparisons"]["base_again_vs_base"]["style"]
    assert again["mean_difference"] == 0 and again["p_value"] == 1.0 and not again["significant"]
    images = out / "report" / "images"
    for base, copy in zip(sorted((images / "base").glob("*.png")), sorted((images / "base_again").glob("*.png"))):
        assert base.read_bytes() == copy.read_bytes()
    adapter = sorted((images / "adapter").glob("r0_*.png"))
    assert any(a.read_bytes() != b.read_bytes() for a, b in zip(adapter, sorted((images / "base").glob("*.png"))))
    for first, second in zip(adapter, sorted((images / "adapter").glob("r1_*.png"))):
        assert first.read_bytes() == second.read_bytes()


def test_colour_matched_rows_are_the_sources_images_through_a_colour_table(evaluated):
    _, metrics, out = evaluated
    images = out / "report" / "images"
    for source, matched in zip(sorted((images / "base").glob("*.png")), sorted((images / "base_colour_matched").glob("*.png"))):
        a = np.asarray(Image.open(source)).reshape(-1, 3)
        b = np.asarray(Image.open(matched)).reshape(-1, 3)
        _, first, inverse = np.unique(a, axis=0, return_index=True, return_inverse=True)
        assert np.array_equal(b, b[first][inverse.ravel()])  # one colour in, one colour out
    assert metrics["models"]["base_colour_matched"]["description"].startswith("base's images, colours matched")


def test_committed_results_hold_the_verdicts_and_the_readme_section_comes_from_them(evaluated, tmp_path):
    _, metrics, out = evaluated
    committed = json.loads((out / "results.json").read_text())
    assert committed["replicates"] == 2 and committed["prompts"] == 2 and committed["seeds"] == 3
    assert set(committed["comparisons"]["adapter_vs_base"]) == {"style", "judge"}
    conclusions = results.conclusions(committed)
    assert conclusions["base_again_vs_base/style"] == "base_again = base (not significant)"
    assert conclusions["style learned/adapter"] in ("yes", "no")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.BEGIN}\nold\n{results.END}\noutro\n")
    assert results.update_readme(readme, committed) and not results.update_readme(readme, committed)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "| adapter |" in text
    assert results.cli("results", ["readme", "--check", "--results", str(out / "results.json"),
                                   "--readme", str(readme)]) == 0
    # a conclusion that flips is caught; the same results compare clean
    flipped = json.loads(json.dumps(committed))
    flipped["comparisons"]["adapter_vs_base"]["style"]["p_value"] = 0.5 if committed["comparisons"][
        "adapter_vs_base"]["style"]["significant"] else 0.001
    (tmp_path / "flipped.json").write_text(json.dumps(flipped))
    assert results.cli("results", ["compare", str(out / "results.json"), str(out / "results.json")]) == 0
    assert results.cli("results", ["compare", str(out / "results.json"), str(tmp_path / "flipped.json")]) == 1


def test_paired_effects_detect_a_consistent_shift_and_not_noise():
    metrics = ModelSettings.from_config(compose([]).style_metric)
    plan = [(p, "prompt", s) for p in range(8) for s in range(3)]
    rng = np.random.default_rng(0)
    baseline = rng.normal(-2.0, 0.5, (1, 24))
    shifted = evaluate.paired(baseline + 0.3 + rng.normal(0, 0.05, (3, 24)), baseline, plan, metrics, alpha=0.05)
    assert shifted["significant"] and shifted["p_value"] < 0.01 and shifted["ci_low"] > 0
    assert shifted["replicates"] == 3 and shifted["replicates_agreeing"] == 3
    noise = evaluate.paired(baseline + rng.normal(0, 0.05, (3, 24)), baseline, plan, metrics, alpha=0.05)
    assert noise["p_value"] > 0.05 and not noise["significant"] and noise["ci_low"] < 0 < noise["ci_high"]


def test_vae_bound_says_whether_the_painters_own_crops_through_the_vae_outscore_the_painted_rows():
    rows = [evaluate.Row("base", "", False, [], scores=np.full((1, 4), -9.0)),
            evaluate.Row("adapter", "", True, [], scores=np.full((3, 4), -8.5))]
    bound = evaluate.vae_bound(rows, {"value": -8.4, "ci_low": -8.9, "ci_high": -7.9})
    assert "the best painted row, adapter, -8.500: the decoder alone brings" in bound
    assert "-8.400 [-8.900, -7.900]" in bound
    assert "leaves room" in evaluate.vae_bound(rows, {"value": -2.0, "ci_low": -2.5, "ci_high": -1.5})


def test_report_is_self_contained_with_every_image(evaluated):
    _, metrics, out = evaluated
    text = (out / "report" / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]+'", text)
    # grid (first replicate) + memorisation pairs + held-out crops + training crops with their VAE roundtrip
    shown = 5 * 2 * 3 + 2 * 8 + 4 + 2 * 4
    assert len(images) == shown
    assert "src='http" not in text and "src=\"http" not in text
    for name in metrics["models"]:
        assert name in text
    assert "a cat sitting on a chair" in text and "Memorisation" in text and "Verdicts" in text


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
    assert list(result["models"]) == ["base", "base_colour_matched"]
    assert fitted[0] == sorted(f"held{s}-512x512-{i:02d}" for s in (1, 2) for i in range(2))
    assert all(not name.startswith("held") for name in fitted[1]) and len(fitted[1]) == 4
    assert result["adherence_backend"].startswith("not available")
    assert result["models"]["base"]["adherence"] == "not available"


def test_clear_errors_for_missing_heldout_crops_adapter_and_bad_names(make_cfg, upstream, tmp_path):
    shutil.copytree(upstream, tmp_path / "data")
    crops = tmp_path / "data" / "crop" / "crops.jsonl"
    rows = [json.loads(line) for line in crops.read_text().splitlines()]
    cfg = make_cfg(*FAST, "evaluate.models=[{name: base, adapter: null, prefix: '', suffix: ''},"
                   "{name: augmented, adapter: '${paths.data_dir}/retrain/lora', prefix: '', suffix: ''}]",
                   "evaluate.pairs=[]")
    with pytest.raises(FileNotFoundError, match=r"retrain/lora.*retrain"):
        evaluate.run(cfg)
    with pytest.raises(ValueError, match="names must be unique"):
        evaluate.run(make_cfg(*FAST, "evaluate.models=[{name: base, adapter: null},{name: base, adapter: null}]"))
    with pytest.raises(ValueError, match="compare_to"):
        evaluate.run(make_cfg(*FAST, "evaluate.compare_to=nothing"))
    with pytest.raises(ValueError, match=r"evaluate\.pairs: \['adapter', 'nothing'\] must name two"):
        evaluate.run(make_cfg(*FAST, "evaluate.pairs=[[adapter,nothing]]"))
    crops.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    with pytest.raises(FileNotFoundError, match=r"replicates/seed_2/lora.*replicates.count"):
        evaluate.run(make_cfg(*FAST, "replicates.count=3"))
    with pytest.raises(ValueError, match="source 'nothing'"):
        evaluate.run(make_cfg(*FAST, "evaluate.colour_matched=[{name: x, source: nothing, method: channels}]"))
    crops.write_text("".join(json.dumps({**r, "split": "train" if r["scan_id"] != "held1" else "heldout"}) + "\n"
                             for r in rows))
    with pytest.raises(ValueError, match="come from one scan"):
        evaluate.run(make_cfg(*FAST))
    crops.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"0 held-out crop.*data\.holdout\.scans"):
        evaluate.run(make_cfg(*FAST))


@pytest.mark.slow
def test_two_processes_share_the_plan_and_measure_what_one_process_measures(evaluated, upstream, tmp_path):
    cfg, alone, out = evaluated
    shutil.copytree(upstream, tmp_path / "data")
    done = accelerate_launch("artmaster.evaluate", [
        f"paths.data_dir={tmp_path / 'data'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_dir={tmp_path / 'mlartifacts'}", "replicates.count=2",
        f"evaluate.adherence.clip_path={cfg.evaluate.adherence.clip_path}", *FAST,
    ])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluate: process 0 of 2 paints samples 0 to 2 of 6" in done.stdout
    assert "evaluate: process 1 of 2 paints samples 3 to 5 of 6" in done.stdout
    # batches of 3 instead of 6: the same images up to float rounding, so the same measurements
    out, split_out = out / "report", tmp_path / "data" / "evaluate" / "report"
    # a colour-matched image is a lookup table applied to a base image: one rounding step of its
    # input can land on the next step of the table, so those agree on average, not at every pixel
    def transferred(model: str) -> bool:
        return "colour_matched" in model

    for image in (out / "images").rglob("*.png"):
        split_image = np.asarray(Image.open(split_out / image.relative_to(out)), dtype=np.int16)
        difference = np.abs(split_image - np.asarray(Image.open(image), dtype=np.int16))
        if transferred(image.parent.name):
            assert difference.mean() <= 0.5, image
        else:
            assert difference.max() <= 2, image
    with (out / "scores.csv").open() as alone_rows, (split_out / "scores.csv").open() as split_rows:
        pairs = list(zip(csv.DictReader(alone_rows), csv.DictReader(split_rows), strict=True))
    assert len(pairs) == 6 * 2 * 3
    for alone_row, split_row in pairs:
        assert split_row["image"] == alone_row["image"] and split_row["model"] == alone_row["model"]
        tolerance = 0.05 if transferred(alone_row["model"]) else 1e-3
        assert float(split_row["style_score"]) == pytest.approx(float(alone_row["style_score"]), rel=tolerance)
    split = json.loads((split_out / "metrics.json").read_text())
    assert split["models"].keys() == alone["models"].keys()
    for name, entry in alone["models"].items():
        tolerance = 0.05 if transferred(name) else 1e-3
        assert split["models"][name]["style_score"]["value"] == pytest.approx(entry["style_score"]["value"], rel=tolerance)
        assert split["models"][name]["images"] == entry["images"]
