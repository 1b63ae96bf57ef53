import mlflow

from artmaster.tracking import flatten, stage_run


def test_stage_run_logs_params_tags_and_nests_under_an_active_run(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "crop")
    cfg = make_cfg("crop=default")
    with stage_run(cfg, "crop", sections=("crop", "seed")) as run:
        mlflow.log_metric("crops", 3)
        with stage_run(cfg, "child", sections=("seed",)) as child:
            pass
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    logged = client.get_run(run.info.run_id)
    assert logged.data.tags["dvc.stage"] == "crop"
    assert logged.data.tags["artmaster.stage"] == "crop"
    assert len(logged.data.tags["params_hash"]) == 12
    assert logged.data.params["seed"] == str(cfg.seed)
    assert logged.data.metrics["crops"] == 3
    assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == run.info.run_id
    assert (tmp_path / "mlflow.db").is_file()


def test_flatten_uses_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {"a.b": "1", "a.c.d": "x", "e": "[1, 2]"}
