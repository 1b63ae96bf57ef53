"""The train stage's plan, rate and tracking contracts (issue 14) on the tiny profile: a checkpoint of
another validation split is never resumed, metrics report the steady-state rate beside the wall
time, and the stage runs where mlflow is not installed when tracking is off."""

from __future__ import annotations

import time
import sys

import pytest
from helpers.training import make_run_cfg

from artmaster import train
from artmaster.config import compose
from artmaster.training.checkpoints import resume_identity
from artmaster.training.loop import SteadyRate


def test_neutral_keys_leave_the_data_and_schedule_keys_in_the_identity():
    settings = {"validation": {"every": 25, "sigmas": [0.5], "num_samples": 2, "hold_out": True},
                "checkpoint": {"every": 5}, "cudagraphs": True, "epochs": 3}
    kept = resume_identity(settings)
    assert kept == {"validation": {"num_samples": 2, "hold_out": True}, "epochs": 3}
    assert settings["validation"]["every"] == 25  # the input is left as it was


def test_a_checkpoint_of_another_validation_split_is_refused(train_assets, tmp_path, capsys):
    """A run holding out 2 crops keeps its checkpoints; run again holding out 1: that changes the
    crops trained on and the step count, so an explicit resume is refused with one line and
    resume=auto trains from step 0 (saying so) instead of loading the old state."""
    train.run(make_run_cfg(train_assets, tmp_path))  # keep_after_success: its checkpoints stay
    checkpoint = tmp_path / "data" / "train" / "checkpoints" / "step-000012"
    assert checkpoint.is_dir()

    changed = make_run_cfg(train_assets, tmp_path, "train.validation.num_samples=1", f"train.resume={checkpoint}")
    with pytest.raises(ValueError, match=r"^train.resume=.*step-000012: that checkpoint is of another recipe, data, "
                                         r"validation split or schedule than this run; resume=auto starts afresh$"):
        train.run(changed)
    capsys.readouterr()
    metrics = train.run(make_run_cfg(train_assets, tmp_path, "train.validation.num_samples=1"))
    printed = capsys.readouterr().out
    assert "train: not resuming: the 2 checkpoint(s)" in printed and "resuming from" not in printed
    # 5 training crops now, 2 repeats, 3 epochs, batches of 2 (one bucket has an odd count)
    assert metrics["steps"] > 12
    assert metrics["steady_steps_per_second"] > 0 and metrics["steps_per_second"] > 0
    assert metrics["wall_seconds"] >= metrics["evaluation_seconds"] + metrics["checkpoint_seconds"]
    assert metrics["evaluation_seconds"] > 0 and metrics["checkpoint_seconds"] > 0


def test_steady_rate_is_the_median_window_without_evaluation(monkeypatch):
    clock = iter([0.0, 30.0, 31.0, 42.0, 43.0])  # a 30 s first window (compiling), then 1 s windows
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    rate = SteadyRate()
    assert rate.window(10) == pytest.approx(10 / 30)
    assert rate.window(10) == pytest.approx(10.0)
    rate.exclude(10.0)  # samples rendered inside the window
    assert rate.window(10) == pytest.approx(10.0)
    assert rate.window(10) == pytest.approx(10.0)
    assert rate.steady == pytest.approx(10.0)


def test_train_runs_without_mlflow_installed_when_tracking_is_off(train_assets, tmp_path, monkeypatch):
    """A GPU box without mlflow: `import mlflow` fails there, and with tracking.enabled=false no
    stage code may need it (stage_run, the loop's logging, validation, export)."""
    monkeypatch.setitem(sys.modules, "mlflow", None)  # any `import mlflow` raises ImportError
    cfg = make_run_cfg(train_assets, tmp_path, "tracking.enabled=false", "train.epochs=1", "train.checkpoint.every=2")
    metrics = train.run(cfg)
    assert metrics["steps"] == 4 and (tmp_path / "data" / "train" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "mlartifacts").exists()


def test_the_flux_recipe_takes_every_generation_setting_from_one_place():
    cfg = compose(["experiment=artmaster_flux"])
    one = cfg.base.generate
    assert (one.steps, one.guidance, one.width, one.height) == (28, 3.5, 512, 512)
    for settings in (cfg.train.samples, cfg.augment.generation, cfg.evaluate.generation):
        assert (settings.steps, settings.guidance, settings.width, settings.height) == (28, 3.5, 512, 512)
    cfg = compose(["experiment=artmaster_flux", "base.generate.steps=20", "base.generate.guidance=4.0"])
    for settings in (cfg.train.samples, cfg.augment.generation, cfg.evaluate.generation):
        assert (settings.steps, settings.guidance) == (20, 4.0)
