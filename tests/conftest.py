"""Shared fixtures: every test composes the real conf/ with its outputs redirected to tmp_path."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

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
