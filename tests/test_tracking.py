import json

import mlflow

from artmaster.sweep import sweep_points
from artmaster.tracking import NO_TRACKING, active, flatten, log_summary, short_overrides, stage_run


def test_stage_run_logs_params_tags_and_nests_under_an_active_run(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "crop")
    cfg = make_cfg("crop=default")
    with stage_run(cfg, "crop", sections=("crop", "seed")) as run:
        run.log_metric("crops", 3)
        with stage_run(cfg, "child", sections=("seed",)) as child:
            pass
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    logged = client.get_run(run.run_id)
    assert logged.data.tags["dvc.stage"] == "crop"
    assert logged.data.tags["artmaster.stage"] == "crop"
    assert len(logged.data.tags["params_hash"]) == 12
    assert logged.data.params["seed"] == str(cfg.seed)
    assert logged.data.metrics["crops"] == 3
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == run.run_id
    assert (tmp_path / "mlflow.db").is_file()


def test_flatten_uses_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {"a.b": "1", "a.c.d": "x", "e": "[1, 2]"}


def test_experiment_opens_as_model_training_and_runs_say_what_they_did(make_cfg, tmp_path):
    """MLflow 3's UI opens an experiment tagged custom_model_development on its runs table; a run is
    named by stage and label, described by its stage and command, and its summary goes to
    headline.json, `result/*` metrics and a table in the description (not a chart per number)."""
    cfg = make_cfg("crop=default")
    with stage_run(cfg, "train", sections=("seed",), label="r=8 lr=1e-2") as run:
        headline = log_summary({"loss": 0.123456789, "ranks": 352}, details={"steps": 240, "val_loss": 0.2},
                               note="240 steps.", folder=tmp_path)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    logged = client.get_run(run.run_id)
    assert logged.info.run_name == "train r=8 lr=1e-2"
    description = logged.data.tags["mlflow.note.content"]
    assert description.startswith("Stage `train`: AdaLoRA fine-tuning") and "`artmaster train`" in description
    assert "| loss | 0.1235 |" in description and "| steps | 240 |" in description and "240 steps." in description
    assert logged.data.metrics == {"result/loss": 0.1235, "result/ranks": 352.0}
    assert headline == {"loss": 0.1235, "ranks": 352}
    assert json.loads((tmp_path / "headline.json").read_text()) == headline


def test_an_older_experiment_gets_the_kind_tag(make_cfg):
    cfg = make_cfg()
    mlflow.set_tracking_uri(cfg.tracking.uri)
    experiment_id = mlflow.create_experiment(cfg.tracking.experiment_name)
    with stage_run(cfg, "crop", sections=()):
        pass
    assert mlflow.MlflowClient().get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_sweep_names_come_from_the_overrides():
    assert short_overrides(["train.adalora.target_r=4", "train.optim.lr=1e-4"]) == "target_r=4 lr=1e-4"
    assert short_overrides(["train.optim.lr=1e-4", "base.lr=2"]) == "train.optim.lr=1e-4 base.lr=2"
    assert sweep_points(["train.adalora.target_r=4,8", "train.optim.lr=1e-4,2e-4", "seed=1"]) == 4
    assert sweep_points(["train.epochs=range(1,4)"]) == 3


def test_model_shape_and_fixed_lists_go_to_config_yaml_not_params(make_cfg):
    """MLflow prints every param on each image card: the architecture and sample prompts stay in
    the run's config.yaml, the recipe stays as params."""
    cfg = make_cfg()
    with stage_run(cfg, "train", sections=("train", "model")) as run:
        pass
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    params = client.get_run(run.run_id).data.params
    assert params["train.optim.lr"] == str(cfg.train.optim.lr) and "model.max_sequence_length" in params
    assert not any(key.startswith(("model.architecture.", "train.samples.")) for key in params)
    assert len(params) < 60
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.run_id)}


def test_with_tracking_off_the_tracker_records_nothing_and_mlflow_is_never_imported(make_cfg, monkeypatch):
    """The no-op twin: the same calls, nothing recorded, mlflow not needed (`import mlflow` fails
    here); `active()` is the innermost open run's tracker, and the no-op one outside any run."""
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    cfg = make_cfg("tracking.enabled=false")
    assert active() is NO_TRACKING
    with stage_run(cfg, "crop", sections=("crop",)) as tracker:
        assert tracker is active() and not tracker.enabled and tracker.run_id is None
        tracker.log_metrics({"crops": 3}, step=1)
        tracker.set_tags({"a": "b"})
        with tracker.child("crop", "seed 1") as child:
            assert child is tracker
            child.log_artifact("no/such/file")
        assert log_summary({"crops": 3}) == {"crops": 3}
    assert active() is NO_TRACKING


def test_active_is_the_innermost_run_and_a_child_records_into_its_own_run(make_cfg):
    cfg = make_cfg()
    with stage_run(cfg, "train", sections=(), main=False) as other_process:  # accelerate's other ranks
        assert other_process is NO_TRACKING and active() is NO_TRACKING
    with stage_run(cfg, "train", sections=()) as run:
        assert active() is run and run.enabled
        with run.child("train", "seed 1") as child:
            assert active() is child and child.run_id != run.run_id
            child.log_metric("loss", 0.5, step=1)
        assert active() is run
    assert active() is NO_TRACKING
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    assert len(client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])) == 2
    logged = client.get_run(child.run_id)
    assert logged.data.metrics == {"loss": 0.5} and logged.data.tags["mlflow.parentRunId"] == run.run_id
    assert logged.info.run_name == "train seed 1" and logged.data.tags["artmaster.stage"] == "train"
    # in the stage's experiment (the MLflow UI shows it under its parent there), not in "Default"
    assert logged.info.experiment_id == client.get_run(run.run_id).info.experiment_id
    assert logged.info.experiment_id == client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id
