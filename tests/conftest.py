"""Shared fixtures: every test composes the real conf/ with its outputs redirected to tmp_path;
the train and augment stages' fixture data (module-scoped: built once per test file that asks)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from helpers.augment import write_upstream
from helpers.training import PORTRAIT, SQUARE, make_run_cfg, write_fixture_data

from artmaster import runtime
from artmaster.config import compose


@pytest.fixture(scope="session", autouse=True)
def stage_runtime():
    """The `runtime` settings every stage applies on start (torch threads, deterministic ops), so
    a stage function called here computes what the same stage launched as a command computes."""
    runtime.apply(compose().runtime)


@pytest.fixture
def make_cfg(tmp_path):
    """compose(overrides) with data/ and the MLflow store inside tmp_path."""

    def _make(*overrides: str):
        # one training replicate unless a test asks for more: the demo's 3 triple every training run
        replicates = [] if any(o.startswith("replicates.count=") for o in overrides) else ["replicates.count=1"]
        return compose(
            [
                f"paths.data_dir={tmp_path / 'data'}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"tracking.artifact_dir={tmp_path / 'mlartifacts'}",
                *replicates,
                *overrides,
            ]
        )

    return _make


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    """A tiny random pipeline folder, six crops (4 square, 2 portrait) with captions, and an empty
    MLflow store that each run copies (creating the SQLite schema takes seconds)."""
    import mlflow

    from artmaster.models import build_random_pipeline

    root = tmp_path_factory.mktemp("train_assets")
    build_random_pipeline(compose().model).save_pretrained(root / "pipeline")
    write_fixture_data(root / "data", [SQUARE] * 4 + [PORTRAIT] * 2)
    mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()
    return root


@pytest.fixture(scope="module")
def train_reference(train_assets, tmp_path_factory):
    """One uninterrupted tiny run: (config, metrics, output folder)."""
    from artmaster import train

    root = tmp_path_factory.mktemp("train_reference")
    cfg = make_run_cfg(train_assets, root)
    metrics = train.run(cfg)
    return cfg, metrics, root / "data" / "train"


@pytest.fixture(scope="module")
def augment_upstream(tmp_path_factory) -> Path:
    """data/ as the stages before augment leave it: crops, captions, base pipeline, LoRA."""
    return write_upstream(tmp_path_factory.mktemp("upstream") / "data")
