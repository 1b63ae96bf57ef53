"""Stage `retrain` (ArtAug learner) on a tiny random pipeline: both modes, a round augment kept
nothing of, two chained rounds, and the LoRA maths it relies on (continue exactly, fuse, concat).

Upstream is built once per module: crops and captions as crop/caption write them (test_train's
helper), a tiny random pipeline, a 4-step train run (data/train/adapter + lora) and augment round
folders written the way augment writes them (samples.jsonl, pairs/, accepted/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from artmaster import augment, retrain, train
from artmaster.adalora import (DIFFUSERS_WEIGHT_NAME, concat_loras, export_lora, fuse_lora_, load_adalora_weights_,
                               read_lora)
from artmaster.config import compose
from artmaster.models import build_random_pipeline
from helpers.training import SQUARE, write_fixture_data

# the loop at its smallest: 2 training crops (2 held), no sample images, validation at the end only
TINY = (
    "train.epochs=2", "train.repeats=2", "train.batch_size=2", "train.log_every=1",
    "train.checkpoint.every=100", "train.samples.prompts=[]", "train.validation.every=0",
    "train.adalora.delta_t=1", "train.validation.num_samples=2",
    "retrain.recipe.epochs=1", "retrain.recipe.repeats=1", "retrain.refined_repeats=2", "replicates.count=1",
)
PROMPTS = ["zxh style, a river winding through a deep gorge", "zxh style, steep peaks above a valley village"]


def write_augment_round(data: Path, r: int, accepted: list[bool], size: int = 128) -> Path:
    """data/augment/round_<r>/ as augment writes it: one sample per entry, accepted or not."""
    out = data / "augment" / f"round_{r}"
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(100 + r)
    records = []
    for index, keep in enumerate(accepted):
        sample_id = f"{index:04d}"
        files = {"original": f"pairs/{sample_id}-original.png", "refined": f"pairs/{sample_id}-refined.png"}
        for name in ("original", "refined"):
            (out / "pairs").mkdir(parents=True, exist_ok=True)
            coarse = rng.uniform(0, 255, (size // 16, size // 16, 3)).astype(np.uint8)
            Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(out / files[name])
        if keep:
            files["accepted"] = f"accepted/{sample_id}.png"
            (out / "accepted").mkdir(exist_ok=True)
            shutil.copy(out / files["refined"], out / files["accepted"])
        records.append({"sample_id": sample_id, "round": r, "prompt": PROMPTS[index % len(PROMPTS)],
                        "seed": 1000 + index, "accepted": keep, "files": files})
    (out / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in records), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """root/ with pipeline/, data/{crop,caption,train}, an empty MLflow store (copied per test)."""
    import mlflow

    root = tmp_path_factory.mktemp("retrain_upstream")
    build_random_pipeline(compose().model).save_pretrained(root / "pipeline")
    write_fixture_data(root / "data", [SQUARE] * 4)
    mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()
    shutil.copy(root / "mlflow.db", root / "empty.db")
    metrics = train.run(_compose(root, root))
    assert metrics["steps"] == 4
    return root


def _compose(upstream: Path, root: Path, *overrides: str):
    return compose([
        f"paths.data_dir={root / 'data'}", f"model.path={upstream / 'pipeline'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"tracking.artifact_dir={root / 'mlartifacts'}",
        *TINY, *overrides,
    ])


@pytest.fixture
def cfg_for(upstream, tmp_path):
    """A fresh copy of upstream's data/ (and store) per test; returns compose(overrides)."""
    for stage in ("crop", "caption", "train"):
        shutil.copytree(upstream / "data" / stage, tmp_path / "data" / stage)
    shutil.copy(upstream / "empty.db", tmp_path / "mlflow.db")

    def _make(*overrides: str):
        return _compose(upstream, tmp_path, *overrides)

    return _make


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / DIFFUSERS_WEIGHT_NAME))


def _loads_in_diffusers(cfg, folder: Path) -> None:
    from artmaster.models import load_pipeline

    pipe = load_pipeline(cfg.model)
    pipe.load_lora_weights(str(folder))
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


# --- the LoRA maths ------------------------------------------------------------------------------


def test_continuing_starts_exactly_at_the_saved_adapter(upstream):
    """The AdaLoRA folder (kept triplets only) goes back into a fresh AdaLoRA model: its export is
    train's exported LoRA, bit for bit, and masked triplets start at zero."""
    from artmaster.adalora import wrap_with_adalora

    cfg = _compose(upstream, upstream)
    transformer = build_random_pipeline(cfg.model, with_text_encoders=False).transformer
    model = wrap_with_adalora(transformer, cfg.train.adalora, 10)
    ranks = load_adalora_weights_(model, upstream / "data" / "train" / "adapter")
    assert ranks == json.loads((upstream / "data" / "train" / "ranks.json").read_text())
    exported = export_lora(model)
    saved = read_lora(upstream / "data" / "train" / "lora")
    assert exported.lora_A.keys() == saved.lora_A.keys()
    for module in saved.lora_A:
        assert torch.allclose(exported.lora_A[module], saved.lora_A[module], rtol=0, atol=1e-7)
        assert torch.allclose(exported.lora_B[module], saved.lora_B[module], rtol=1e-6, atol=1e-7)


def test_fused_lora_equals_diffusers_loading_and_concat_is_the_sum(upstream):
    cfg = _compose(upstream, upstream)
    lora_dir = upstream / "data" / "train" / "lora"
    from artmaster.models import load_pipeline

    pipe = load_pipeline(cfg.model)
    fused = load_pipeline(cfg.model).transformer
    assert fuse_lora_(fused, lora_dir) == len(read_lora(lora_dir).lora_A)
    pipe.load_lora_weights(str(lora_dir))
    torch.manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 64), "encoder_hidden_states": torch.randn(1, 8, cfg.model.architecture.transformer.joint_attention_dim),
              "pooled_projections": torch.randn(1, cfg.model.architecture.transformer.pooled_projection_dim),
              "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3),
              "guidance": torch.tensor([1.0]) if pipe.transformer.config.guidance_embeds else None}
    with torch.no_grad():
        expected = pipe.transformer(**inputs).sample
        got = fused(**inputs).sample
    assert torch.allclose(got, expected, atol=1e-5)

    one = read_lora(lora_dir)
    total = concat_loras([one, one], {})
    for module in one.lora_A:
        assert total.ranks[module] == 2 * one.ranks[module]
        assert torch.allclose(total.lora_B[module] @ total.lora_A[module], 2 * one.lora_B[module] @ one.lora_A[module],
                              atol=1e-6)


# --- the stage -----------------------------------------------------------------------------------


def test_continue_mode_writes_the_round_and_publishes_a_loadable_lora(cfg_for, monkeypatch):
    import mlflow

    cfg = cfg_for("retrain.mode=continue")
    write_augment_round(Path(cfg.paths.data_dir), 0, [True, False, True])
    summary = retrain.run(cfg)
    data = Path(cfg.paths.data_dir)
    out = data / "retrain" / "round_0"
    assert summary["accepted_used"] == 2 and summary["skipped"] == 0 and summary["mode"] == "continue"
    # 2 training crops + 2 refined images x 2 repeats, batches of 2, 1 epoch
    assert summary["steps"] == 3 and summary["extra_examples"] == 2 and summary["crops_trained"] == 2
    for name in ("lora/README.md", "lora/zxh_style_kohya.safetensors", "adapter/adapter_config.json",
                 "loss.csv", "ranks.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert "round 0, mode `continue`" in (out / "lora" / "README.md").read_text()
    published = json.loads((data / "retrain" / "metrics.json").read_text())
    assert published["loss"] == summary["loss"] and published["accepted_used_total"] == 2
    assert published["per_round"]["round_0"]["accepted_used"] == 2
    contract, round_lora = _tensors(data / "retrain" / "lora"), _tensors(out / "lora")
    assert contract.keys() == round_lora.keys() and all(torch.equal(contract[k], round_lora[k]) for k in contract)
    before = _tensors(data / "train" / "lora")
    assert any(not torch.equal(before[k], round_lora[k]) for k in before.keys() & round_lora.keys())
    _loads_in_diffusers(cfg, data / "retrain" / "lora")
    assert (data / "retrain" / "loss.csv").read_text() == (out / "loss.csv").read_text()

    client = mlflow.MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id
    runs = client.search_runs([experiment], "tags.`artmaster.stage` = 'retrain'")
    by_phase = {run.data.tags["artmaster.retrain_phase"]: run for run in runs}
    assert set(by_phase) == {"round", "continue"}
    assert by_phase["continue"].data.tags["mlflow.parentRunId"] == by_phase["round"].info.run_id
    assert by_phase["round"].data.params["retrain.mode"] == "continue"
    assert by_phase["round"].data.metrics["result/refined_images"] == 2
    assert by_phase["round"].info.run_name == "retrain round 0"
    assert by_phase["continue"].info.run_name == "retrain round 0 continue"
    assert [m.step for m in client.get_metric_history(by_phase["continue"].info.run_id, "loss/train")] == [1, 2, 3]
    assert {"lora", "adapter", "ranks.png"} <= {a.path for a in client.list_artifacts(by_phase["continue"].info.run_id)}

    # a second run with the same inputs keeps the round: the loop does not run again
    monkeypatch.setattr(retrain, "train", lambda *a, **k: pytest.fail("a finished round was redone"))
    assert retrain.run(cfg)["fingerprint"] == summary["fingerprint"]


def test_differential_mode_keeps_only_the_refinement_adapter(cfg_for, tmp_path):
    cfg = cfg_for("retrain.mode=differential")
    data = Path(cfg.paths.data_dir)
    write_augment_round(data, 0, [True, True, False])
    summary = retrain.run(cfg)
    out = data / "retrain" / "round_0"
    assert summary["mode"] == "differential" and summary["accepted_used"] == 2 and summary["kept_run"] == "refined"
    # adapter 1 and 2 train on the two pairs only (x 2 repeats): 2 steps each; crops only validate
    assert summary["steps"] == 2 and summary["crops_trained"] == 0 and "val_loss" in summary
    for phase in ("originals", "refined"):
        assert (out / phase / "lora" / DIFFUSERS_WEIGHT_NAME).is_file()
    assert not (out / "adapter").exists()

    # round result = train's LoRA + adapter 2, exactly; adapter 1 is gone
    first, second = read_lora(data / "train" / "lora"), read_lora(out / "refined" / "lora")
    total = read_lora(out / "lora")
    for module in total.lora_A:
        expected = torch.zeros_like(total.lora_B[module] @ total.lora_A[module])
        for part in (first, second):
            if module in part.lora_A:
                expected += part.lora_B[module] @ part.lora_A[module]
        assert torch.allclose(total.lora_B[module] @ total.lora_A[module], expected, atol=1e-6)
        assert total.ranks[module] == first.ranks.get(module, 0) + second.ranks.get(module, 0)
    assert "mode `differential`" in (out / "lora" / "README.md").read_text()
    published = _tensors(data / "retrain" / "lora")
    assert published.keys() == _tensors(out / "lora").keys()
    _loads_in_diffusers(cfg, data / "retrain" / "lora")

    # the kept adapter differs from what continue mode makes of the same round
    other = tmp_path / "continue"
    for stage in ("crop", "caption", "train", "augment"):
        shutil.copytree(data / stage, other / "data" / stage)
    cfg_continue = compose([f"paths.data_dir={other / 'data'}", f"model.path={cfg.model.path}",
                            f"tracking.uri={cfg.tracking.uri}", f"tracking.artifact_dir={cfg.tracking.artifact_dir}",
                            *TINY, "retrain.mode=continue"])
    retrain.run(cfg_continue)
    kept, continued = _tensors(out / "refined" / "lora"), _tensors(other / "data" / "retrain" / "round_0" / "lora")
    shared = kept.keys() & continued.keys()
    assert shared and any(kept[k].shape != continued[k].shape or not torch.equal(kept[k], continued[k]) for k in shared)


@pytest.mark.parametrize("mode", ["continue", "differential"])
def test_a_round_with_no_accepted_image_is_skipped_keeping_the_adapter(cfg_for, caplog, monkeypatch, mode):
    cfg = cfg_for(f"retrain.mode={mode}")
    data = Path(cfg.paths.data_dir)
    write_augment_round(data, 0, [False, False])
    monkeypatch.setattr(retrain, "train", lambda *a, **k: pytest.fail("trained although nothing was accepted"))
    summary = retrain.run(cfg)
    assert summary["skipped"] == 1 and summary["accepted_used"] == 0
    assert "augment kept no refined image" in caplog.text and "skipped" in caplog.text
    for folder in (data / "retrain" / "round_0" / "lora", data / "retrain" / "lora"):
        assert (folder / DIFFUSERS_WEIGHT_NAME).read_bytes() == (data / "train" / "lora" / DIFFUSERS_WEIGHT_NAME).read_bytes()
    assert (data / "retrain" / "round_0" / "adapter").is_dir() == (mode == "continue")
    published = json.loads((data / "retrain" / "metrics.json").read_text())
    assert published["skipped"] == 1 and "loss" not in published
    assert (data / "retrain" / "loss.csv").read_text() == "step,loss\n"


def test_two_rounds_chain_adapters(cfg_for, monkeypatch):
    """Round 1 paints with round 0's result and continues round 0's adapter; only the last round
    publishes, and publishing checks that every round is done."""
    cfg0 = cfg_for("augment.rounds=2", "retrain.round=0")
    data = Path(cfg0.paths.data_dir)
    assert augment.round_adapter(cfg0) == data / "train" / "lora"
    cfg1 = cfg_for("augment.rounds=2", "retrain.round=1", "augment.round=1")
    assert augment.round_adapter(cfg1) == data / "retrain" / "round_0" / "lora"
    assert cfg1.retrain.final_round == 1

    starts = []
    real_train = retrain.train
    monkeypatch.setattr(retrain, "train", lambda c, a, out, setup: starts.append(setup.init_adapter) or real_train(c, a, out, setup))
    write_augment_round(data, 0, [True])
    with pytest.raises(FileNotFoundError, match=r"round_0/adapter: retrain round 1 \(continue\) starts from this folder"):
        retrain.run(cfg1)
    first = retrain.run(cfg0)
    with pytest.raises(FileNotFoundError, match=r"augment round 1 has not run"):
        retrain.run(cfg1)
    assert not (data / "retrain" / "lora").exists(), "published before the last round"
    with pytest.raises(FileNotFoundError, match=r"round_1.*retrain round 1 of 2 has no result.*dvc repro"):
        retrain.run(compose([*_overrides(cfg0), "augment.rounds=2", "retrain.publish=only"]))

    write_augment_round(data, 1, [True, True])
    second = retrain.run(cfg1)
    assert starts == [data / "train" / "adapter", data / "retrain" / "round_0" / "adapter"]
    assert second["start"] == str(data / "retrain" / "round_0" / "adapter")
    published = json.loads((data / "retrain" / "metrics.json").read_text())
    assert published["rounds"] == 2 and published["accepted_used_total"] == 3
    assert published["per_round"]["round_0"]["loss"] == first["loss"]
    assert published["loss"] == second["loss"]
    contract, last = _tensors(data / "retrain" / "lora"), _tensors(data / "retrain" / "round_1" / "lora")
    assert all(torch.equal(contract[k], last[k]) for k in contract)

    # round 0 redone from other inputs makes round 1 stale: publishing says so
    write_augment_round(data, 0, [True, True])
    monkeypatch.setattr(retrain, "train", real_train)
    retrain.run(cfg0)
    with pytest.raises(ValueError, match=r"retrain round 1 was made from other inputs"):
        retrain.run(compose([*_overrides(cfg0), "augment.rounds=2", "retrain.publish=only"]))


def _overrides(cfg) -> list[str]:
    return [f"paths.data_dir={cfg.paths.data_dir}", f"model.path={cfg.model.path}", f"tracking.uri={cfg.tracking.uri}",
            f"tracking.artifact_dir={cfg.tracking.artifact_dir}", *TINY]


def test_bad_settings_are_clear_errors(cfg_for):
    with pytest.raises(ValueError, match=r"retrain\.mode='sideways'"):
        retrain.run(cfg_for("retrain.mode=sideways"))
    with pytest.raises(ValueError, match=r"retrain\.round=1 must be in \[0, augment\.rounds=1\)"):
        retrain.run(cfg_for("retrain.round=1"))
    cfg = cfg_for("+retrain.recipe.epochz=3")
    with pytest.raises(Exception, match="epochz"):
        retrain.recipe_config(cfg)
