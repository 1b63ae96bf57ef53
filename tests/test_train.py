"""The train stage on the tiny profile: fixtures are a few small crops with captions and a tiny
random pipeline saved with save_pretrained (what the `base` stage writes)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.launch import accelerate_launch, offline_env
from helpers.training import FAST, PORTRAIT, SQUARE, killed_at_step, make_run_cfg, write_fixture_data
from omegaconf import OmegaConf
from safetensors.torch import load_file

from artmaster import dataset, models, train
from artmaster.config import compose, project_root
from artmaster.generate import generate_images
from artmaster.training.batches import optimizer_steps, process_batches
from artmaster.training.checkpoints import list_checkpoints
from artmaster.training.encodings import build_cache, encode_image, free_encoders, load_pixels
from artmaster.training.step import flow_matching_loss
from artmaster.training.settings import SampleSettings
from artmaster.training.validation import render_samples

# --- pure helpers -------------------------------------------------------------------------------


def test_plan_keeps_one_bucket_per_batch_and_every_repeat():
    ids_by_size = {(128, 128): ["a", "b", "c"], (128, 192): ["d", "e"]}
    size_of = {i: size for size, ids in ids_by_size.items() for i in ids}
    one = dict(epochs=3, repeats=2, batch_size=2, world_size=1, process_index=0)  # one process
    plan = process_batches(ids_by_size, **one, seed=0)
    assert all(len({size_of[i] for i in batch}) == 1 for batch in plan)
    counts = {i: sum(batch.count(i) for batch in plan) for i in size_of}
    assert counts == {i: 6 for i in size_of}  # 3 epochs x 2 repeats
    assert plan == process_batches(ids_by_size, **one, seed=0)
    assert plan != process_batches(ids_by_size, **one, seed=1)
    # two processes: equal lengths (lockstep), disjoint shares of each epoch
    rank0, rank1 = (process_batches(ids_by_size, epochs=1, repeats=2, batch_size=2, world_size=2,
                                          process_index=r, seed=0)
                    for r in (0, 1))
    assert len(rank0) == len(rank1) == len(process_batches(ids_by_size, epochs=1, repeats=2, batch_size=2,
                                                                 world_size=1, process_index=0, seed=0)) // 2
    assert optimizer_steps(len(plan), 4) == len(plan) // 4
    with pytest.raises(ValueError, match="gradient_accumulation=99"):
        optimizer_steps(3, 99)


def test_scaled_size_must_stay_a_multiple_of_16():
    assert dataset.scaled_size(512, 768, 0.25) == (128, 192)
    with pytest.raises(ValueError, match="train.image_scale=0.3.*154x154"):
        dataset.scaled_size(512, 512, 0.3)


def test_bad_crops_are_skipped_with_a_message_naming_them(tmp_path, caplog):
    data = tmp_path / "data"
    write_fixture_data(data, [SQUARE, SQUARE, PORTRAIT])
    rows = [json.loads(line) for line in (data / "crop" / "crops.jsonl").read_text().splitlines()]
    (data / "crop" / rows[1]["path"]).unlink()  # missing image
    rows.append({**rows[0], "crop_id": "uncaptioned"})  # no caption
    rows.append({**rows[0], "crop_id": "escape", "path": "../../outside.png"})
    (data / "crop" / "crops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose([f"paths.data_dir={data}"])
    examples = dataset.load_examples(cfg)
    assert [e.sample_id for e in examples] == [rows[0]["crop_id"], rows[2]["crop_id"]]
    assert {e.size for e in examples} == {(128, 128), (128, 192)}
    logged = caplog.text
    assert rows[1]["crop_id"] in logged and "uncaptioned" in logged and "no caption" in logged
    assert "escape" in logged and "outside" in logged


def test_only_training_split_crops_are_examples(tmp_path):
    """Crops of held-out scans (split: heldout) are evaluate's reference: never training examples."""
    data = tmp_path / "data"
    write_fixture_data(data, [SQUARE, SQUARE, PORTRAIT, SQUARE])
    rows = [json.loads(line) for line in (data / "crop" / "crops.jsonl").read_text().splitlines()]
    rows[1]["split"] = rows[2]["split"] = "heldout"
    del rows[3]["split"]  # written before the split existed: a training crop
    (data / "crop" / "crops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = dataset.load_examples(compose([f"paths.data_dir={data}"]))
    assert [e.sample_id for e in examples] == [rows[0]["crop_id"], rows[3]["crop_id"]]


def test_cache_is_keyed_by_sample_id_and_content_and_reused(train_assets, tmp_path, monkeypatch):
    from artmaster.models import load_pipeline

    cfg = make_run_cfg(train_assets, tmp_path)
    pipe = load_pipeline(cfg.model)
    examples = dataset.load_examples(cfg)[:2]
    cache = tmp_path / "cache"
    encoded = build_cache(pipe, examples, ["a prompt"], cache, cfg.model, False)
    encodings, used = encoded.samples, encoded.files
    assert len(used) == 3 and len(list(cache.glob("*.safetensors"))) == 3
    for example in examples:  # each entry holds its own crop's latents and its own caption's embedding
        mean, _ = encode_image(pipe.vae, load_pixels(example))
        embeds, _ = models.prompt_embeddings(pipe, [example.caption], cfg.model.max_sequence_length)
        assert torch.equal(encodings[example.sample_id]["latent_mean"], mean)
        assert torch.equal(encodings[example.sample_id]["prompt_embeds"], embeds[0])

    def refuse(*args, **kwargs):
        raise AssertionError("encoder called although the cache holds this entry")

    monkeypatch.setattr("artmaster.training.encodings.encode_image", refuse)
    monkeypatch.setattr(models, "prompt_embeddings", refuse)
    again = build_cache(pipe, examples, ["a prompt"], cache, cfg.model, False)
    assert again.files == used
    again = again.samples
    assert all(torch.equal(again[k]["latent_mean"], encodings[k]["latent_mean"]) for k in encodings)

    # swapping the two captions changes both keys: nothing stale can be paired with the wrong crop
    swapped = [dataset.Example(a.sample_id, a.image_path, b.caption, a.size) for a, b in zip(examples, examples[::-1])]
    monkeypatch.undo()
    assert not build_cache(pipe, swapped, [], cache, cfg.model, False).files & used


def test_samples_are_what_generate_paints_from_cached_embeddings_with_the_encoders_freed(make_cfg):
    cfg = make_cfg()
    pipe = models.build_random_pipeline(cfg.model)
    settings = SampleSettings.from_config(OmegaConf.create(
        {"enabled": True, "every": None, "prompts": ["misty gorge", "a cat"], "seeds": [3, 4], "batch_size": 3,
         "width": 64, "height": 64, "steps": 2, "guidance": 1}))
    painted = generate_images(pipe, ["misty gorge"] * 2 + ["a cat"] * 2, [3, 4, 3, 4], height=64, width=64,
                              steps=2, guidance=1.0, max_sequence_length=16, batch_size=1)
    encodings = {}
    for prompt in settings.prompts:
        embeds, pooled = models.prompt_embeddings(pipe, [prompt], 16)
        encodings[prompt] = {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
    free_encoders(pipe)  # as in training: only the cached embeddings are left
    samples = render_samples(pipe, encodings, settings, 16, torch.device("cpu"))
    assert [(prompt, seed) for prompt, seed, _ in samples] == [("misty gorge", 3), ("misty gorge", 4),
                                                              ("a cat", 3), ("a cat", 4)]
    for (_, _, image), expected in zip(samples, painted):
        assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 1


# --- the stage ----------------------------------------------------------------------------------


def test_run_writes_adapter_lora_card_ranks_metrics_and_logs_to_mlflow(train_reference):
    import mlflow

    cfg, metrics, out = train_reference
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "lora/pytorch_lora_weights.safetensors", "lora/zxh_style_kohya.safetensors", "lora/README.md",
                 "ranks.json", "ranks.png", "metrics.json", "loss.csv", "samples/step-000000.png",
                 "samples/step-000012.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob(".*tmp*")), "temporary files left behind"
    assert json.loads((out / "metrics.json").read_text())["steps"] == metrics["steps"] == 12

    ranks = json.loads((out / "ranks.json").read_text())
    assert len(ranks) == 44 and sum(ranks.values()) == 44 * cfg.train.adalora.target_r
    assert min(ranks.values()) < max(ranks.values()), "AdaLoRA did not re-allocate ranks"
    assert metrics["orthogonal"] < metrics["orthogonal_first"]

    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert int(rows[0]["rank_budget"]) > int(rows[-1]["rank_budget"]) == sum(ranks.values())

    card = (out / "lora" / "README.md").read_text()
    assert "zxh style" in card and str(cfg.model.path) in card and "| double attn.to_q |" in card and "val_loss" in card

    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id],
                             filter_string="tags.`artmaster.stage` = 'train'")[0]
    assert run.data.params["train.optim.lr"] == str(cfg.train.optim.lr)
    assert run.info.run_name == f"train r={cfg.train.adalora.target_r} lr=1e-2"
    for key in ("loss/train", "optim/lr", "objective/orthogonal", "optim/grad_norm", "rank/budget", "rank/active"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4, 6, 8, 10, 12], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/val")] == [0, 6, 12]
    headline = json.loads((out / "headline.json").read_text())
    assert set(headline) == {"loss", "val_loss", "ranks"}
    assert {k for k in run.data.metrics if k.startswith("result/")} == {f"result/{k}" for k in headline}
    assert run.data.params["plan.optimizer_steps"] == "12"
    assert [int(r["step"]) for r in csv.DictReader((out / "val_loss.csv").open())] == [0, 6, 12]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "lora", "ranks.png", "ranks.json", "samples", "metrics.json", "loss.csv"} <= artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(path.startswith("images/prompt 0 seed 0+step+12") for path in images), images


def test_killed_run_resumes_to_the_bitwise_same_adapter(train_reference, train_assets, tmp_path, monkeypatch):
    cfg_ref, metrics_ref, out_ref = train_reference
    cfg = make_run_cfg(train_assets, tmp_path)
    killed_at_step(cfg, monkeypatch, 7)
    out = tmp_path / "data" / "train"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000004"]
    assert not (out / "metrics.json").exists()

    metrics = train.run(cfg)  # train.resume=auto
    final, final_ref = (load_file(o / "checkpoints" / "step-000012" / "adapter.safetensors") for o in (out, out_ref))
    assert final.keys() == final_ref.keys() and any(".lora_E." in k for k in final)
    assert all(torch.equal(final[k], final_ref[k]) for k in final)
    assert (out / "loss.csv").read_text() == (out_ref / "loss.csv").read_text()
    lora, lora_ref = (load_file(o / "lora" / "pytorch_lora_weights.safetensors") for o in (out, out_ref))
    assert lora.keys() == lora_ref.keys() and all(torch.equal(lora[k], lora_ref[k]) for k in lora)
    assert metrics["loss"] == metrics_ref["loss"]


def test_replicates_train_the_recipe_again_with_the_next_seeds(train_reference, train_assets, tmp_path):
    _, metrics_ref, out_ref = train_reference
    train.run(make_run_cfg(train_assets, tmp_path, "replicates.count=2"))
    out = tmp_path / "data" / "train"
    weights = "lora/pytorch_lora_weights.safetensors"
    product, product_ref, second = (load_file(o / weights) for o in (out, out_ref, out / "replicates" / "seed_1"))
    assert all(torch.equal(product[k], product_ref[k]) for k in product_ref), "replicate 0 is the usual run"
    assert second.keys() == product.keys()
    assert not all(torch.equal(second[k], product[k]) for k in product), "replicate 1 trains with seed 1"
    assert json.loads((out / "replicates" / "seed_1" / "metrics.json").read_text())["loss"] != metrics_ref["loss"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(train_assets, tmp_path, monkeypatch):
    cfg = make_run_cfg(train_assets, tmp_path)
    real_loss = flow_matching_loss
    calls = []

    def nan_from_step_6(model, batch, flow, generator):
        calls.append(1)
        loss = real_loss(model, batch, flow, generator)
        return loss * float("nan") if len(calls) >= 6 else loss

    monkeypatch.setattr("artmaster.training.step.flow_matching_loss", nan_from_step_6)
    with pytest.raises(FloatingPointError, match="at step 6.*step-000004"):
        train.run(cfg)
    checkpoints = list_checkpoints(tmp_path / "data" / "train" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-000004"]
    saved = load_file(checkpoints[0] / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.slow
def test_two_process_ddp_on_cpu_ends_with_identical_adapters(train_assets, tmp_path):
    cfg = make_run_cfg(train_assets, tmp_path)  # copies the data
    overrides = [f"paths.data_dir={cfg.paths.data_dir}", f"model.path={cfg.model.path}",
                 f"tracking.uri={cfg.tracking.uri}", f"tracking.artifact_dir={cfg.tracking.artifact_dir}",
                 *FAST, "train.samples.prompts=[]", "train.epochs=2"]
    done = accelerate_launch("artmaster.train", overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((Path(cfg.paths.data_dir) / "train" / "metrics.json").read_text())
    checksums = metrics["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert metrics["steps"] == 4  # 2 epochs x 4 batches, split over 2 ranks


@pytest.mark.slow
def test_two_by_two_sweep_is_one_parent_run_with_four_children_and_a_summary(train_assets, tmp_path):
    import mlflow

    cfg = make_run_cfg(train_assets, tmp_path)
    sweep_dir = tmp_path / "multirun"
    overrides = [f"paths.data_dir={cfg.paths.data_dir}", f"model.path={cfg.model.path}",
                 f"tracking.uri={cfg.tracking.uri}", f"tracking.artifact_dir={cfg.tracking.artifact_dir}",
                 *FAST, "train.epochs=1", "train.samples.prompts=[]", "train.validation.every=0",
                 f"hydra.sweep.dir={sweep_dir}"]
    command = [sys.executable, "-m", "artmaster.cli", "train", "-m", "train.adalora.target_r=4,8",
               "train.optim.lr=1e-4,2e-4", *overrides]
    done = subprocess.run(command, cwd=project_root(), env=offline_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    client = mlflow.MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`artmaster.sweep` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    points = {(c.data.params["train.adalora.target_r"], c.data.params["train.optim.lr"]) for c in children}
    assert points == {("4", "0.0001"), ("4", "0.0002"), ("8", "0.0001"), ("8", "0.0002")}
    assert all("result/loss" in c.data.metrics for c in children)
    assert parents[0].info.run_name == "sweep train (4 points)"
    # children are named by the swept keys only (not by the fixed overrides of the command)
    assert {c.info.run_name for c in children} == {f"train target_r={r} lr={lr}" for r in (4, 8)
                                                   for lr in ("0.0001", "0.0002")}
    assert "| train.adalora.target_r |" in parents[0].data.tags["mlflow.note.content"]

    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert len(rows) == 4 and {"train.adalora.target_r", "train.optim.lr", "result/loss"} <= set(rows[0])
    assert "| train.adalora.target_r |" in (sweep_dir / "summary.md").read_text().replace("| run | status ", "")
    for number in range(4):  # each point wrote its own outputs; data/train was left alone
        assert (sweep_dir / str(number) / "train" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (Path(cfg.paths.data_dir) / "train").exists()
